"""Train a MoE language model with UP-GRPO (or a baseline) from a recipe.

    torchrun [--nproc_per_node N] tools/train_moe.py RECIPE.yaml [dotted.key=value ...]
    python tools/train_moe.py RECIPE.yaml ...                                  # one process, no torchrun
    python tools/train_moe.py RECIPE.yaml --dry-run --world-size 64            # check a cluster recipe here
    python tools/train_moe.py RECIPE.yaml --print-config                       # the resolved recipe

The terminal shows our own lines (progress, evals, the summary); vLLM's, Megatron's and torch's output goes to
RUN_DIR/logs/rank<R>.log (--verbose keeps it in the terminal). Bad input ends with one line naming the problem
and exit status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="recipe YAML (see recipes/)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. actor.lr=1e-6")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the recipe, print the parallel layout and a per-GPU memory estimate, exit")
    ap.add_argument("--world-size", type=int, default=None,
                    help="world size for --dry-run (default: WORLD_SIZE, else trainer.world_size_hint, else 1)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved recipe (YAML) and exit")
    ap.add_argument("--verbose", action="store_true",
                    help="show third-party output (vLLM, Megatron, torch) in the terminal instead of RUN_DIR/logs/")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0,
                    help="for --dry-run: warn when the per-GPU peak estimate exceeds this (default 80)")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    a = ap.parse_intermixed_args(argv)  # overrides may come before or after the flags

    from upgrpo_megatron import console
    from upgrpo_megatron.errors import exit_with_message, user_error_types

    if not (a.verbose or a.dry_run or a.print_config):
        # capture from before the heavy imports; the trainer moves the log into RUN_DIR/logs/ once it has one
        fd, early = tempfile.mkstemp(prefix="upgrpo_startup_", suffix=".log")
        os.close(fd)
        console.capture_to(early)
    try:
        from upgrpo_megatron.config import load_recipe

        cfg = load_recipe(a.recipe, a.overrides)
        if a.print_config:
            from upgrpo_megatron.config import resolved_yaml

            print(resolved_yaml(cfg), end="")
            return 0
        if a.dry_run:
            from upgrpo_megatron.sizing import dry_run

            world = a.world_size or int(os.environ.get("WORLD_SIZE", 0)) or None
            print(dry_run(cfg, world, gpu_mem_gib=a.gpu_mem_gib))
            return 0
        from upgrpo_megatron.trainer import Trainer

        Trainer(cfg).fit()
        return 0
    except user_error_types() as e:
        return exit_with_message(e, debug=a.debug)
    except KeyboardInterrupt:
        print("interrupted", file=console.err())
        return 130
    except Exception:  # a bug, not bad input: the traceback, in the log and in the terminal
        import traceback

        traceback.print_exc()
        traceback.print_exc(file=console.err())
        if console.log_path() is not None:
            print(f"(third-party output up to here: {console.log_path()})", file=console.err())
        return 1
    finally:
        _drop_unused_startup_log(console)


def _drop_unused_startup_log(console) -> None:
    """A capture that never moved into a run directory (bad input, --dry-run) leaves no file behind."""
    path = console.log_path()
    if path is not None and path.name.startswith("upgrpo_startup_") and path.parent == Path(tempfile.gettempdir()):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
