"""Render the routing-mismatch report of a run: self-contained HTML (images embedded), PNGs, markdown.

    python tools/routing_report.py RUN_DIR [--out DIR]

DIR defaults to RUN_DIR/report; any other DIR must be outside the run directory (and must not contain it),
so the report never writes among the run's files.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check_arguments(a) -> None:
    """The run directory is one, and the output neither is, contains nor lies inside it (but RUN_DIR/report)."""
    from upgrpo_megatron.paths import refuse_overlap, require_dir, require_output_dir

    require_dir(a.run_dir, "RUN_DIR", "run directory")
    if a.out is not None:
        refuse_overlap(a.out, [("RUN_DIR", a.run_dir)], allow_inside=[Path(a.run_dir) / "report"])
    require_output_dir(a.out if a.out is not None else Path(a.run_dir) / "report")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    ap.add_argument("--debug", action="store_true")
    a = ap.parse_args(argv)
    from upgrpo_megatron.errors import UpgrpoError, exit_with_message

    try:
        check_arguments(a)
        from upgrpo_megatron.diagnostics.report import render_report

        path = render_report(a.run_dir, a.out)
    except UpgrpoError as e:
        return exit_with_message(e, debug=a.debug)
    print(f"report: {path} (+ PNGs and summary.md beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
