import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_torchrun(script: Path, nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a worker under `torchrun --standalone` with one thread per rank; fail the test with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script.name} {' '.join(args)} failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def torchrun():
    return run_torchrun


_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_AT_START = {k: os.environ.get(k) for k in _RENDEZVOUS}


@pytest.fixture(autouse=True)
def _rendezvous_env_stays_in_its_test():
    """A test (or a module fixture) that initialises torch.distributed in the pytest process sets RANK,
    WORLD_SIZE, ... in os.environ; left there, every process a later test starts inherits them (a `--dry-run`
    then plans for WORLD_SIZE=1 instead of the recipe's world_size_hint: failed in CI). Put them back as they
    were when the session started, before each test (the process group itself stays initialised)."""
    for k, v in _AT_START.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    yield
