"""Running the real trainer as a user would (torchrun tools/train_moe.py) and hurting it from outside.

Every trainer here runs in its own session (process group), so a test can kill the trainer together with
the vLLM engine processes it started, and always does before it returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "qwen_moe.yaml"
# a few seconds per RL step: 4 prompts x 4 samples, one mini-batch, a checkpoint after every step
FAST = ["sft_warmup.steps=20", "rollout.val_sample_n=0", "data.arithmetic_max_operand=9", "trainer.prompts_per_step=4",
        "rollout.n=4", "actor.ppo_mini_batch_size=4",
        "trainer.eval_every=0", "trainer.save_every=1", "trainer.keep_checkpoints=2", "trainer.report=false",
        "trainer.export_hf=false", "trainer.tensorboard=false", "data.num_val=8"]


class Trainer:
    """One `torchrun tools/train_moe.py` process tree in its own session; output goes to a log file."""

    def __init__(self, run_dir: Path, *overrides: str, log: Path, faults: str = "", nproc: int = 1,
                 launcher: str = "torchrun", launcher_args: tuple = ()):
        """launcher: "torchrun" (any nproc, extra torchrun flags in launcher_args) or "python" (a world of one,
        what `make train` runs)."""
        env = dict(os.environ, OMP_NUM_THREADS="1", UPGRPO_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
        if faults:
            env["UPGRPO_FAULTS"] = faults
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *launcher_args] if launcher == "torchrun" else [sys.executable])
        cmd = [*launch, str(ROOT / "tools" / "train_moe.py"), str(RECIPE), f"trainer.run_dir={run_dir}", *FAST,
               *overrides]
        self.log = Path(log)
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.started = time.time()

    def output(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill_all()

    def signal(self, sig: int) -> None:
        """Signal the trainer rank (the torchrun worker), as a scheduler's preemption notice would."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if "train_moe.py" in " ".join(child.cmdline()):
                os.kill(child.pid, sig)
                return
        raise AssertionError("no trainer rank found to signal")

    def engine_pids(self) -> List[int]:
        """The vLLM processes (EngineCore, workers) under this launch."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p.pid for p in tree if _name(p).startswith("VLLM")]

    def ranks(self) -> dict:
        """{global rank: psutil.Process} of the trainer ranks running now (read from each worker's RANK)."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "train_moe.py" in " ".join(child.cmdline()) and "RANK" in child.environ():
                    out[int(child.environ()["RANK"])] = child
            except psutil.Error:
                pass
        return out

    def kill_all(self) -> None:
        """SIGKILL the whole tree: torchrun, its ranks and the engine processes (like a node failure).
        torchrun starts each rank in a session of its own, so killing torchrun's process group is not enough."""
        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self._fh.close()


def engine_processes(proc) -> list:
    """vLLM's processes under `proc` (a psutil.Process: a trainer rank or the launcher; they retitle themselves
    VLLM::EngineCore, VLLM::Worker); not the trainer's other helpers (dist_checkpointing's writer manager,
    multiprocessing's resource tracker)."""
    import psutil

    out = []
    for p in proc.children(recursive=True):
        try:
            if "VLLM" in p.name() + " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _name(p) -> str:
    try:
        return p.name()
    except Exception:
        return ""


def wait_until(cond: Callable[[], bool], timeout: float, proc: Optional[Trainer] = None, what: str = "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.proc.returncode}) before {what}:\n{proc.output()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f":\n{proc.output()[-4000:]}" if proc else ""))


def metric_steps(run_dir: Path, key: str = "step") -> List[int]:
    """RL steps (or with key="sft_step" the SFT warm-up's records) in metrics.jsonl in file order (a torn last
    line counts as no step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line)[key])
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def metrics(run_dir: Path) -> dict:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "step" in r}


def complete_checkpoints(run_dir: Path) -> List[int]:
    """Steps of the checkpoints that are complete, checked here independently of the trainer's code:
    a COMPLETE marker listing a sha256 for every file, every one matching."""
    out = []
    for d in sorted((Path(run_dir) / "checkpoints").glob("step_*")):
        marker = d / "COMPLETE"
        if not marker.exists():
            continue
        sums = json.loads(marker.read_text())
        files = {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "COMPLETE"}
        if set(sums) != files:
            continue
        if all(hashlib.sha256((d / f).read_bytes()).hexdigest() == h for f, h in sums.items()):
            out.append(int(d.name.split("_")[1]))
    return out


def partial_checkpoints(run_dir: Path) -> List[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob(".step_*"))
