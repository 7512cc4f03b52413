"""Run every benchmark, then render bench/results.md from bench/results.json (the README includes it).

    python bench/run_all.py            # all measures at their documented sizes (`make bench`)
    python bench/run_all.py --tiny     # seconds-long smoke versions, into a temporary results file
    python bench/run_all.py --table    # only re-render the table from results.json
    python bench/run_all.py --only losses.py convert.py   # some of them (the table keeps the others' entries)

The table goes to bench/results.md and into README.md between the bench-table markers. `BENCH_RESULTS`
names another results file (the smoke tests use one so that bench/results.json is never overwritten).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
MARKERS = ("<!-- bench-table:start (rendered by bench/run_all.py --table) -->", "<!-- bench-table:end -->")
SCRIPTS = ["losses.py", "actor_step.py", "rollout.py", "convert.py", "diagnostics.py", "rl_step.py", "scaling.py",
           "sync.py"]
# scripts run once per argument list at full size (--tiny: once)
SIZES = {"rl_step.py": ([], ["--medium"]), "rollout.py": ([], ["--heavy"])}


def ratio_cell(e: dict) -> str:
    """Median pairwise ratio with [min-max] and the pair count; a range that straddles 1 is no clear
    difference. Entries measured before the paired method show their single ratio."""
    if "ratio_min" not in e:
        how = "derived" if e.get("extra", {}).get("derived") else "unpaired"
        return f"**{e['ratio']:.2f}x** ({how})"
    lo, hi, n = e["ratio_min"], e["ratio_max"], e.get("n_pairs", len(e.get("pairs", [])))
    spread = f"{e['ratio']:.2f}x [{lo:.2f}-{hi:.2f}], {n} pairs"
    return f"no clear difference ({spread})" if lo < 1 < hi else f"**{spread}**"


def machines_line(data: dict) -> str:
    machines = (e.get("machine", {}) for e in data.values())
    seen = sorted({(m.get("cpu", "CPU model not recorded"), m.get("cores", m.get("cpus", "?"))) for m in machines})
    return "Machine: " + "; ".join(f"{cpu}, {cores} cores" for cpu, cores in seen) + ".\n\n" if seen else ""


def render_table(results: Path = HERE / "results.json") -> str:
    """The markdown table of every full-size measure (`*_tiny` smoke entries are left out), preceded by the
    machine it ran on."""
    data = json.loads(results.read_text()) if results.exists() else {}
    data = {k: v for k, v in data.items() if not k.endswith("_tiny")}
    lines = ["| measure | ours | theirs | ratio, median of pairs [min-max] (>1: ours is better) | unit "
             "| load avg at start | config |",
             "|---|---|---|---|---|---|---|"]
    for name in sorted(data):
        e = data[name]
        cfg = ", ".join(f"{k}={v}" for k, v in list(e.get("config", {}).items())[:6])
        load = e.get("load_avg_start") or []
        load_s = f"{load[0]:.1f}" if load else "?"
        lines.append(f"| {name} | {e['ours']:.4g} | {e['theirs']:.4g} | {ratio_cell(e)} | {e['unit']} | {load_s} "
                     f"| {cfg} |")
    return machines_line(data) + "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = README) -> bool:
    """Replace the README's table between the markers; False when the markers are missing."""
    text = readme.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--only", nargs="+", metavar="SCRIPT", help="run these scripts only (e.g. losses.py sync.py)")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.only or []) - set(SCRIPTS))
    if unknown:
        ap.error(f"--only: unknown script(s) {', '.join(unknown)}; the benchmarks are {', '.join(SCRIPTS)}")
    failed = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if a.tiny and "BENCH_RESULTS" not in env:  # smoke sizes never land in the committed results
        env["BENCH_RESULTS"] = str(Path(tempfile.mkdtemp(prefix="bench_tiny_")) / "results.json")
    results = Path(env.get("BENCH_RESULTS", HERE / "results.json"))
    t_all = time.time()
    if not a.table:
        for s in a.only or SCRIPTS:
            path = HERE / s
            if not path.exists():
                print(f"[bench] {s}: missing", flush=True)
                failed.append(s)
                continue
            for extra in [["--tiny"]] if a.tiny else SIZES.get(s, ([],)):
                name = " ".join([s, *extra])
                t0 = time.time()
                print(f"[bench] {name} ...", flush=True)
                proc = subprocess.run([sys.executable, str(path), *extra], env=env)
                print(f"[bench] {name}: exit {proc.returncode} in {time.time() - t0:.0f}s", flush=True)
                if proc.returncode:
                    failed.append(name)
    print(f"[bench] total {time.time() - t_all:.0f}s", flush=True)
    if a.tiny:
        data = json.loads(results.read_text()) if results.exists() else {}
        print(f"[bench] tiny entries in {results}: {', '.join(sorted(data))}")
    else:
        table = render_table(results)
        if results == HERE / "results.json":
            (HERE / "results.md").write_text(table)
            update_readme(table)
        print(table)
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
