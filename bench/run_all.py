"""Run every benchmark, then render bench/results.md from bench/results.json (the README includes it).

    python bench/run_all.py            # all measures at their documented sizes (`make bench`)
    python bench/run_all.py --tiny     # seconds-long smoke versions (the test suite runs this per script)
    python bench/run_all.py --table    # only re-render the table from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["losses.py", "actor_step.py", "rollout.py", "convert.py", "diagnostics.py", "rl_step.py", "scaling.py"]


def render_table(results: Path = HERE / "results.json") -> str:
    data = json.loads(results.read_text()) if results.exists() else {}
    lines = ["| measure | ours | theirs | ratio (ours/theirs, >1 is better) | unit | config |",
             "|---|---|---|---|---|---|"]
    for name in sorted(data):
        e = data[name]
        cfg = ", ".join(f"{k}={v}" for k, v in list(e.get("config", {}).items())[:6])
        lines.append(f"| {name} | {e['ours']:.4g} | {e['theirs']:.4g} | **{e['ratio']:.2f}x** | {e['unit']} | {cfg} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args(argv)
    failed = []
    if not a.table:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for s in SCRIPTS:
            path = HERE / s
            if not path.exists():
                print(f"[bench] {s}: not written yet, skipped")
                continue
            t0 = time.time()
            print(f"[bench] {s} ...", flush=True)
            proc = subprocess.run([sys.executable, str(path), *(["--tiny"] if a.tiny else [])], env=env)
            print(f"[bench] {s}: exit {proc.returncode} in {time.time() - t0:.0f}s", flush=True)
            if proc.returncode:
                failed.append(s)
    table = render_table()
    (HERE / "results.md").write_text(table)
    print(table)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
