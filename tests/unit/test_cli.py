"""tools/train_moe.py as users call it: --dry-run of every shipped recipe, one-line errors for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_moe.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_dry_run_of_every_shipped_recipe(recipe):
    proc = cli(recipe, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "valid" in proc.stdout and "per-GPU memory estimate" in proc.stdout and "layout: world" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["actor.lrr=1"], "unknown key 'actor.lrr'"),
    (["rollout.n=0"], "rollout.n=0"),
    (["parallel.tp=3", "--world-size", "4"], "parallel.tp=3"),
    (["parallel.ep=3", "--world-size", "3"], "model.num_experts=8"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    proc = cli(ROOT / "recipes" / "qwen_moe.yaml", "--dry-run", *args)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr


def test_missing_recipe_file():
    proc = cli(ROOT / "recipes" / "nope.yaml", "--dry-run")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
