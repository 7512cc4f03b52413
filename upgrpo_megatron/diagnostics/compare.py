"""Compare runs side by side (`tools/compare_runs.py RUN_DIR RUN_DIR ... [--out DIR] [--label NAME=GLOB]`).

Runs are grouped by their config's `algorithm.loss_mode` (RUN_DIR/config.yaml), or by `--label NAME=GLOB`
(a run belongs to the first label whose glob matches its path or its directory name). Each group is one
colour; its seeds are aggregated into a mean line and a min..max band. Curves: val/acc, KL (actor/ppo_kl,
and KL to the reference policy when logged), entropy, clip fractions and mismatch rates — the UP-GRPO post's
Figures 1-3 plus the routing view. Writes OUT/compare.png, OUT/index.html (self-contained) and OUT/summary.md
(per group: peak val/acc with its step, final KL, final entropy; mean ± std over seeds).
"""

from __future__ import annotations

import fnmatch
import html
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.ticker import MaxNLocator

from upgrpo_megatron.diagnostics.run_files import (
    ReportError,
    config_get,
    pyplot,
    read_config,
    read_metrics,
    require_run_dir,
    save_figure,
    series,
)

PANELS = [  # (metric key, panel title)
    ("val/acc", "validation accuracy (Fig. 1)"),
    ("actor/ppo_kl", "KL(pi_old || pi_theta), actor/ppo_kl (Fig. 2)"),
    ("actor/kl_loss", "KL to the reference policy"),
    ("actor/entropy", "policy entropy (Fig. 3)"),
    ("actor/pg_clipfrac", "clip fraction"),
    ("actor/pg_clipfrac_lower", "dual-clip (lower) fraction"),
    ("mismatch/routing/pair_frac", "routing mismatch train vs rollout (pairs)"),
    ("routing/drift/pair_frac", "routing drift pi_old -> pi_theta (pairs)"),
    ("mismatch/token_mult_prob_error", "token_mult_prob_error"),
]
KL_REF_KEYS = ("actor/kl_loss",)


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.metrics, self.bad_lines = read_metrics(path)
        self.config = read_config(path)
        self.loss_mode = config_get(self.config, "algorithm.loss_mode")
        self.seed = config_get(self.config, "trainer.seed")


def parse_labels(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """`NAME=GLOB` strings -> [(name, glob)], in order; a bad spec is a one-line error."""
    out = []
    for s in specs:
        name, sep, glob = s.partition("=")
        if not sep or not name.strip() or not glob.strip():
            raise ReportError(f"--label {s!r}: expected NAME=GLOB, e.g. up_grpo='runs/up_*'")
        out.append((name.strip(), glob.strip()))
    return out


def group_runs(runs: List[Run], labels: Sequence[Tuple[str, str]] = ()) -> Tuple[Dict[str, List[Run]], List[str]]:
    """{group name: runs} in first-seen order, and notes about runs that could not be grouped as asked."""
    groups: Dict[str, List[Run]] = {}
    notes = []
    for run in runs:
        name = None
        for label, glob in labels:
            if any(fnmatch.fnmatch(p, glob) for p in (str(run.path), str(run.path.resolve()), run.path.name)):
                name = label
                break
        if name is None:
            if labels:
                notes.append(f"{run.path} matched no --label glob; grouped by its loss_mode")
            name = str(run.loss_mode) if run.loss_mode else "unknown"
            if not run.loss_mode:
                notes.append(f"{run.path} has no algorithm.loss_mode in config.yaml; grouped as 'unknown'")
        groups.setdefault(name, []).append(run)
    return groups, notes


def aggregate(runs: List[Run], key: str) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(steps, mean, min, max) over the runs at each step where at least one run has the metric."""
    per_run = [dict(zip(*series(r.metrics, key))) for r in runs]
    steps = sorted(set().union(*per_run)) if per_run else []
    if not steps:
        return None
    vals = [[pr[s] for pr in per_run if s in pr] for s in steps]
    return (np.array(steps), np.array([np.mean(v) for v in vals]), np.array([min(v) for v in vals]),
            np.array([max(v) for v in vals]))


def _mean_std(xs: List[float]) -> str:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.4g}"
    return f"{np.mean(xs):.4g} ± {np.std(xs, ddof=1):.2g}"


def _final(run: Run, key: str) -> Optional[float]:
    _, ys = series(run.metrics, key)
    return ys[-1] if ys else None


def summary_rows(groups: Dict[str, List[Run]]) -> Tuple[List[str], List[List[str]]]:
    kl_ref = next((k for k in KL_REF_KEYS if any(series(r.metrics, k)[0] for rs in groups.values() for r in rs)), None)
    header = ["group", "runs", "peak val/acc", "step of peak (per run)", "final actor/ppo_kl"]
    header += [f"final {kl_ref}"] if kl_ref else []
    header += ["final actor/entropy", "final mismatch/routing/pair_frac"]
    rows = []
    for name, runs in groups.items():
        peaks, peak_steps = [], []
        for r in runs:
            xs, ys = series(r.metrics, "val/acc")
            if ys:
                i = int(np.argmax(ys))  # first step reaching the maximum
                peaks.append(ys[i])
                peak_steps.append(str(xs[i]))
        row = [name, str(len(runs)), _mean_std(peaks), ", ".join(peak_steps) or "n/a",
               _mean_std([_final(r, "actor/ppo_kl") for r in runs])]
        if kl_ref:
            row.append(_mean_std([_final(r, kl_ref) for r in runs]))
        row += [_mean_std([_final(r, "actor/entropy") for r in runs]),
                _mean_std([_final(r, "mismatch/routing/pair_frac") for r in runs])]
        rows.append(row)
    return header, rows


def compare(run_dirs: Sequence, out_dir=None, labels: Sequence[str] = ()) -> Path:
    """Render the comparison; returns the path of summary.md. One-line ReportError on a bad run dir/label."""
    if not run_dirs:
        raise ReportError("compare_runs: give at least one RUN_DIR")
    label_specs = parse_labels(labels)
    runs = [Run(require_run_dir(d)) for d in run_dirs]
    groups, notes = group_runs(runs, label_specs)
    out = Path(out_dir) if out_dir else Path("compare")
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    panels = [(k, t) for k, t in PANELS if any(series(r.metrics, k)[0] for r in runs)]
    colours = plt.get_cmap("tab10")
    img_b64 = None
    if panels:
        cols = 3
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(15, 3.4 * nrows), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels):
            for gi, (name, gruns) in enumerate(groups.items()):
                agg = aggregate(gruns, key)
                if agg is None:
                    continue
                steps, mean, lo, hi = agg
                c = colours(gi % 10)
                ax.plot(steps, mean, color=c, lw=1.6, marker="o", ms=2.5, label=f"{name} (n={len(gruns)})")
                if len(gruns) > 1:
                    ax.fill_between(steps, lo, hi, color=c, alpha=0.2, lw=0)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle("mean over seeds (line) and min..max (band) per group", fontsize=10)
        fig.tight_layout()
        img_b64 = save_figure(fig, out / "compare.png")
    else:
        notes.append("None of the compared metrics is present in any run.")
    header, rows = summary_rows(groups)
    md = ["# Run comparison", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    md += ["", "Runs:"] + [f"- `{r.path}` → {name}" for name, rs in groups.items() for r in rs]
    md += [f"> note: {n}" for n in notes]
    if img_b64:
        md += ["", "![curves](compare.png)"]
    summary = out / "summary.md"
    summary.write_text("\n".join(md) + "\n", encoding="utf-8")
    esc = html.escape
    page = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Run comparison</title>",
            "<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}td,th{border:1px solid #ccc;"
            "padding:3px 6px;font-size:13px}table{border-collapse:collapse}img{max-width:100%}</style></head><body>",
            "<h1>Run comparison</h1>",
            "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>"]
    page += [f"<p><b>note:</b> {esc(n)}</p>" for n in notes]
    if img_b64:
        page.append(f"<img alt='curves' src='data:image/png;base64,{img_b64}'>")
    page.append("<h2>Runs</h2><ul>" + "".join(f"<li><code>{esc(str(r.path))}</code> &rarr; {esc(name)}</li>"
                                              for name, rs in groups.items() for r in rs) + "</ul></body></html>")
    (out / "index.html").write_text("\n".join(page), encoding="utf-8")
    return summary
