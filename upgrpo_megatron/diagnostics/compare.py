"""Side-by-side curves of several runs (the seed's Figures 1-3 and the mismatch rates), seeds aggregated.

Runs are grouped by `algorithm.loss_mode` from each run's config.yaml (or by explicit labels); each group is
one colour: the mean over its seeds as a line and the min-max over seeds as a band.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import yaml

from upgrpo_megatron.diagnostics.report import ReportError, _fig_to_png, _read_jsonl

PANELS = [("val/acc", "validation accuracy (Fig. 1)"), ("actor/ppo_kl", "KL pi_old || pi_theta (Fig. 2)"),
          ("actor/entropy", "policy entropy (Fig. 3)"), ("actor/pg_clipfrac", "clip fraction"),
          ("critic/score/mean", "training reward"), ("mismatch/routing/pair_frac", "train vs rollout routing mismatch"),
          ("routing/drift/pair_frac", "routing drift during update"), ("up/pos_ratio_above_clip_frac",
                                                                        "A>0 tokens above 1+eps_high")]


def group_runs(run_dirs: List[str], labels: Optional[Dict[str, str]] = None) -> Dict[str, List[Path]]:
    groups: Dict[str, List[Path]] = {}
    for d in map(Path, run_dirs):
        if not (d / "metrics.jsonl").exists():
            raise ReportError(f"{d}: no metrics.jsonl (is this a run directory?)")
        label = (labels or {}).get(str(d))
        if label is None:
            cfg_path = d / "config.yaml"
            cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
            label = (cfg.get("algorithm") or {}).get("loss_mode", d.name)
        groups.setdefault(label, []).append(d)
    return groups


def _series(run: Path, key: str) -> Dict[int, float]:
    return {r["step"]: r[key] for r in _read_jsonl(run / "metrics.jsonl") if r.get(key) is not None and r["step"] >= 0}


def compare(run_dirs: List[str], out_dir, labels: Optional[Dict[str, str]] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(run_dirs, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(PANELS) // 2, 2, figsize=(11, 2.7 * (len(PANELS) // 2)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, PANELS):
        for ci, (label, runs) in enumerate(sorted(groups.items())):
            series = [_series(r, key) for r in runs]
            steps = sorted(set().union(*series)) if series else []
            if not steps:
                continue
            vals = np.array([[s.get(t, np.nan) for t in steps] for s in series], dtype=float)
            mean = np.nanmean(vals, 0)
            c = colours[ci % len(colours)]
            ax.plot(steps, mean, color=c, label=f"{label} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=c, alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    b64 = _fig_to_png(fig, out / "compare.png")
    rows = []
    for label, runs in sorted(groups.items()):
        peaks, finals_kl, finals_ent, finals_acc = [], [], [], []
        for r in runs:
            acc = _series(r, "val/acc")
            if acc:
                peaks.append(max(acc.values()))
                finals_acc.append(acc[max(acc)])
            kl, ent = _series(r, "actor/ppo_kl"), _series(r, "actor/entropy")
            if kl:
                finals_kl.append(kl[max(kl)])
            if ent:
                finals_ent.append(ent[max(ent)])
        f = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if xs else "n/a"  # noqa: E731
        rows.append((label, len(runs), f(peaks), f(finals_acc), f(finals_kl), f(finals_ent)))
    header = "| loss | seeds | peak val/acc | final val/acc | final KL | final entropy |\n|---|---|---|---|---|---|\n"
    table = header + "".join(f"| {' | '.join(map(str, r))} |\n" for r in rows)
    (out / "compare.md").write_text(table + "\n![compare](compare.png)\n")
    (out / "compare.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Run comparison</title></head><body>"
        f"<h1>Run comparison</h1><img src='data:image/png;base64,{b64}' style='max-width:100%'>"
        "<table border=1>" + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        + "</table></body></html>")
    return out / "compare.md"
