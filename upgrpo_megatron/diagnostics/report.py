"""The routing-mismatch report of a run directory (`tools/routing_report.py RUN_DIR [--out DIR]`).

Writes into OUT (default RUN_DIR/report): `index.html` (self-contained: figures embedded as base64 PNG, no
script, no external resource, opens offline), the figures as PNG files, and `summary.md`. Every piece of text
that comes from the run (metric names, config values, prompts, responses) is HTML-escaped. Missing pieces
(no diagnostics saved, no samples, no config) are stated in the report instead of failing.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from matplotlib.ticker import MaxNLocator

from upgrpo_megatron.diagnostics.run_files import (
    ReportError,  # noqa: F401 (re-export: callers catch it from here)
    config_get,
    fmt,
    pyplot,
    read_config,
    read_jsonl,
    read_metrics,
    require_run_dir,
    save_figure,
    series,
)
from upgrpo_megatron.diagnostics.storage import DiagnosticsReader

TITLE = "Routing-mismatch report"
# curve panels: (panel title, [(metric key, legend label), ...]); a panel is drawn when any key has data
CURVE_PANELS = [
    ("validation accuracy", [("val/acc", "val/acc")]),
    ("training reward", [("critic/score/mean", "score")]),
    ("policy entropy", [("actor/entropy", "entropy")]),
    ("KL during update", [("actor/ppo_kl", "ppo_kl (pi_old || pi_theta)"), ("actor/kl_loss", "KL to ref")]),
    ("clip fractions", [("actor/pg_clipfrac", "pg_clipfrac"), ("actor/pg_clipfrac_lower", "pg_clipfrac_lower"),
                        ("up/pos_ratio_above_clip_frac", "A>0 above 1+eps_high (UP keeps them)")]),
    ("routing mismatch, train vs rollout", [("mismatch/routing/pair_frac", "(token, layer) pairs"),
                                            ("mismatch/routing/token_any_frac", "tokens with >=1 layer"),
                                            ("routing/drift/pair_frac", "drift pi_old -> pi_theta (pairs)")]),
    ("routing agreement", [("mismatch/routing/jaccard", "Jaccard"), ("mismatch/routing/top1_agree", "top-1 agree")]),
    ("probability gap", [("mismatch/token_mult_prob_error", "token_mult_prob_error"),
                         ("mismatch/exp_mean_abs_log_prob_diff", "exp(mean |dlogp|)")]),
    ("KL / JS train vs rollout", [("mismatch/kl_k3_rollout_train", "k3 KL(rollout||train)"),
                                  ("mismatch/kl_k3_train_rollout", "k3 KL(train||rollout)"),
                                  ("mismatch/js_divergence", "JS")]),
    ("extreme tokens F(tau)", [("mismatch/extreme_token_frac_tau2", "tau=2"), ("mismatch/extreme_token_frac_tau5", "tau=5"),
                               ("mismatch/extreme_token_frac_tau10", "tau=10")]),
    ("pi_old/pi_rollout variance by advantage sign", [("mismatch/ratio/adv_pos/var", "A>0"),
                                                      ("mismatch/ratio/adv_nonpos/var", "A<=0")]),
    ("update ratio pi_theta/pi_old variance by advantage sign", [("routing/update_ratio/adv_pos/var", "A>0 (unused by UP-GRPO)"),
                                                                ("routing/update_ratio/adv_nonpos/var", "A<=0 (clipped)")]),
    ("importance weights", [("mismatch/is_ratio_ess_frac", "ESS / N"), ("mismatch/is_ratio_chi2", "chi2")]),
]
# the last-step table: what peers (NeMo-RL, slime, R3 paper) report, under our names
KEY_METRICS = [
    "val/acc", "actor/ppo_kl", "actor/entropy", "actor/pg_clipfrac", "mismatch/routing/pair_frac",
    "mismatch/routing/token_any_frac", "mismatch/routing/layers_per_token", "mismatch/routing/jaccard",
    "mismatch/routing/top1_agree", "mismatch/routing/flip_margin_mean", "mismatch/routing/stable_margin_mean",
    "routing/drift/pair_frac", "mismatch/token_mult_prob_error", "mismatch/exp_mean_abs_log_prob_diff",
    "mismatch/abs_prob_diff_max", "mismatch/kl_k3_rollout_train", "mismatch/kl_k3_train_rollout",
    "mismatch/js_divergence", "mismatch/is_ratio_mean", "mismatch/is_ratio_chi2", "mismatch/is_ratio_ess_frac",
    "mismatch/extreme_token_frac_tau2", "mismatch/extreme_token_frac_tau5", "mismatch/extreme_token_frac_tau10",
    "routing/rollout_capture/invalid_pairs", "routing/train_load/max_over_mean", "routing/rollout_load/max_over_mean",
]
N_SAMPLES = 12
N_TOP = 10


def _curves(plt, metrics: List[dict], out: Path) -> Optional[Tuple[str, str, str]]:
    panels = []
    for title, keys in CURVE_PANELS:
        lines = [(label, *series(metrics, k)) for k, label in keys]
        lines = [ln for ln in lines if ln[1]]
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.2 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
        ax.tick_params(labelsize=8)
        if len(lines) > 1 or lines[0][0] != title:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return ("Curves over steps", save_figure(fig, out / "curves.png"), "from metrics.jsonl; one point per RL step")


def _pooled_ratio(reader: DiagnosticsReader, prefix: str) -> Optional[Dict[str, np.ndarray]]:
    """Pool `{prefix}_count/mean/var` `[L, E, 2, 2]` over steps (exactly, from sums) -> dict of `[L, E, 2, 2]`."""
    c = reader.stack(f"{prefix}_count")
    mu = reader.stack(f"{prefix}_mean")
    var = reader.stack(f"{prefix}_var")
    out_f = reader.stack(f"{prefix}_outside_frac")
    if c is None or mu is None or var is None or len(c[0]) != len(mu[0]) or len(c[0]) != len(var[0]):
        return None
    cnt, m, v = c[1], mu[1] - 1, var[1]  # centred at r = 1, as RatioStats does, to keep tiny variances
    s1, s2 = (cnt * m).sum(0), (cnt * (v + m * m)).sum(0)
    n = cnt.sum(0)
    res = {"count": n, "s1": s1, "s2": s2}
    if out_f is not None and len(out_f[0]) == len(c[0]):
        res["n_out"] = (cnt * out_f[1]).sum(0)
    return res


def _mean_var(pooled: Dict[str, np.ndarray], axes: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, s1, s2 = (pooled[k].sum(axes) if axes else pooled[k] for k in ("count", "s1", "s2"))
    safe = np.maximum(n, 1)
    mx = s1 / safe  # mean of r - 1
    var = np.where(n > 0, np.maximum(s2 / safe - mx * mx, 0), np.nan)
    return n, np.where(n > 0, 1 + mx, np.nan), var


def _heatmap(ax, fig, data: np.ndarray, title: str, cmap: str) -> None:
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert", fontsize=9)
    ax.set_ylabel("MoE layer", fontsize=9)
    L, E = data.shape
    ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_yticks(range(0, L, max(1, L // 16)))
    ax.tick_params(labelsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def _heatmaps(plt, reader: DiagnosticsReader, out: Path):
    """Layer x expert heatmaps: flip rate (train vs rollout, drift) and ratio variance (train/rollout, update)."""
    panels = []
    for key, title in (("mismatch_expert_flip_rate", "expert flip rate, train vs rollout"),
                       ("drift_expert_flip_rate", "expert flip rate, pi_old -> pi_theta")):
        st = reader.stack(key)
        if st is not None:
            panels.append((np.nanmean(st[1], axis=0), f"{title} (mean of {len(st[0])} steps)", "magma"))
    for prefix, title in (("train_rollout_ratio", "variance of pi_old/pi_rollout"),
                          ("update_ratio", "variance of pi_theta/pi_old")):
        pooled = _pooled_ratio(reader, prefix)
        if pooled is not None:
            panels.append((_mean_var(pooled, (2, 3))[2], f"{title} per expert (all steps)", "viridis"))
    st = reader.stack("mismatch_layer_pair_frac")
    if st is not None and len(st[0]) > 1:
        panels.append((st[1].T, "mismatch rate per layer over steps (x: step index)", "magma"))
    if not panels:
        return None
    cols = 2
    rows = (len(panels) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.6 * rows), squeeze=False)
    for ax, (data, title, cmap) in zip(axes.flat, panels):
        _heatmap(ax, fig, data, title, cmap)
        if title.startswith("mismatch rate per layer"):
            ax.set_xlabel("diagnostic step index", fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return ("Layer x expert heatmaps", save_figure(fig, out / "heatmaps.png"),
            "flip rate = tokens where exactly one side chose the expert / tokens where either side chose it; "
            "variance pooled over all steps, advantage signs and routing match (white: expert never chosen)")


def _histograms(plt, reader: DiagnosticsReader, out: Path):
    rows = []
    for key, what in (("hist_train_rollout", "log(pi_old / pi_rollout)"), ("hist_update", "log(pi_theta / pi_old)")):
        st = reader.stack(key)
        edges = reader.stack("hist_edges")
        if st is not None and edges is not None:
            rows.append((st[1].sum(0), edges[1][0], what))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 3.4 * len(rows)), squeeze=False)
    for (h, edges, what), (ax_adv, ax_match) in zip(rows, axes):
        used = np.nonzero(h.sum((0, 1)))[0]  # show the occupied range only (plus one bin each side)
        lo, hi = (edges[max(used[0] - 1, 0)], edges[min(used[-1] + 2, len(edges) - 1)]) if len(used) else (-1, 1)
        for counts, label in ((h[0].sum(0), "A>0"), (h[1].sum(0), "A<=0")):
            if counts.sum():
                ax_adv.stairs(counts, edges, label=f"{label} ({int(counts.sum())} tokens)", lw=1.5)
        for counts, label in ((h[:, 0].sum(0), "routing matched"), (h[:, 1].sum(0), "routing mismatched")):
            if counts.sum():
                ax_match.stairs(counts, edges, label=f"{label} ({int(counts.sum())} tokens)", lw=1.5)
        for ax, split in ((ax_adv, "by advantage sign"), (ax_match, "by routing match")):
            ax.set_xscale("symlog", linthresh=1e-6)
            ax.set_xlim(lo, hi)
            ax.set_yscale("log")
            ax.set_title(f"{what} {split}, all steps", fontsize=10)
            ax.set_xlabel(what + " (symlog)", fontsize=9)
            ax.set_ylabel("tokens", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return ("Log-ratio histograms", save_figure(fig, out / "log_ratio_hist.png"),
            "UP-GRPO's positive branch (A>0) does not use the ratio; its negative branch clips it")


def _top_experts(reader: DiagnosticsReader) -> List[dict]:
    st = reader.stack("mismatch_expert_flip_rate")
    if st is None:
        return []
    flip = np.nanmean(st[1], axis=0)
    rows = []
    pooled = _pooled_ratio(reader, "train_rollout_ratio")
    var = _mean_var(pooled, (2, 3))[2] if pooled is not None and pooled["count"].shape[:2] == flip.shape else None
    pos_var = neg_var = None
    if var is not None:
        _, _, by_adv = _mean_var(pooled, (3,))  # [L, E, 2]
        pos_var, neg_var = by_adv[..., 0], by_adv[..., 1]
    chosen = reader.stack("mismatch_expert_chosen_a")
    order = np.argsort(-np.nan_to_num(flip, nan=-1), axis=None)[:N_TOP]
    for flat in order:
        layer, expert = np.unravel_index(flat, flip.shape)
        if not np.isfinite(flip[layer, expert]) or flip[layer, expert] <= 0:
            break
        rows.append({"layer": int(layer), "expert": int(expert), "flip_rate": float(flip[layer, expert]),
                     "tokens_train": float(chosen[1][:, layer, expert].sum()) if chosen is not None else float("nan"),
                     "ratio_var": float(var[layer, expert]) if var is not None else float("nan"),
                     "ratio_var_pos": float(pos_var[layer, expert]) if pos_var is not None else float("nan"),
                     "ratio_var_neg": float(neg_var[layer, expert]) if neg_var is not None else float("nan")})
    return rows


def _table(header: List[str], rows: List[List[str]]) -> str:
    """HTML table; cells are escaped here, so callers pass raw text."""
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    esc = lambda c: c.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(esc(c) for c in r) + " |" for r in rows]


CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222}"
       "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top;text-align:left}"
       "table{border-collapse:collapse;margin-bottom:1em}img{max-width:100%}"
       "pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:480px}.note{background:#fff6d8;padding:6px}")


def render_report(run_dir, out_dir=None) -> Path:
    """Render the report of RUN_DIR into out_dir (default RUN_DIR/report); returns the path of index.html.

    Raises ReportError (one line) when RUN_DIR does not exist or has no metrics.jsonl."""
    run = require_run_dir(run_dir)
    out = Path(out_dir) if out_dir else run / "report"
    metrics, bad_lines = read_metrics(run)  # every input is read before the output directory is made
    cfg = read_config(run)
    reader = DiagnosticsReader(run)
    samples, _ = read_jsonl(run / "samples.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("curves.png", "heatmaps.png", "log_ratio_hist.png"):  # a figure this run lacks must not linger
        (out / stale).unlink(missing_ok=True)
    plt = pyplot()
    notes: List[str] = []
    if not metrics:
        notes.append("metrics.jsonl holds no step records yet.")
    if bad_lines:
        notes.append(f"{bad_lines} line(s) of metrics.jsonl could not be read and were skipped.")
    if cfg is None:
        notes.append("No readable config.yaml in the run directory.")
    if not len(reader):
        notes.append("No per-step diagnostics were saved in this run (diagnostics/ is empty or absent; "
                     "diagnostics.enabled=false?): the heatmaps, histograms and expert table are left out.")
    figures = []
    for make in (lambda: _curves(plt, metrics, out), lambda: _heatmaps(plt, reader, out),
                 lambda: _histograms(plt, reader, out)):
        fig = make()
        if fig is not None:
            figures.append(fig)
    if reader.skipped:
        notes.append(f"Unreadable diagnostics files skipped: {', '.join(reader.skipped)}.")
    if len(reader) and not any(f[0] == "Layer x expert heatmaps" for f in figures):
        notes.append("The saved diagnostics hold no routing arrays (routing was not captured or recorded).")
    top = _top_experts(reader)
    last = metrics[-1] if metrics else {}
    key_rows = [[k, fmt(last[k])] for k in KEY_METRICS if isinstance(last.get(k), (int, float))]
    capture_bad = [(r["step"], r.get("routing/rollout_capture/invalid_pairs")) for r in metrics
                   if (r.get("routing/rollout_capture/invalid_pairs") or 0) > 0
                   or (r.get("routing/rollout_capture/all_zero_layers") or 0) > 0]
    top_header = ["layer", "expert", "flip rate", "tokens (trainer)", "var pi_old/pi_rollout", "var A>0", "var A<=0"]
    top_rows = [[str(r["layer"]), str(r["expert"]), fmt(r["flip_rate"]), fmt(r["tokens_train"]), fmt(r["ratio_var"]),
                 fmt(r["ratio_var_pos"]), fmt(r["ratio_var_neg"])] for r in top]
    loss_mode = config_get(cfg, "algorithm.loss_mode", "unknown")

    # ---- HTML
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>", f"<title>{TITLE}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{TITLE}</h1>",
             f"<p>run: <code>{html.escape(str(run))}</code> &middot; loss_mode: <code>{html.escape(str(loss_mode))}</code>"
             f" &middot; {len(metrics)} step records &middot; {len(reader)} diagnostic steps</p>"]
    parts += [f"<p class='note'><b>note:</b> {html.escape(n)}</p>" for n in notes]
    if key_rows:
        parts.append(f"<h2>Last step ({html.escape(str(last.get('step')))})</h2>" + _table(["metric", "value"], key_rows))
    for title, b64, caption in figures:
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{b64}'><p><small>{html.escape(caption)}</small></p>")
    if top_rows:
        parts.append("<h2>Top offending experts</h2>" + _table(top_header, top_rows))
    parts.append("<h2>Capture validity</h2>")
    if capture_bad:
        parts.append(_table(["step", "invalid (token, layer) pairs"], [[str(s), fmt(v)] for s, v in capture_bad]))
    elif any("routing/rollout_capture/valid" in r for r in metrics):
        parts.append("<p>Every captured rollout route was valid (no missing, duplicate or out-of-range ids, "
                     "no all-zero layer).</p>")
    else:
        parts.append("<p>No capture-validity metrics in this run (rollout routing was not captured).</p>")
    parts.append("<h2>Sample rollouts</h2>")
    if samples:
        shown = samples[-N_SAMPLES:]
        parts.append(_table(["step", "prompt", "response", "reward"],
                            [[str(s.get("step")), str(s.get("prompt", "")), str(s.get("response", "")),
                              str(s.get("reward"))] for s in shown]).replace("<td>", "<td><pre>").replace("</td>", "</pre></td>"))
    else:
        parts.append("<p>No samples.jsonl in this run.</p>")
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")

    # ---- markdown summary
    md = [f"# {TITLE}", "", f"run: `{run}` · loss_mode: `{loss_mode}` · {len(metrics)} step records · "
          f"{len(reader)} diagnostic steps", ""]
    md += [f"> note: {n}" for n in notes]
    if key_rows:
        md += ["", f"## Last step ({last.get('step')})", ""] + _md_table(["metric", "value"], key_rows)
    if top_rows:
        md += ["", "## Top offending experts", ""] + _md_table(top_header, top_rows)
    md += ["", "## Capture validity", "",
           (f"{len(capture_bad)} step(s) with invalid routes: " + ", ".join(str(s) for s, _ in capture_bad))
           if capture_bad else "no invalid routes recorded"]
    md += [""] + [f"![{t}]({p.name})" for t, p in (("curves", out / "curves.png"), ("heatmaps", out / "heatmaps.png"),
                                                   ("log-ratio histograms", out / "log_ratio_hist.png")) if p.exists()]
    (out / "summary.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return index
