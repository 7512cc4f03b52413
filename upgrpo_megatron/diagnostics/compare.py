"""Compare runs side by side (`tools/compare_runs.py RUN_DIR RUN_DIR ... [--out DIR] [--label NAME=GLOB]`).

Runs are grouped by the config keys in which they differ (RUN_DIR/config.yaml, all keys but `trainer.seed`
and `trainer.run_dir`, which repeats of one experiment are meant to differ in): runs that differ only in those
are seeds of one group, named after its values (e.g. `loss_mode=up_grpo`). When the configs differ in more
than the seed, the comparison says so in a warning that lists the keys and their values, so a difference in
learning rate is not mistaken for a difference between losses. `--label NAME=GLOB` groups by path instead
(a run belongs to the first label whose glob matches its path or its directory name).
Each group is one colour; its seeds are aggregated into a mean line and a min..max band. Curves: validation
accuracy, the KL between the policy before and after each update (and to the reference policy when logged),
entropy, clip fractions and the routing mismatch rates. Writes OUT/compare.png, OUT/index.html
(self-contained) and OUT/summary.md (per group: peak val/acc with its step, final KL, final entropy; mean ± std
over seeds).
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
    ("val/acc", "validation accuracy"),
    ("actor/ppo_kl", "KL(π_old ‖ π_θ) during the update, actor/ppo_kl"),
    ("actor/kl_loss", "KL to the reference policy"),
    ("actor/entropy", "policy entropy"),
    ("actor/pg_clipfrac", "clip fraction"),
    ("actor/pg_clipfrac_lower", "dual-clip (lower) fraction"),
    ("mismatch/routing/pair_frac", "routing mismatch train vs rollout (pairs)"),
    ("routing/drift/pair_frac", "routing drift pi_old -> pi_theta (pairs)"),
    ("mismatch/token_mult_prob_error", "token_mult_prob_error"),
]
KL_REF_KEYS = ("actor/kl_loss",)
# what repeats of one experiment are meant to differ in: any other difference is part of what is compared
SEED_KEYS = ("trainer.seed", "trainer.run_dir")
ABSENT = "(absent)"
MAX_KEYS_LISTED = 6


def flatten(cfg, prefix: str = "") -> Dict[str, str]:
    """Nested config -> {dotted key: value as text}; lists are leaves."""
    if not isinstance(cfg, dict):
        return {prefix: str(cfg)} if prefix else {}
    out: Dict[str, str] = {}
    for k, v in cfg.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.metrics, self.bad_lines = read_metrics(path)
        self.config = read_config(path)
        self.flat = flatten(self.config) if self.config is not None else None
        self.seed = config_get(self.config, "trainer.seed")

    def value(self, key: str) -> str:
        return self.flat.get(key, ABSENT) if self.flat is not None else ABSENT


def differing_keys(runs: Sequence[Run]) -> List[str]:
    """Config keys (but SEED_KEYS) whose value is not the same in every run that has a config, in key order."""
    with_cfg = [r for r in runs if r.flat is not None]
    keys = sorted(set().union(*(r.flat for r in with_cfg))) if with_cfg else []
    return [k for k in keys if k not in SEED_KEYS and len({r.value(k) for r in with_cfg}) > 1]


def _short_names(keys: Sequence[str]) -> Dict[str, str]:
    """The last part of each dotted key (loss_mode, lr), the full key where two would read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def config_warning(runs: Sequence[Run], keys: Sequence[str]) -> Optional[str]:
    """One line when the configs differ in more than SEED_KEYS: the keys and the values each takes."""
    if not keys:
        return None
    with_cfg = [r for r in runs if r.flat is not None]
    listed = [f"{k} ({', '.join(sorted({r.value(k) for r in with_cfg}))})" for k in keys[:MAX_KEYS_LISTED]]
    more = f" and {len(keys) - MAX_KEYS_LISTED} more" if len(keys) > MAX_KEYS_LISTED else ""
    return (f"the runs' configs differ in more than {'/'.join(SEED_KEYS)}: {'; '.join(listed)}{more}. Runs are "
            "grouped by these keys, so each group's spread is over seeds only; check that every difference is one "
            "you meant to compare.")


def parse_labels(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """`NAME=GLOB` strings -> [(name, glob)], in order; a bad spec is a one-line error."""
    out = []
    for s in specs:
        name, sep, glob = s.partition("=")
        if not sep or not name.strip() or not glob.strip():
            raise ReportError(f"--label {s!r}: expected NAME=GLOB, e.g. up_grpo='runs/up_*'")
        out.append((name.strip(), glob.strip()))
    return out


def config_group(run: Run, keys: Sequence[str]) -> str:
    """The group a run belongs to: its values of the differing keys, e.g. "loss_mode=up_grpo, lr=0.001"."""
    if run.flat is None:
        return "no config.yaml"
    if not keys:  # every run has the same config but the seed: one group, named after its loss
        return f"loss_mode={run.value('algorithm.loss_mode')}"
    short = _short_names(keys)
    return ", ".join(f"{short[k]}={run.value(k)}" for k in keys)


def group_runs(runs: List[Run], labels: Sequence[Tuple[str, str]] = (),
               keys: Optional[Sequence[str]] = None) -> Tuple[Dict[str, List[Run]], List[str]]:
    """{group name: runs} in first-seen order, and notes about runs that could not be grouped as asked.
    Without labels, runs are grouped by their values of `keys` (default: the keys in which the configs differ)."""
    keys = differing_keys(runs) if keys is None else keys
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
                notes.append(f"{run.path} matched no --label glob; grouped by its config")
            name = config_group(run, keys)
            if run.flat is None:
                notes.append(f"{run.path} has no readable config.yaml; grouped as 'no config.yaml'")
        groups.setdefault(name, []).append(run)
    if labels:  # a label group whose runs differ in more than the seed averages over that difference
        for name, members in groups.items():
            mixed = differing_keys(members)
            if mixed and len(members) > 1:
                notes.append(f"group {name} mixes runs whose configs differ in {', '.join(mixed[:MAX_KEYS_LISTED])}"
                             + (f" and {len(mixed) - MAX_KEYS_LISTED} more" if len(mixed) > MAX_KEYS_LISTED else ""))
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


def _figure(runs: List[Run], groups: Dict[str, List[Run]], out: Path) -> Optional[str]:
    """compare.png (one panel per metric any run has, a mean line and min..max band per group); base64 or None."""
    panels = [(k, t) for k, t in PANELS if any(series(r.metrics, k)[0] for r in runs)]
    if not panels:
        return None
    plt = pyplot()
    colours = plt.get_cmap("tab10")
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
    return save_figure(fig, out / "compare.png")


def _write_markdown(path: Path, warning, table, groups, notes, has_figure: bool) -> None:
    header, rows = table
    md = ["# Run comparison", ""] + ([f"> **warning:** {warning}", ""] if warning else [])
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    md += ["", "Runs:"] + [f"- `{r.path}` → {name}" for name, rs in groups.items() for r in rs]
    md += [f"> note: {n}" for n in notes]
    if has_figure:
        md += ["", "![curves](compare.png)"]
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}td,th{border:1px solid #ccc;"
       "padding:3px 6px;font-size:13px}table{border-collapse:collapse}img{max-width:100%}"
       ".warn{background:#fde2e2;padding:6px}")


def _write_html(path: Path, warning, table, groups, notes, img_b64: Optional[str]) -> None:
    esc = html.escape
    header, rows = table
    page = ["<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Run comparison</title>",
            f"<style>{CSS}</style></head><body>", "<h1>Run comparison</h1>"]
    if warning:
        page.append(f"<p class='warn'><b>warning:</b> {esc(warning)}</p>")
    page.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    page += [f"<p><b>note:</b> {esc(n)}</p>" for n in notes]
    if img_b64:
        page.append(f"<img alt='curves' src='data:image/png;base64,{img_b64}'>")
    page.append("<h2>Runs</h2><ul>" + "".join(f"<li><code>{esc(str(r.path))}</code> &rarr; {esc(name)}</li>"
                                              for name, rs in groups.items() for r in rs) + "</ul></body></html>")
    path.write_text("\n".join(page), encoding="utf-8")


def compare(run_dirs: Sequence, out_dir=None, labels: Sequence[str] = ()) -> Path:
    """Render the comparison; returns the path of summary.md. One-line ReportError on a bad run dir/label."""
    if not run_dirs:
        raise ReportError("compare_runs: give at least one RUN_DIR")
    label_specs = parse_labels(labels)
    runs = [Run(require_run_dir(d)) for d in run_dirs]
    keys = differing_keys(runs)
    warning = config_warning(runs, keys)
    groups, notes = group_runs(runs, label_specs, keys)
    out = Path(out_dir) if out_dir else Path("compare")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.png").unlink(missing_ok=True)  # an earlier comparison's figure must not pass for this one's
    img_b64 = _figure(runs, groups, out)
    if img_b64 is None:
        notes.append("None of the compared metrics is present in any run.")
    table = summary_rows(groups)
    _write_markdown(out / "summary.md", warning, table, groups, notes, img_b64 is not None)
    _write_html(out / "index.html", warning, table, groups, notes, img_b64)
    return out / "summary.md"
