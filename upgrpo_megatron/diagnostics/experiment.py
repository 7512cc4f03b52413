"""Results of an experiment (`tools/run_experiment.py`): per arm, per pair of arms, over seeds.

Per run (from metrics.jsonl):
    final_acc       mean of the last 4 greedy evals (val/acc): less noisy than the last one, unbiased unlike a peak
    final_mean@k    the same for val/mean@k (k samples per problem at the training temperature), when logged
    start_acc / start_mean@k   the evals of the post-SFT model (step 0); gain@k = final_mean@k - start_mean@k
    auc             area under the val/mean@k curve (val/acc when absent) over the RL steps, divided by their number
    peak_acc        the highest greedy eval (biased upwards: the max of noisy evals; reported, not compared)
    kl_ref          mean KL to the reference (actor/kl_loss) over the last 10 steps
    entropy         mean actor/entropy over the last 10 steps
    clipfrac        mean actor/pg_clipfrac; pos_above_clip: mean late/pos/ratio_above_clip_frac (A > 0 tokens whose
                    ratio exceeds 1 + eps_high in a step's later updates: the tokens DAPO discards and UP-GRPO keeps)
    ratio_var_pos / ratio_var_neg   mean variance of the ratio the loss uses, over A > 0 / A <= 0 tokens
    mismatch        mean routing mismatch engine vs trainer (share of (token, layer) pairs)
Per arm: mean and 95% t-interval over seeds. Per arm vs the block's baseline: the paired difference (same seed,
same post-SFT model) with its 95% t-interval; an interval that excludes 0 is a difference the seeds support.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from upgrpo_megatron.diagnostics.run_files import pyplot, read_metrics, save_figure, series

# two-sided 95% quantiles of Student's t, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df <= 0:
        return float("nan")
    keys = sorted(_T975)
    return _T975[max(k for k in keys if k <= df)] if df < 30 else 1.96


def mean_ci(xs: Sequence[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width NaN with one value."""
    v = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    return float(v.mean()), float(t975(v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def _mean_last(rows: List[dict], key: str, n: int) -> Optional[float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(np.mean(vals[-n:])) if vals else None


def run_stats(run_dir: Path, k: int = 8) -> Dict[str, Optional[float]]:
    rows, _ = read_metrics(Path(run_dir))
    rl = [r for r in rows if r.get("step", 0) > 0]
    xs, acc = series(rows, "val/acc")
    mxs, mean_k = series(rows, f"val/mean@{k}")
    cx, cy = (mxs, mean_k) if mean_k else (xs, acc)
    auc = float(np.trapezoid(cy, cx) / (cx[-1] - cx[0])) if len(cx) > 1 and cx[-1] > cx[0] else None
    return {
        "final_acc": float(np.mean(acc[-4:])) if acc else None,
        f"final_mean@{k}": float(np.mean(mean_k[-4:])) if mean_k else None,
        "auc": auc,
        "peak_acc": float(max(acc)) if acc else None,
        "start_acc": float(acc[0]) if acc and xs[0] == 0 else None,
        f"start_mean@{k}": float(mean_k[0]) if mean_k and mxs[0] == 0 else None,
        f"gain@{k}": float(np.mean(mean_k[-4:]) - mean_k[0]) if mean_k and mxs[0] == 0 else None,
        "kl_ref": _mean_last(rl, "actor/kl_loss", 10),
        "entropy": _mean_last(rl, "actor/entropy", 10),
        "clipfrac": _mean_last(rl, "actor/pg_clipfrac", len(rl)),
        "pos_above_clip": _mean_last(rl, "late/pos/ratio_above_clip_frac", len(rl)),
        "ratio_var_pos": _mean_last(rl, "ratio/pos_var", len(rl)),
        "ratio_var_neg": _mean_last(rl, "ratio/neg_var", len(rl)),
        "mismatch": _mean_last(rl, "mismatch/routing/pair_frac", len(rl)),
    }


METRICS = ["start_acc", "start_mean@8", "final_acc", "final_mean@8", "gain@8", "auc", "peak_acc", "kl_ref", "entropy",
           "clipfrac", "pos_above_clip",
           "ratio_var_pos", "ratio_var_neg", "mismatch"]
COMPARED = ["final_acc", "final_mean@8", "auc"]  # the paired differences reported per arm


def _fmt(m: float, h: float, small: bool = False) -> str:
    if not math.isfinite(m):
        return "–"
    f = "{:.2e}" if small or (m != 0 and abs(m) < 1e-3) else "{:.3f}"
    return f.format(m) + (f" ± {f.format(h)}" if math.isfinite(h) else "")


def block_tables(block: str, baseline: str, arms: Dict[str, Dict[int, Dict]]) -> Tuple[List[str], List[List[str]]]:
    """Markdown lines and CSV rows for one block: per arm means ± 95% CI, then paired differences."""
    lines = [f"### Block {block}", "", "| arm | seeds | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    csv_rows = []
    for arm, by_seed in arms.items():
        cells = []
        for key in METRICS:
            m, h = mean_ci([s.get(key) for s in by_seed.values()])
            cells.append(_fmt(m, h, small=key.startswith(("ratio_var", "kl"))))
            csv_rows.append([block, arm, key, "mean", m, h, len(by_seed)])
        lines.append(f"| {arm} | {len(by_seed)} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences vs **{baseline}** (same seed, same post-SFT model; mean ± 95% t-interval "
              f"over seeds; **bold**: the interval excludes 0):", "",
              "| arm | " + " | ".join(f"Δ {k}" for k in COMPARED) + " |", "|---|" + "---|" * len(COMPARED)]
    base = arms.get(baseline, {})
    for arm, by_seed in arms.items():
        if arm == baseline:
            continue
        cells = []
        for key in COMPARED:
            d = [by_seed[s][key] - base[s][key] for s in by_seed if s in base
                 and by_seed[s].get(key) is not None and base[s].get(key) is not None]
            m, h = mean_ci(d)
            cell = _fmt(m, h)
            if math.isfinite(h) and (m - h > 0 or m + h < 0):
                cell = f"**{cell}**"
            cells.append(cell)
            csv_rows.append([block, arm, key, f"diff_vs_{baseline}", m, h, len(d)])
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""], csv_rows


FIGURE_PANELS = [("val/mean@8", "val/mean@8 (8 samples per problem, T = 1)"), ("val/acc", "val/acc (greedy)"),
                 ("actor/kl_loss", "KL to the reference"), ("actor/entropy", "entropy"),
                 ("ratio/pos_var", "var of the loss's ratio, A > 0"),
                 ("ratio/neg_var", "var of the loss's ratio, A <= 0"),
                 ("mismatch/routing/pair_frac", "routing mismatch engine vs trainer")]


def block_figure(block: str, runs: Dict[str, List[Path]], out: Path) -> str:
    """Curves of every arm of a block (mean over seeds, band min..max)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, FIGURE_PANELS):
        for i, (arm, dirs) in enumerate(runs.items()):
            curves = [series(read_metrics(d)[0], key) for d in dirs]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            steps = sorted(set.intersection(*[set(c[0]) for c in curves]))
            if not steps:
                continue
            ys = np.array([[dict(zip(*c))[s] for s in steps] for c in curves])
            c = colors[i % len(colors)]
            ax.plot(steps, ys.mean(0), color=c, label=arm, lw=1.5)
            if len(curves) > 1:
                ax.fill_between(steps, ys.min(0), ys.max(0), color=c, alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.suptitle(f"block {block}: mean over seeds, band = min..max", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out / f"block_{block}.png")


def write_results(blocks: Sequence[Tuple[str, str, str, Dict[str, List[Path]]]], out: Path) -> Path:
    """blocks: (name, description, baseline, {arm: [run dirs, one per seed]}). Writes OUT/results.md, .csv, PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, rows = ["# Experiment results", ""], []
    for name, description, baseline, runs in blocks:
        stats = {arm: {int(d.name.replace("seed", "")): run_stats(d) for d in dirs} for arm, dirs in runs.items()}
        lines, r = block_tables(name, baseline, stats)
        md += [description, ""] if description else []
        md += lines + [f"![block {name}](block_{name}.png)", ""]
        rows += r
        block_figure(name, runs, out)
    (out / "results.md").write_text("\n".join(md))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["block", "arm", "metric", "what", "value", "ci95_half_width", "n"])
        w.writerows(rows)
    return out / "results.md"
