"""The routing-mismatch report of a run directory (`tools/routing_report.py RUN_DIR [--out DIR]`).

Writes into OUT (default RUN_DIR/report): `index.html` (self-contained: figures embedded as base64 PNG, no
script, no external resource, opens offline), the figures as PNG files, and `summary.md`. Both pages are
rendered from one list of sections, so they say the same things: a reading guide (what the run did, what the
ratios w and r are, what routing mismatch means), then per section a title, a one- or two-sentence definition,
and a figure, a table or a sentence (e.g. "all zero: ..." where a quantity is identically zero).
Every piece of text that comes from the run (metric names, config values, prompts, responses) is HTML-escaped.
Missing pieces (no diagnostics saved, no samples, no config) are stated in the report instead of failing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from upgrpo_megatron.diagnostics import report_figures as figures
from upgrpo_megatron.diagnostics.report_data import (
    ExpertStats,
    distinct_prompt_samples,
    flatness,
    top_experts_by_mismatch,
    top_experts_by_variance,
    top_layers,
)
from upgrpo_megatron.diagnostics.run_files import (
    ReportError,  # noqa: F401 (re-export: callers catch it from here)
    config_get,
    fmt,
    pyplot,
    read_config,
    read_jsonl,
    read_metrics,
    require_run_dir,
)
from upgrpo_megatron.diagnostics.storage import DiagnosticsReader

TITLE = "Routing-mismatch report"
Table = Tuple[List[str], List[List[str]]]
# the last-step table: what peers (NeMo-RL, slime, R3 paper) report, under our names, and what each measures
KEY_METRICS = [
    ("val/acc", "accuracy on the held-out prompts"),
    ("actor/ppo_kl", "KL(π_old ‖ π_θ) during the update"),
    ("actor/entropy", "mean entropy of the policy's next-token distribution"),
    ("actor/pg_clipfrac", "share of tokens whose r was clipped"),
    ("mismatch/routing/pair_frac", "(token, layer) pairs whose top-k sets differ, trainer vs engine"),
    ("mismatch/routing/token_any_frac", "tokens with at least one mismatched layer"),
    ("mismatch/routing/layers_per_token", "mismatched layers per token, mean"),
    ("mismatch/routing/jaccard", "overlap |A∩B|/|A∪B| of the two top-k sets, mean (1: identical)"),
    ("mismatch/routing/top1_agree", "pairs whose highest-scoring expert agrees"),
    ("mismatch/routing/flip_margin_mean", "trainer's router-score gap, k-th vs (k+1)-th expert, on mismatched pairs"),
    ("mismatch/routing/stable_margin_mean", "the same gap on matched pairs (flips happen at near-ties)"),
    ("routing/drift/pair_frac", "pairs whose top-k set changed from π_old to π_θ during the update"),
    ("mismatch/token_mult_prob_error", "mean exp|log w| (1: no gap)"),
    ("mismatch/exp_mean_abs_log_prob_diff", "exp(mean |log w|) (1: no gap)"),
    ("mismatch/abs_prob_diff_max", "largest |π_trainer − π_rollout| of a sampled token"),
    ("mismatch/kl_k3_rollout_train", "k3 estimate of KL(engine ‖ trainer)"),
    ("mismatch/kl_k3_train_rollout", "k3 estimate of KL(trainer ‖ engine)"),
    ("mismatch/js_divergence", "Jensen-Shannon divergence, trainer vs engine"),
    ("mismatch/is_ratio_mean", "mean w"),
    ("mismatch/is_ratio_chi2", "E[w²] − 1 (0: no gap)"),
    ("mismatch/is_ratio_ess_frac", "effective sample size of w / tokens (1: no gap)"),
    ("mismatch/extreme_token_frac_tau2", "tokens with max(w, 1/w) > 2"),
    ("mismatch/extreme_token_frac_tau5", "tokens with max(w, 1/w) > 5"),
    ("mismatch/extreme_token_frac_tau10", "tokens with max(w, 1/w) > 10"),
    ("routing/rollout_capture/invalid_pairs", "engine routes that were missing or invalid"),
    ("routing/train_load/max_over_mean", "busiest expert's tokens / mean, trainer"),
    ("routing/rollout_load/max_over_mean", "busiest expert's tokens / mean, engine"),
]
CSS = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em;color:#222;line-height:1.4}"
       "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top;text-align:left}"
       "table{border-collapse:collapse;margin-bottom:1em}img{max-width:100%}"
       "pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:480px}.note{background:#fff6d8;padding:6px}"
       ".guide{background:#eef4fb;padding:8px 12px;border-left:4px solid #4a7fc1}.def{color:#444;font-size:14px}")


@dataclass
class Section:
    """One part of both pages: title, definition, then a figure, a table and/or sentences."""

    title: str
    definition: str
    figure: Optional[figures.Figure] = None
    table: Optional[Table] = None
    sentences: List[str] = field(default_factory=list)
    pre: bool = False  # table cells hold run text whose line breaks matter (samples)


# ------------------------------------------------------------------------------------------------ the guide
def _model_phrase(cfg) -> str:
    layers, experts, k = (config_get(cfg, f"model.{key}") for key in ("num_layers", "num_experts", "moe_router_topk"))
    if not (layers and experts and k):
        return "a mixture-of-experts model"
    dense = config_get(cfg, "model.first_k_dense_layers") or 0
    moe = f", {layers - dense} of them MoE" if isinstance(dense, int) and 0 < dense < layers else ""
    return f"a mixture-of-experts model ({layers} layers{moe}, {experts} experts per MoE layer, top-{k} routing)"


def _rollout_phrase(cfg) -> str:
    prompts, n = config_get(cfg, "trainer.prompts_per_step"), config_get(cfg, "rollout.n")
    dtype = config_get(cfg, "rollout.dtype")
    what = f"{prompts} prompts × {n} responses" if prompts and n else "responses"
    return what + (f" in {dtype}" if dtype else "")


GUIDE_LEAD = "How to read this report."


def reading_guide(cfg, metrics: List[dict]) -> str:
    """One paragraph (printed after GUIDE_LEAD): what the run did, what w and r are, what routing mismatch
    means, in which order to read."""
    loss = config_get(cfg, "algorithm.loss_mode")
    loss = f"the {loss} loss" if loss else "its configured loss"
    steps = max((r["step"] for r in metrics), default=0)
    replay = config_get(cfg, "algorithm.router_replay")
    replay = f" (router replay: {replay})" if replay and replay != "none" else ""
    return (
        f"This run post-trained {_model_phrase(cfg)} with {loss} for {steps} RL "
        f"steps: each step the vLLM engine sampled {_rollout_phrase(cfg)}, and the trainer (Megatron) recomputed "
        f"the sampled tokens' probabilities and updated the policy{replay}. Two ratios describe each sampled token. "
        "w = π_trainer/π_rollout is the train-inference mismatch: the same weights give slightly different "
        "probabilities in the engine that sampled the token and in the trainer that learns from it (numerics, and "
        "different experts); ideally w = 1. r = π_θ/π_old is the drift during the update: how far this step's "
        "optimizer updates have moved the token's probability; PPO-style losses clip r to [1−ε_low, 1+ε_high], "
        "UP-GRPO uses no ratio for tokens with advantage A > 0 (it trains them with −A·log π) and keeps the clip for "
        "A ≤ 0, which is why several figures split by the sign of A. Routing mismatch: at every MoE layer each token "
        "goes to its top-k experts; when the trainer's top-k set differs from the set the engine used for the same "
        "token, that (token, layer) pair mismatches and the token's probability was computed by different experts "
        "on the two sides, a main source of w ≠ 1 in MoE models (drift is the same comparison between π_old and "
        "π_θ). Read the summary tables first (where the mismatch is worst), then the curves (how it evolves), the "
        "heatmaps (where in the model) and sample responses.")


def run_summary(stats: ExpertStats) -> Optional[str]:
    """What this run shows about the mismatch, in one or two sentences (None without routing arrays)."""
    if stats.layer_mismatch is None and stats.flip is None:
        return None
    mis = stats.layer_mismatch if stats.layer_mismatch is not None else stats.flip
    if flatness(mis) == "zero":
        text = f"In this run: {figures.SAME_ROUTES} (routing mismatch 0 at every diagnostic step)"
    else:
        text = f"In this run: {float(np.nanmean(mis)):.2%} of (token, layer) pairs were routed differently by " \
               f"the trainer and the engine, on average over {len(stats.steps)} diagnostic steps"
    if stats.w is not None:
        state = stats.w.flatness()
        text += "; w varies only by float noise (std below 1e-6)" if state else \
            f"; the variance of w per expert reaches {float(np.nanmax(stats.w.all)):.3g}"
    return text + "."


# ------------------------------------------------------------------------------------------------ sections
def summary_sections(stats: ExpertStats) -> List[Section]:
    if not stats.has_routing:
        return []
    layers, by_mis, by_var = top_layers(stats), top_experts_by_mismatch(stats), top_experts_by_variance(stats)
    out = [Section("Top offending layers", (
        "Per MoE layer, worst first: the share of (token, layer) pairs routed differently by trainer and engine "
        "(mismatch) and from π_old to π_θ (drift), mean over steps, and the variance of w and r, mean over the "
        "layer's experts, by sign of the advantage."), table=layers)]
    mis_def = ("The experts with the highest flip rate trainer vs engine (share of the tokens either side sent to "
               "the expert that only one side sent there), the tokens the trainer sent them over all steps, and the "
               "variance of w on those tokens by sign of the advantage.")
    if by_mis is not None:
        out.append(Section("Top offending experts: routing mismatch", mis_def, table=by_mis))
    elif stats.flip is not None:
        out.append(Section("Top offending experts: routing mismatch", mis_def,
                           sentences=[f"No expert mismatched: {figures.SAME_ROUTES} (flip rate 0 everywhere)."]))
    var_def = ("The experts whose tokens have the most variable w = π_trainer/π_rollout (pooled over steps and "
               "signs), with the split by sign of the advantage and the variance of the update ratio r.")
    if by_var is not None:
        out.append(Section("Top offending experts: ratio variance", var_def, table=by_var))
    elif stats.w is not None:
        out.append(Section("Top offending experts: ratio variance", var_def, sentences=[
            "The variance of w is float noise for every expert (std below 1e-6): the engine and trainer compute "
            "the same probabilities."]))
    return out


def figure_sections(plt, metrics: List[dict], reader: DiagnosticsReader, stats: ExpertStats, out: Path):
    made = [figures.curves(plt, metrics, out), figures.routing_heatmaps(plt, stats, out),
            figures.ratio_heatmaps(plt, stats, out), figures.histograms(plt, reader, out)]
    return [Section(f.title, f.definition, figure=f, sentences=f.statements) for f in made if f is not None]


def last_step_section(metrics: List[dict]) -> Optional[Section]:
    last = metrics[-1] if metrics else {}
    rows = [[k, fmt(last[k]), meaning] for k, meaning in KEY_METRICS if isinstance(last.get(k), (int, float))]
    if not rows:
        return None
    return Section(f"Last step ({last.get('step')})", (
        "The values at the last logged step of the quantities peers report (NeMo-RL, slime, the R3 paper), under "
        "this project's names, with what each measures."), table=(["metric", "value", "what it measures"], rows))


def capture_section(metrics: List[dict]) -> Section:
    bad = [(r["step"], r.get("routing/rollout_capture/invalid_pairs")) for r in metrics
           if (r.get("routing/rollout_capture/invalid_pairs") or 0) > 0
           or (r.get("routing/rollout_capture/all_zero_layers") or 0) > 0]
    sec = Section("Capture validity", (
        "Whether the routes captured from the engine are usable: a route is invalid when an expert id is missing, "
        "out of range or repeated, or when a whole layer is zeros (a silently zero-filled capture)."))
    if bad:
        sec.table = (["step", "invalid (token, layer) pairs"], [[str(s), fmt(v)] for s, v in bad])
    elif any("routing/rollout_capture/valid" in r for r in metrics):
        sec.sentences = ["Every captured rollout route was valid."]
    else:
        sec.sentences = ["No capture-validity metrics in this run (rollout routing was not captured)."]
    return sec


def samples_section(samples: List[dict]) -> Section:
    chosen = distinct_prompt_samples(samples)
    sec = Section("Sample rollouts", (
        f"The {len(chosen) or 'most recent'} most recent distinct prompts with up to 4 of their sampled responses "
        "from the latest step that sampled them (the trainer logs several responses of one prompt per step), "
        "each with its reward."), pre=True)
    if not chosen:
        sec.sentences = ["No samples.jsonl in this run." if not samples else "samples.jsonl holds no sample."]
        return sec
    rows = [[str(c["step"]), c["prompt"], "" if c["answer"] is None else str(c["answer"]),
             "\n".join(f"[reward {fmt(rw)}] {resp}" for resp, rw in c["responses"])] for c in chosen]
    sec.table = (["step", "prompt", "answer", "responses"], rows)
    return sec


# ------------------------------------------------------------------------------------------------ rendering
def _html_table(table: Table, pre: bool) -> str:
    """HTML table; cells are escaped here, so callers pass raw text."""
    header, rows = table
    cell = (lambda c: f"<td><pre>{html.escape(c)}</pre></td>") if pre else (lambda c: f"<td>{html.escape(c)}</td>")
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    return f"<table><tr>{h}</tr>" + "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows) + "</table>"


def _md_table(table: Table) -> List[str]:
    header, rows = table
    esc = lambda c: c.replace("|", "\\|").replace("\n", " · ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(esc(c) for c in r) + " |" for r in rows]


def _html_section(s: Section) -> str:
    parts = [f"<h2>{html.escape(s.title)}</h2>"]
    if s.figure is not None and s.figure.b64 is not None:
        parts.append(f"<img alt='{html.escape(s.title)}' src='data:image/png;base64,{s.figure.b64}'>")
    parts.append(f"<p class='def'>{html.escape(s.definition)}</p>")
    if s.sentences:
        items = "".join(f"<li>{html.escape(t)}</li>" for t in s.sentences)
        parts.append(f"<ul class='flat'>{items}</ul>" if s.figure is not None else
                     "".join(f"<p>{html.escape(t)}</p>" for t in s.sentences))
    if s.table is not None:
        parts.append(_html_table(s.table, s.pre))
    return "\n".join(parts)


def _md_section(s: Section) -> List[str]:
    md = ["", f"## {s.title}", ""]
    if s.figure is not None and s.figure.png is not None:
        md += [f"![{s.title}]({s.figure.png.name})", ""]
    md.append(s.definition)
    if s.sentences:
        md += [""] + ([f"- {t}" for t in s.sentences] if s.figure is not None else s.sentences)
    if s.table is not None:
        md += [""] + _md_table(s.table)
    return md


def _header_line(run: Path, cfg, metrics: List[dict], reader: DiagnosticsReader) -> str:
    return (f"run: {run} · loss_mode: {config_get(cfg, 'algorithm.loss_mode', 'unknown')} · {len(metrics)} step "
            f"records · {len(reader)} diagnostic steps")


def write_html(path: Path, head: str, guide: List[str], notes: List[str], sections: List[Section]) -> None:
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>", f"<title>{TITLE}</title>",
             f"<style>{CSS}</style></head><body>", f"<h1>{TITLE}</h1>", f"<p>{html.escape(head)}</p>"]
    parts.append(f"<p class='guide' id='guide'><b>{GUIDE_LEAD}</b> {html.escape(guide[0])}</p>")
    parts += [f"<p class='guide'>{html.escape(g)}</p>" for g in guide[1:]]
    parts += [f"<p class='note'><b>note:</b> {html.escape(n)}</p>" for n in notes]
    parts += [_html_section(s) for s in sections]
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_markdown(path: Path, head: str, guide: List[str], notes: List[str], sections: List[Section]) -> None:
    md = [f"# {TITLE}", "", head, "", f"**{GUIDE_LEAD}** {guide[0]}"]
    for g in guide[1:]:
        md += ["", g]
    if notes:
        md += [""] + [f"> note: {n}" for n in notes]
    for s in sections:
        md += _md_section(s)
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


def _notes(metrics, bad_lines, cfg, reader, stats) -> List[str]:
    notes = []
    if not metrics:
        notes.append("metrics.jsonl holds no step records yet.")
    if bad_lines:
        notes.append(f"{bad_lines} line(s) of metrics.jsonl could not be read and were skipped.")
    if cfg is None:
        notes.append("No readable config.yaml in the run directory.")
    if not len(reader):
        notes.append("No per-step diagnostics were saved in this run (diagnostics/ is empty or absent; "
                     "diagnostics.enabled=false?): the heatmaps, histograms and expert tables are left out.")
    elif not stats.has_routing:
        notes.append("The saved diagnostics hold no routing arrays (routing was not captured or recorded).")
    if reader.skipped:
        notes.append(f"Unreadable diagnostics files skipped: {', '.join(reader.skipped)}.")
    return notes


def render_report(run_dir, out_dir=None) -> Path:
    """Render the report of RUN_DIR into out_dir (default RUN_DIR/report); returns the path of index.html.

    Raises ReportError (one line) when RUN_DIR does not exist or has no metrics.jsonl."""
    run = require_run_dir(run_dir)
    out = Path(out_dir) if out_dir else run / "report"
    metrics, bad_lines = read_metrics(run)  # every input is read before the output directory is made
    cfg = read_config(run)
    reader = DiagnosticsReader(run)
    samples, _ = read_jsonl(run / "samples.jsonl")
    stats = ExpertStats.load(reader)
    out.mkdir(parents=True, exist_ok=True)
    for stale in figures.FIGURE_FILES:  # a figure this run lacks must not linger from an earlier report
        (out / stale).unlink(missing_ok=True)
    sections = summary_sections(stats) + figure_sections(pyplot(), metrics, reader, stats, out)
    sections += [s for s in (last_step_section(metrics), capture_section(metrics), samples_section(samples)) if s]
    guide = [reading_guide(cfg, metrics)] + [t for t in (run_summary(stats),) if t]
    notes = _notes(metrics, bad_lines, cfg, reader, stats)  # after the figures: reading them fills reader.skipped
    head = _header_line(run, cfg, metrics, reader)
    write_html(out / "index.html", head, guide, notes, sections)
    write_markdown(out / "summary.md", head, guide, notes, sections)
    return out / "index.html"
