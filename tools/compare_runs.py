"""Compare runs side by side: curves of val/acc, KL, entropy, clip fraction, mismatch rates; a table.

    python tools/compare_runs.py RUN_DIR RUN_DIR ... [--out DIR] [--label RUN_DIR=NAME ...]
Runs are grouped by the loss mode in their config.yaml unless labels are given; seeds become bands.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", default="compare")
    ap.add_argument("--label", action="append", default=[], help="RUN_DIR=NAME")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    from upgrpo_megatron.errors import UpgrpoError, exit_with_message

    try:
        from upgrpo_megatron.diagnostics.compare import compare

        labels = dict(x.split("=", 1) for x in a.label)
        path = compare(a.run_dirs, a.out, labels)
    except UpgrpoError as e:
        return exit_with_message(e, debug=a.debug)
    print(Path(path).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
