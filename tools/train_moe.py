"""Train a MoE language model with UP-GRPO (or a baseline) from a recipe.

    torchrun [--nproc_per_node N] tools/train_moe.py RECIPE.yaml [dotted.key=value ...] [--dry-run]
    python tools/train_moe.py RECIPE.yaml --dry-run --world-size 64      # check a cluster recipe here

Bad input ends with one line naming the problem and exit status 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
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
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0,
                    help="for --dry-run: warn when the per-GPU peak estimate exceeds this (default 80)")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    a = ap.parse_intermixed_args(argv)  # overrides may come before or after the flags

    from upgrpo_megatron.errors import exit_with_message, user_error_types

    try:
        from upgrpo_megatron.config import load_recipe

        cfg = load_recipe(a.recipe, a.overrides)
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
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
