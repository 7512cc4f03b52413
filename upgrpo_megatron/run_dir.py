"""The run directory: what lives where, the lock, fresh-or-resume, and logs cut back to the checkpoint.

    RUN_DIR/
      config.yaml            the resolved recipe (a changed one on resume is kept as config.before_step_N.yaml)
      metrics.jsonl          one JSON object per step (the source of truth), tensorboard/ beside it
      samples.jsonl          a few rollouts per step
      diagnostics/           per-step layer x expert arrays (step_000012.npz)
      checkpoints/step_N/    see megatron/checkpoint.py
      engine_init/rank_R/    the config.json rank R's rollout engine starts from (weights come by sync)
      hf/                    the final Hugging Face export
      report/                the routing-mismatch report
      .lock                  held by the trainer using this directory
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from upgrpo_megatron import console
from upgrpo_megatron.distributed import barrier, broadcast_object
from upgrpo_megatron.errors import RunDirError


class RunDir:
    def __init__(self, path, *, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        self._lock = None
        self._start_over = False
        self._rollback: Optional[int] = None  # resume=PATH of an older checkpoint of this run: its step

    checkpoints = property(lambda self: self.path / "checkpoints")
    hf = property(lambda self: self.path / "hf")
    report = property(lambda self: self.path / "report")
    config = property(lambda self: self.path / "config.yaml")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def prepare(self, resume: str) -> Optional[Path]:
        """Collective. Check the directory is writable and lock it, decide between a fresh run and a resume,
        refuse to overwrite an existing run. Returns the checkpoint to resume from (None: start fresh).

        resume: "auto" (the newest complete checkpoint; a directory with results but none is refused),
        "never" (the directory must be empty), "fresh" (start over, moving the old files aside) or a path."""
        path = None
        if resume not in ("auto", "never", "fresh"):
            path = Path(resume)
            if not path.exists():
                raise RunDirError(f"trainer.resume={resume}: no such checkpoint directory")
        # rank 0 locks and decides (it may restore an interrupted re-save); the other ranks take its answer
        ckpt, problem = None, None
        if self.rank == 0:
            try:
                self._lock_first()
                ckpt = self._decide(resume) if path is None else self._decide_path(path)
            except RunDirError as e:
                problem = str(e)
        ckpt, problem, self._start_over, self._rollback = broadcast_object(
            (ckpt, problem, self._start_over, self._rollback))
        if problem:
            raise RunDirError(problem)
        barrier()
        return ckpt

    def _lock_first(self) -> None:
        """A directory in use by a live trainer is refused before anything in it is judged; a new directory is
        created (and must be writable) before it is locked."""
        d = self.path
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"trainer.run_dir={d} is not writable: {e.strerror}") from None
        self._lock = lock_run_dir(d)

    def _decide(self, resume: str) -> Optional[Path]:
        from upgrpo_megatron.megatron.checkpoint import latest_complete_checkpoint

        d = self.path
        exists = any(p.name != ".lock" for p in d.iterdir())
        if resume == "never" and exists:
            raise RunDirError(f"run directory {d} already exists and is not empty; set trainer.resume=auto to "
                              f"continue it or choose another trainer.run_dir")
        ckpt = latest_complete_checkpoint(self.checkpoints) if exists and resume != "fresh" else None
        if exists and ckpt is None and resume != "fresh" and self.has_results():
            raise RunDirError(f"run directory {d} holds results (RL-step metrics, an HF export or a report) but no "
                              f"complete checkpoint to resume from; set trainer.resume=fresh to start over (the old "
                              f"files are moved to {d}/previous/) or choose another trainer.run_dir")
        self._start_over = exists and ckpt is None
        return ckpt

    def _decide_path(self, path: Path) -> Path:
        """resume=PATH: an older checkpoint of this run (a roll-back: the newer checkpoints and the logs past it
        are kept in previous/ when the run opens, so that resume=auto never returns to the abandoned ones), or
        another run's checkpoint into a directory that holds no run of its own (its logs would be cut)."""
        import re

        m = re.fullmatch(r"step_(\d+)", path.name)
        if path.resolve().parent == self.checkpoints.resolve() and m:
            self._rollback = int(m.group(1))
            return path
        if self.has_results() or any(self.checkpoints.glob("step_*")):
            raise RunDirError(f"trainer.resume={path}: trainer.run_dir={self.path} holds a run of its own, whose "
                              f"logs resuming another run's checkpoint would cut; choose an empty trainer.run_dir, "
                              f"or one of {self.checkpoints}/step_* to roll this run back")
        return path

    def _keep_aside_after(self, step: int) -> Optional[Path]:
        """Roll-back: move the checkpoints newer than `step` and a copy of the logs into RUN_DIR/previous/<time>/."""
        import shutil

        newer = [p for p in self.checkpoints.glob("step_*")
                 if p.name[5:].isdigit() and int(p.name[5:]) > step]
        if not newer:
            return None
        dest = self._new_previous_dir()
        (dest / "checkpoints").mkdir(parents=True)
        for p in newer:
            os.rename(p, dest / "checkpoints" / p.name)
        for name in ("metrics.jsonl", "samples.jsonl"):
            if (self.path / name).exists():
                shutil.copy2(self.path / name, dest / name)
        return dest

    def open(self, keep_through: Optional[int]) -> None:
        """Rank 0, once every input has checked out (nothing in the directory changes before): move the files of
        a run that starts over aside, or cut the logs back to the resumed checkpoint's step."""
        if self._start_over:
            moved = self.move_aside()
            if moved is not None:
                console.say(f"starting {self.path} over; its previous files are kept in {moved}")
        else:
            if self._rollback is not None:
                kept = self._keep_aside_after(self._rollback)
                if kept is not None:
                    console.say(f"rolled back to step {self._rollback}; the newer checkpoints and the full logs are "
                                f"kept in {kept}")
            self.cut_logs(keep_through)

    def has_results(self) -> bool:
        """Anything of value that a fresh start would lose: RL-step metrics, the HF export, the report."""
        import json

        if self.hf.exists() or self.report.exists():
            return True
        log = self.path / "metrics.jsonl"
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            try:
                if "step" in json.loads(line):
                    return True
            except ValueError:  # a line cut by a crash mid-write
                continue
        return False

    def _new_previous_dir(self) -> Path:
        """RUN_DIR/previous/<UTC time>/, with a .N suffix when one of that second exists (not created here)."""
        import time

        dest = self.path / "previous" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        n = 1
        while dest.exists():
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
            n += 1
        return dest

    def move_aside(self) -> Optional[Path]:
        """Move everything but the lock and earlier `previous/` copies into RUN_DIR/previous/<UTC time>/."""
        items = [p for p in self.path.iterdir() if p.name not in (".lock", "previous")]
        if not items:
            return None
        dest = self._new_previous_dir()
        dest.mkdir(parents=True)
        for p in items:
            os.rename(p, dest / p.name)
        return dest

    def cut_logs(self, keep_through: Optional[int]) -> None:
        """Keep exactly what the resumed checkpoint covers: steps <= its step, or nothing without one (a run
        killed before its first checkpoint starts over), so no step is ever duplicated or missing."""
        from upgrpo_megatron.diagnostics.storage import truncate_run_files
        from upgrpo_megatron.metrics import rebuild_tensorboard, truncate_jsonl

        if truncate_jsonl(self.path / "metrics.jsonl", keep_through):
            rebuild_tensorboard(self.path)
        truncate_run_files(self.path, keep_through)  # samples.jsonl and diagnostics/

    def save_config(self, cfg, step: int) -> Optional[Path]:
        from upgrpo_megatron.config import save_resolved

        return save_resolved(cfg, self.config, step=step)


def lock_run_dir(d: Path):
    """Hold an exclusive lock on RUN_DIR/.lock for the life of this process, so that two trainers never
    write one run (a second start, a forgotten job). The kernel drops the lock when the process dies, even
    by SIGKILL, so a crashed run never leaves a stale lock behind."""
    import fcntl

    f = open(d / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"trainer.run_dir={d} is in use by {holder}; stop that run first or choose another "
                          f"trainer.run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f
