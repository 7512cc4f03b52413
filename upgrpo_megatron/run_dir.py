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

from upgrpo_megatron.distributed import barrier, broadcast_object
from upgrpo_megatron.errors import RunDirError


class RunDir:
    def __init__(self, path, *, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        self._lock = None

    checkpoints = property(lambda self: self.path / "checkpoints")
    hf = property(lambda self: self.path / "hf")
    report = property(lambda self: self.path / "report")
    config = property(lambda self: self.path / "config.yaml")

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def prepare(self, resume: str) -> Optional[Path]:
        """Collective. Decide between a fresh run and a resume, refuse to overwrite an existing run, check the
        directory is writable and lock it. Returns the checkpoint to resume from (None: start fresh)."""
        from upgrpo_megatron.megatron.checkpoint import latest_complete_checkpoint

        d = self.path
        if resume not in ("auto", "never"):
            path = Path(resume)
            if not path.exists():
                raise RunDirError(f"trainer.resume={resume}: no such checkpoint directory")
            return path
        exists = d.exists() and any(d.iterdir())
        # rank 0 decides (it may restore an interrupted re-save); the other ranks take its answer
        ckpt = latest_complete_checkpoint(self.checkpoints) if exists and self.rank == 0 else None
        ckpt = broadcast_object(ckpt)
        if resume == "never" and exists:
            raise RunDirError(f"run directory {d} already exists and is not empty; set trainer.resume=auto to "
                              f"continue it or choose another trainer.run_dir")
        if self.rank == 0:
            try:
                d.mkdir(parents=True, exist_ok=True)
                probe = d / f".write-test-{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise RunDirError(f"trainer.run_dir={d} is not writable: {e.strerror}") from None
            self._lock = lock_run_dir(d)
        barrier()
        return ckpt

    def cut_logs(self, keep_through: Optional[int]) -> None:
        """Keep exactly what the resumed checkpoint covers: steps <= its step, or nothing without one (a run
        killed before its first checkpoint starts over), so no step is ever duplicated or missing."""
        from upgrpo_megatron.diagnostics.storage import truncate_run_files
        from upgrpo_megatron.metrics import truncate_jsonl

        truncate_jsonl(self.path / "metrics.jsonl", keep_through)
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
