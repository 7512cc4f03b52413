"""Render the routing-mismatch report of a run: self-contained HTML (images embedded), PNGs, markdown.

    python tools/routing_report.py RUN_DIR [--out DIR]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    from upgrpo_megatron.errors import UpgrpoError, exit_with_message

    try:
        from upgrpo_megatron.diagnostics.report import render_report

        path = render_report(a.run_dir, a.out)
    except UpgrpoError as e:
        return exit_with_message(e, debug=a.debug)
    print(f"report: {path} (+ PNGs and summary.md beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
