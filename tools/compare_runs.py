"""Compare runs side by side: curves of val/acc, KL, entropy, clip fractions and mismatch rates; a table.

    python tools/compare_runs.py RUN_DIR RUN_DIR ... [--out DIR] [--label NAME=GLOB ...]

Runs are grouped by the config.yaml keys in which they differ (all but trainer.seed and trainer.run_dir: runs
that differ only in those are seeds of one group), with a warning listing those keys; --label groups by path
instead (a run joins the first label whose glob matches its path or directory name). Each group is one colour,
its seeds a mean line with a min..max band. Writes DIR/compare.png, DIR/index.html and DIR/summary.md (printed);
DIR must lie outside every RUN_DIR.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check_arguments(a) -> None:
    """Every RUN_DIR is a directory, and --out neither is, contains nor lies inside any of them."""
    from upgrpo_megatron.paths import refuse_overlap, require_dir, require_output_dir

    for d in a.run_dirs:
        require_dir(d, "RUN_DIR", "run directory")
    refuse_overlap(a.out, [("RUN_DIR", d) for d in a.run_dirs])
    require_output_dir(a.out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", default="compare", help="output directory (default ./compare)")
    ap.add_argument("--label", action="append", default=[], metavar="NAME=GLOB",
                    help="put the runs whose path matches GLOB in group NAME (repeatable)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    a = ap.parse_args(argv)
    from upgrpo_megatron.errors import UpgrpoError, exit_with_message

    try:
        check_arguments(a)
        from upgrpo_megatron.diagnostics.compare import compare

        path = compare(a.run_dirs, a.out, a.label)
    except UpgrpoError as e:
        return exit_with_message(e, debug=a.debug)
    print(Path(path).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
