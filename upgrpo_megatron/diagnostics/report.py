"""The routing-mismatch report of a run directory: one self-contained HTML file (images embedded), the same
figures as PNG files, and a markdown summary. All text that comes from data is HTML-escaped."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from upgrpo_megatron.errors import UpgrpoError

CURVES = [
    ("val/acc", "validation accuracy"),
    ("critic/score/mean", "training reward"),
    ("actor/entropy", "policy entropy"),
    ("actor/ppo_kl", "KL(pi_old || pi_theta) during update"),
    ("actor/pg_clipfrac", "clip fraction"),
    ("mismatch/routing/pair_frac", "train vs rollout: mismatched (token, layer) pairs"),
    ("mismatch/routing/token_any_frac", "train vs rollout: tokens with >= 1 mismatched layer"),
    ("mismatch/token_mult_prob_error", "token multiplicative prob error exp(mean|Δlog p|)"),
    ("routing/drift/pair_frac", "routing drift pi_old -> pi_theta (pairs)"),
    ("up/pos_ratio_above_clip_frac", "positive tokens above 1+eps_high (UP keeps them)"),
]
GROUPS = ["A>0 matched", "A>0 mismatched", "A<=0 matched", "A<=0 mismatched"]


class ReportError(UpgrpoError, ValueError):
    """The run directory cannot be reported on."""


def _fig_to_png(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(path.read_bytes()).decode()


def _read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def render_report(run_dir, out_dir=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from upgrpo_megatron.diagnostics.step import read_diagnostics

    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory")
    metrics = _read_jsonl(run / "metrics.jsonl")
    if not (run / "metrics.jsonl").exists():
        raise ReportError(f"{run}: no metrics.jsonl (is this a run directory?)")
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures: List[tuple] = []  # (title, base64 png, caption)
    notes: List[str] = []

    # 1. curves over steps
    present = [(k, t) for k, t in CURVES if any(r.get(k) is not None for r in metrics)]
    if present:
        cols = 2
        rows = (len(present) + 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(11, 2.6 * rows), squeeze=False)
        for ax, (k, t) in zip(axes.flat, present):
            pts = [(r["step"], r[k]) for r in metrics if r.get(k) is not None and r["step"] >= 0]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(present):]:
            ax.axis("off")
        fig.tight_layout()
        figures.append(("Curves over steps", _fig_to_png(fig, out / "curves.png"), "metrics.jsonl"))
    diags = read_diagnostics(run)
    summary_rows = []
    if not diags:
        notes.append("No per-step diagnostics were saved in this run (diagnostics.enabled=false?).")
    else:
        steps = sorted(diags)
        last = diags[steps[-1]]
        # 2. heatmaps: mismatch rate and ratio variance per layer x expert
        flip = np.mean([diags[s]["mismatch_expert_flip_rate"] for s in steps if "mismatch_expert_flip_rate" in diags[s]], axis=0)
        var = last.get("train_rollout_ratio_var")
        cnt = last.get("train_rollout_ratio_count")
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
        im = axes[0].imshow(flip, aspect="auto", cmap="magma")
        axes[0].set_title("expert flip rate, train vs rollout (mean over steps)", fontsize=9)
        fig.colorbar(im, ax=axes[0])
        if var is not None:
            pooled = (var * cnt).sum(-1) / np.maximum(cnt.sum(-1), 1)
            im = axes[1].imshow(pooled, aspect="auto", cmap="viridis")
            axes[1].set_title(f"variance of pi_old/pi_rollout per expert (step {steps[-1]})", fontsize=9)
            fig.colorbar(im, ax=axes[1])
        for ax in axes:
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
        fig.tight_layout()
        figures.append(("Layer x expert heatmaps", _fig_to_png(fig, out / "heatmaps.png"),
                        "flip rate = tokens where exactly one side chose the expert / tokens where either did"))
        # 3. log-ratio histograms split by advantage sign and by routing match
        if "hist_log_ratio_train_rollout" in last:
            lr = last["hist_log_ratio_train_rollout"]
            pos, mis = last["hist_adv_positive"] > 0, last["hist_token_mismatched"] > 0
            fig, axes = plt.subplots(1, 2, figsize=(11, 3))
            bins = np.linspace(min(lr.min(initial=0), -0.05), max(lr.max(initial=0), 0.05), 40)
            for sel, lab in ((pos, "A>0"), (~pos, "A<=0")):
                if sel.any():
                    axes[0].hist(lr[sel], bins=bins, alpha=0.6, label=lab, log=True)
            for sel, lab in ((~mis, "routing matched"), (mis, "routing mismatched")):
                if sel.any():
                    axes[1].hist(lr[sel], bins=bins, alpha=0.6, label=lab, log=True)
            for ax, t in zip(axes, ("by advantage sign", "by routing match")):
                ax.set_title(f"log(pi_old/pi_rollout) {t}", fontsize=9)
                ax.legend(fontsize=8)
            fig.tight_layout()
            figures.append(("Log-ratio histograms", _fig_to_png(fig, out / "log_ratio_hist.png"), f"step {steps[-1]}"))
        # 4. top offending experts
        order = np.dstack(np.unravel_index(np.argsort(-flip, axis=None), flip.shape))[0][:10]
        for layer, expert in order:
            summary_rows.append((int(layer), int(expert), float(flip[layer, expert])))
    samples = _read_jsonl(run / "samples.jsonl")[-12:]
    # HTML
    last_m = next((r for r in reversed(metrics) if r.get("step", -1) >= 0), {})
    key_metrics = {k: last_m.get(k) for k, _ in CURVES if last_m.get(k) is not None}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Routing-mismatch report</title>",
        "<style>body{font-family:sans-serif;max-width:1150px;margin:auto;padding:1em}td,th{border:1px solid #ccc;"
        "padding:3px 6px;font-size:13px}table{border-collapse:collapse}img{max-width:100%}pre{white-space:pre-wrap}</style>",
        "</head><body>", f"<h1>Routing-mismatch report</h1><p>run: <code>{html.escape(str(run))}</code>, "
        f"{len(metrics)} metric records, {len(diags)} diagnostic steps</p>",
    ]
    parts += [f"<p><b>note:</b> {html.escape(n)}</p>" for n in notes]
    if key_metrics:
        parts.append("<h2>Last step</h2><table><tr><th>metric</th><th>value</th></tr>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in key_metrics.items()) + "</table>")
    for title, b64, caption in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{b64}'>"
                     f"<p><small>{html.escape(caption)}</small></p>")
    if summary_rows:
        parts.append("<h2>Top offending experts</h2><table><tr><th>layer</th><th>expert</th><th>flip rate</th></tr>" +
                     "".join(f"<tr><td>{l}</td><td>{e}</td><td>{r:.3f}</td></tr>" for l, e, r in summary_rows) + "</table>")
    if samples:
        parts.append("<h2>Sample rollouts</h2><table><tr><th>step</th><th>prompt</th><th>response</th><th>reward</th></tr>" +
                     "".join(f"<tr><td>{s.get('step')}</td><td><pre>{html.escape(str(s.get('prompt', '')))}</pre></td>"
                             f"<td><pre>{html.escape(str(s.get('response', '')))}</pre></td><td>{html.escape(str(s.get('reward')))}</td></tr>"
                             for s in samples) + "</table>")
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))
    md = ["# Routing-mismatch report", "", f"run: `{run}`", ""]
    md += [f"- {k}: {v:.4g}" for k, v in key_metrics.items()]
    if summary_rows:
        md += ["", "| layer | expert | flip rate |", "|---|---|---|"] + [f"| {l} | {e} | {r:.3f} |" for l, e, r in summary_rows]
    md += ["", *[f"![{t}]({f})" for t, f in (("curves", "curves.png"), ("heatmaps", "heatmaps.png"), ("log-ratio", "log_ratio_hist.png")) if (out / f).exists()]]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return out / "index.html"
