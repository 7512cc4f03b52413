"""The routing report's figures: curves over steps, layer x expert heatmaps, ratio variance by advantage sign,
log-ratio histograms. Each is written as a PNG and returned with the definition printed under it.

A panel whose values are all exactly zero (or one, for agreement-like quantities) or within `NOISE` of it is
drawn as a sentence saying so: a flat line on an axis of ±0.04, or a uniform heatmap with a ±0.1 colour bar,
only shows matplotlib's default scaling of float noise. The same sentences are returned in
`Figure.statements`, so the HTML and markdown say what the PNG says; a figure whose every panel would be a
sentence is not drawn at all (its statements stand in the pages instead).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.ticker import MaxNLocator

from upgrpo_megatron.diagnostics.report_data import NOISE, NOISE_TEXT, ExpertStats, flatness, max_deviation
from upgrpo_megatron.diagnostics.run_files import save_figure, series
from upgrpo_megatron.diagnostics.storage import DiagnosticsReader

SAME_ROUTES = "the engine and trainer route identically"
NO_DRIFT = "no token changed experts during the update (routing replay, or weights that moved too little)"


@dataclass
class Figure:
    title: str
    png: Optional[Path]  # None: every panel would be a sentence, so no image is drawn, only the statements
    b64: Optional[str]
    definition: str  # one or two sentences printed under the figure
    statements: List[str] = field(default_factory=list)  # "panel: all zero: ..." for panels drawn as text


# curve panels: (title, [(metric key, legend label, value meaning "nothing"), ...], what all-that-value means)
CURVE_PANELS = [
    ("validation accuracy", [("val/acc", "val/acc", 0.0)], None),
    ("training reward", [("critic/score/mean", "mean score", 0.0)], None),
    ("policy entropy", [("actor/entropy", "entropy", 0.0)], None),
    ("KL during the update", [("actor/ppo_kl", "KL(π_old ‖ π_θ)", 0.0), ("actor/kl_loss", "KL to reference", 0.0)],
     "the policy did not move"),
    ("clip fractions", [("actor/pg_clipfrac", "pg_clipfrac", 0.0), ("actor/pg_clipfrac_lower", "dual clip", 0.0),
                        ("up/pos_ratio_above_clip_frac", "A>0 above 1+ε_high (UP keeps them)", 0.0)],
     "no token's r left the clip range"),
    ("routing mismatch, trainer vs engine", [("mismatch/routing/pair_frac", "(token, layer) pairs", 0.0),
                                             ("mismatch/routing/token_any_frac", "tokens with ≥1 layer", 0.0),
                                             ("routing/drift/pair_frac", "drift π_old → π_θ (pairs)", 0.0)],
     SAME_ROUTES + ", and no route changed during the update"),
    ("routing agreement", [("mismatch/routing/jaccard", "Jaccard", 1.0),
                           ("mismatch/routing/top1_agree", "top-1 agree", 1.0)],
     SAME_ROUTES),
    ("probability gap", [("mismatch/token_mult_prob_error", "mean exp|log w|", 1.0),
                         ("mismatch/exp_mean_abs_log_prob_diff", "exp mean |log w|", 1.0)],
     "the engine and trainer give the same probabilities"),
    ("KL / JS trainer vs engine", [("mismatch/kl_k3_rollout_train", "k3 KL(engine ‖ trainer)", 0.0),
                                   ("mismatch/kl_k3_train_rollout", "k3 KL(trainer ‖ engine)", 0.0),
                                   ("mismatch/js_divergence", "JS", 0.0)],
     "the engine and trainer give the same probabilities"),
    ("extreme tokens F(τ)", [("mismatch/extreme_token_frac_tau2", "τ=2", 0.0),
                             ("mismatch/extreme_token_frac_tau5", "τ=5", 0.0),
                             ("mismatch/extreme_token_frac_tau10", "τ=10", 0.0)],
     "no token has max(w, 1/w) above τ"),
    ("variance of w = π_trainer/π_rollout", [("mismatch/ratio/adv_pos/var", "A>0", 0.0),
                                             ("mismatch/ratio/adv_nonpos/var", "A≤0", 0.0)], "w = 1 for every token"),
    ("variance of r = π_θ/π_old", [("routing/update_ratio/adv_pos/var", "A>0 (unused by UP-GRPO)", 0.0),
                                   ("routing/update_ratio/adv_nonpos/var", "A≤0 (clipped)", 0.0)],
     "r = 1 for every token"),
    ("importance weights w", [("mismatch/is_ratio_ess_frac", "ESS / N", 1.0), ("mismatch/is_ratio_chi2", "χ²", 0.0)],
     "w = 1 for every token"),
]
CURVES_DEFINITION = (
    "One point per RL step, from metrics.jsonl. w = π_trainer/π_rollout is the train-inference ratio of a sampled "
    "token, r = π_θ/π_old its ratio during the update; a panel whose values are all exactly 0 (or 1), or within "
    f"{NOISE_TEXT} of it, is replaced by a sentence saying so.")


def flat_statement(values: Sequence[Tuple[np.ndarray, float]], meaning: Optional[str]) -> Optional[str]:
    """The sentence for a panel whose (values, baseline) pairs are all flat, or None when something moves."""
    states = [flatness(v, b) for v, b in values]
    if not states or any(s is None for s in states):
        return None
    base = {b for _, b in values}
    what = "all zero" if base == {0.0} else "all one" if base == {1.0} else "all at their no-difference value"
    if all(s == "zero" for s in states):
        return f"{what}: {meaning}" if meaning else what
    dev = max(max_deviation(v, b) for v, b in values)
    return f"float noise only (every value within {NOISE_TEXT} of {'/'.join(f'{b:g}' for b in sorted(base))}, " \
           f"largest deviation {dev:.1e})" + (f": {meaning}" if meaning else "")


def _text_panel(ax, title: str, text: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("#bbbbbb")
    width = 42 if ax.get_position().width < 0.5 else 90  # characters per line: one panel, or a whole row
    ax.text(0.5, 0.5, textwrap.fill(text, width), ha="center", va="center", fontsize=10, transform=ax.transAxes,
            color="#333333")


def _grid(plt, n: int, cols: int, width: float, row_height: float):
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width, row_height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def curves(plt, metrics: List[dict], out: Path) -> Optional[Figure]:
    panels = []
    for title, keys, meaning in CURVE_PANELS:
        lines = [(label, base, *series(metrics, k)) for k, label, base in keys]
        lines = [ln for ln in lines if ln[2]]
        if lines:
            panels.append((title, lines, flat_statement([(np.array(ln[3]), ln[1]) for ln in lines], meaning)))
    if not panels:
        return None
    fig, axes = _grid(plt, len(panels), 3, 15, 3.2)
    statements = []
    for ax, (title, lines, flat) in zip(axes, panels):
        if flat is not None:
            _text_panel(ax, title, flat)
            statements.append(f"{title}: {flat}")
            continue
        for label, _, xs, ys in lines:
            ax.plot(xs, ys, marker="o", ms=2.5, lw=1.3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are integers
        ax.tick_params(labelsize=8)
        if len(lines) > 1 or lines[0][0] != title:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure("Curves over steps", out / "curves.png", save_figure(fig, out / "curves.png"), CURVES_DEFINITION,
                  statements)


def _heatmap(ax, fig, data: np.ndarray, title: str, cmap: str, vmax: Optional[float] = None,
             xlabel: str = "expert") -> None:
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest",
                   vmin=0 if vmax is not None else None, vmax=vmax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("MoE layer", fontsize=9)
    L, E = data.shape
    ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_yticks(range(0, L, max(1, L // 16)))
    ax.tick_params(labelsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


ROUTING_DEFINITION = (
    "Flip rate of an expert: tokens for which exactly one side chose it, over tokens for which either side chose "
    "it (0: the two sides always agree about this expert), averaged over the diagnostic steps; left trainer vs "
    "engine (routing mismatch), right π_old vs π_θ (drift during the update). The bottom panel is the share of "
    "(token, layer) pairs whose top-k sets differ, per MoE layer and step.")


def routing_heatmaps(plt, s: ExpertStats, out: Path) -> Optional[Figure]:
    n = len(s.steps)
    panels = [(data, title, xlabel, meaning) for data, title, xlabel, meaning in (
        (s.flip, f"flip rate, trainer vs engine (mean of {n} steps)", "expert", SAME_ROUTES),
        (s.drift_flip, f"flip rate, π_old → π_θ (mean of {n} steps)", "expert", NO_DRIFT),
        (s.layer_mismatch.T if s.layer_mismatch is not None and len(s.layer_mismatch) > 1 else None,
         "routing mismatch per layer over steps", "diagnostic step index", SAME_ROUTES),
    ) if data is not None]
    if not panels:
        return None
    flats = [flat_statement([(data, 0.0)], meaning) for data, _, _, meaning in panels]
    statements = [f"{title}: {flat}" for (_, title, _, _), flat in zip(panels, flats) if flat is not None]
    title = "Routing mismatch per layer and expert"
    if all(flats):
        return Figure(title, None, None, ROUTING_DEFINITION, statements)
    fig, axes = _grid(plt, len(panels), 2, 13, 3.6)
    for ax, (data, panel, xlabel, _), flat in zip(axes, panels, flats):
        if flat is not None:
            _text_panel(ax, panel, flat)
        else:
            _heatmap(ax, fig, data, panel, "magma", xlabel=xlabel)
    fig.tight_layout()
    return Figure(title, out / "heatmaps.png", save_figure(fig, out / "heatmaps.png"), ROUTING_DEFINITION, statements)


RATIO_DEFINITION = (
    "Variance of w = π_trainer/π_rollout (top row) and of r = π_θ/π_old (bottom row) over the tokens each expert "
    "served, pooled over all steps and split by the sign of the token's advantage: A > 0 (left; UP-GRPO trains "
    "these without a ratio) and A ≤ 0 (right; the clipped branch). The two panels of a row share one colour scale; "
    "white: the expert served no token of that sign.")
RATIO_ROWS = (("w", "w = π_trainer/π_rollout", "the engine and trainer compute the same probabilities"),
              ("r", "r = π_θ/π_old", "the update did not move these tokens' probabilities measurably"))


def _ratio_statement(var, meaning: str) -> Optional[str]:
    state = var.flatness()
    if state is None:
        return None
    if state == "zero":
        return f"all zero: {meaning}"
    dev = max_deviation(np.sqrt(var.by_sign))
    return f"float noise only (std of the ratio below {NOISE_TEXT} for every expert, largest {dev:.1e}): {meaning}"


def ratio_heatmaps(plt, s: ExpertStats, out: Path) -> Optional[Figure]:
    rows = [(getattr(s, attr), name, meaning) for attr, name, meaning in RATIO_ROWS if getattr(s, attr) is not None]
    if not rows:
        return None
    flats = [_ratio_statement(var, meaning) for var, _, meaning in rows]
    statements = [f"variance of {name}: {flat}" for (_, name, _), flat in zip(rows, flats) if flat is not None]
    title = "Ratio variance per expert, by sign of the advantage"
    if all(flats):
        return Figure(title, None, None, RATIO_DEFINITION, statements)
    drawn = [row for row, flat in zip(rows, flats) if flat is None]  # a flat row is said in words, not drawn
    fig, axes = plt.subplots(len(drawn), 2, figsize=(13, 3.6 * len(drawn)), squeeze=False)
    for (var, name, _), (ax_pos, ax_neg) in zip(drawn, axes):
        vmax = float(np.nanmax(var.by_sign)) if np.isfinite(var.by_sign).any() else None  # one scale per row
        for ax, sign, label in ((ax_pos, 0, "A > 0"), (ax_neg, 1, "A ≤ 0")):
            _heatmap(ax, fig, var.by_sign[..., sign], f"variance of {name}, {label}", "viridis", vmax=vmax)
    fig.tight_layout()
    return Figure(title, out / "ratio_heatmaps.png", save_figure(fig, out / "ratio_heatmaps.png"), RATIO_DEFINITION,
                  statements)


HIST_DEFINITION = (
    "Number of tokens per value of log w (top) and log r (bottom), all steps, split by advantage sign (left) and by "
    "whether the token's routing matched on every layer (right); the x axis is linear within ±1e-6 and "
    "logarithmic beyond, so float noise (~1e-7) and real mismatch (~1e-2) both show.")


def histograms(plt, reader: DiagnosticsReader, out: Path) -> Optional[Figure]:
    edges = reader.stack("hist_edges")
    rows = [(st[1].sum(0), what) for key, what in (("hist_train_rollout", "log w = log π_trainer/π_rollout"),
                                                   ("hist_update", "log r = log π_θ/π_old"))
            if (st := reader.stack(key)) is not None and edges is not None]
    if not rows:
        return None
    edges = edges[1][0]
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 3.4 * len(rows)), squeeze=False)
    for (h, what), (ax_adv, ax_match) in zip(rows, axes):
        used = np.nonzero(h.sum((0, 1)))[0]  # show the occupied range only (plus one bin each side)
        lo, hi = (edges[max(used[0] - 1, 0)], edges[min(used[-1] + 2, len(edges) - 1)]) if len(used) else (-1, 1)
        for counts, label in ((h[0].sum(0), "A>0"), (h[1].sum(0), "A≤0")):
            if counts.sum():
                ax_adv.stairs(counts, edges, label=f"{label} ({int(counts.sum())} tokens)", lw=1.5)
        for counts, label in ((h[:, 0].sum(0), "routing matched"), (h[:, 1].sum(0), "routing mismatched")):
            if counts.sum():
                ax_match.stairs(counts, edges, label=f"{label} ({int(counts.sum())} tokens)", lw=1.5)
        for ax, split in ((ax_adv, "by advantage sign"), (ax_match, "by routing match")):
            ax.set_xscale("symlog", linthresh=NOISE)
            ax.set_xlim(lo, hi)
            ax.set_yscale("log")
            ax.set_title(f"{what}, {split}", fontsize=10)
            ax.set_xlabel(what, fontsize=9)
            ax.set_ylabel("tokens", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    return Figure("Log-ratio histograms", out / "log_ratio_hist.png", save_figure(fig, out / "log_ratio_hist.png"),
                  HIST_DEFINITION)


FIGURE_FILES = ("curves.png", "heatmaps.png", "ratio_heatmaps.png", "log_ratio_hist.png")
