"""Run an experiment (a grid of arms x seeds, see `upgrpo_megatron/experiment_plan.py`) and write its results.

    python tools/run_experiment.py experiments/miniature.yaml [--out runs/experiments/miniature]
                                   [--blocks A B] [--seeds 1 2] [--arms dapo up_grpo] [--analyze-only] [--dry-run]

Runs one at a time (each with the machine to itself), each seed's SFT job first; finished runs (a DONE file in
their run directory) are kept, so an interrupted experiment continues where it stopped. Then writes
OUT/results/results.md, results.csv and one figure per block.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(run, recipe: Path) -> int:
    cmd = [sys.executable, str(ROOT / "tools" / "train_moe.py"), str(recipe), *run.overrides]
    env = dict(os.environ, UPGRPO_NO_PROGRESS="1")
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir.parent / f"{run.run_dir.name}.out", "a") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc == 0:
        (run.run_dir / "DONE").write_text("finished\n")
    return rc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment")
    ap.add_argument("--out", default=None, help="default: runs/experiments/<name>")
    ap.add_argument("--blocks", nargs="*", default=[])
    ap.add_argument("--seeds", nargs="*", type=int, default=[])
    ap.add_argument("--arms", nargs="*", default=[], help="only these arms (their seeds' SFT jobs still run)")
    ap.add_argument("--analyze-only", action="store_true", help="only write the results of the finished runs")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their overrides, run nothing")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)

    from upgrpo_megatron.errors import exit_with_message, user_error_types

    try:
        from upgrpo_megatron.experiment_plan import load_experiment, plan

        exp = load_experiment(a.experiment)
        out = Path(a.out or ROOT / "runs" / "experiments" / exp.name)
        runs = plan(exp, out, blocks=a.blocks, seeds=a.seeds)
        runs = [r for r in runs if r.kind == "sft" or not a.arms or r.arm in a.arms]
        if a.dry_run:
            for r in runs:
                print(f"{'done' if r.done else 'todo'}  {r.run_dir}  {' '.join(r.overrides)}")
            return 0
        if not a.analyze_only:
            todo = [r for r in runs if not r.done]
            print(f"{len(runs)} runs, {len(runs) - len(todo)} already done", flush=True)
            for i, r in enumerate(todo):
                t0 = time.time()
                what = "SFT" if r.kind == "sft" else f"{r.block}/{r.arm}"
                print(f"[{i + 1}/{len(todo)}] {what} seed {r.seed} ...", end=" ", flush=True)
                rc = run_one(r, exp.recipe)
                print(f"{'ok' if rc == 0 else f'FAILED (exit {rc}, see {r.run_dir}.out)'} "
                      f"in {(time.time() - t0) / 60:.1f} min", flush=True)
                if rc != 0 and r.kind == "sft":
                    return rc  # every arm of that seed needs it
        from upgrpo_megatron.diagnostics.experiment import write_results

        chosen = [b for b in exp.blocks if not a.blocks or b.name in a.blocks]  # results in the file's order
        blocks = []
        for b in chosen:
            arms = {arm: [r.run_dir for r in runs if r.block == b.name and r.arm == arm and r.done] for arm in b.arms}
            arms = {k: v for k, v in arms.items() if v}
            if arms:
                blocks.append((b.name, b.description, b.baseline, arms))
        path = write_results(blocks, out / "results")
        print(f"results: {path}")
        return 0
    except user_error_types() as e:
        return exit_with_message(e, debug=a.debug)


if __name__ == "__main__":
    sys.exit(main())
