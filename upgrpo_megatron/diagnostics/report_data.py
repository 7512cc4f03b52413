"""The numbers behind the routing report: per-step diagnostics pooled over steps, flatness, rankings, samples.

No drawing and no markup here (report_figures.py draws, report.py writes the pages). Conventions of the arrays
read (see step.py / ratio_stats.py): `*_ratio_{count,mean,var}` are `[MoE layers, experts, 2, 2]`, axis 2 the
advantage sign (0: A > 0, 1: A <= 0), axis 3 the routing match (0: matched, 1: mismatched); w is the
train/rollout ratio (`train_rollout_ratio_*`), r the update ratio (`update_ratio_*`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from upgrpo_megatron.diagnostics.storage import DiagnosticsReader

# Below this a quantity is float rounding, not signal: fp32 log-probs of two engines agree to ~1e-7, while a
# bf16 engine's differences are ~1e-3..1e-2. Applied to rates and to the standard deviation of a ratio.
NOISE = 1e-6
NOISE_TEXT = "1e-6"
N_TOP = 10
N_PROMPTS = 8
RESPONSES_PER_PROMPT = 4


def flatness(values, baseline: float = 0.0) -> Optional[str]:
    """"zero" when every finite value is exactly `baseline`, "noise" when all are within NOISE of it, else None
    (also None when there is no finite value: nothing to say)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    dev = np.abs(v - baseline)
    if not dev.any():
        return "zero"
    return "noise" if dev.max() < NOISE else None


def max_deviation(values, baseline: float = 0.0) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.abs(v - baseline).max()) if v.size else float("nan")


def nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without the warning for an all-NaN slice (an expert that served no token: NaN is the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def _pooled_ratio(reader: DiagnosticsReader, prefix: str) -> Optional[Dict[str, np.ndarray]]:
    """Pool `{prefix}_count/mean/var` `[L, E, 2, 2]` over steps exactly (from sums) -> count, s1, s2."""
    c, mu, var = (reader.stack(f"{prefix}_{k}") for k in ("count", "mean", "var"))
    if c is None or mu is None or var is None or not (c[0] == mu[0] == var[0]):
        return None
    cnt, m, v = c[1], mu[1] - 1, var[1]  # centred at r = 1, as RatioStats does, to keep tiny variances
    return {"count": cnt.sum(0), "s1": (cnt * m).sum(0), "s2": (cnt * (v + m * m)).sum(0)}


def _variance(pooled: Dict[str, np.ndarray], axes: Tuple[int, ...]) -> np.ndarray:
    """Population variance over the pooled axes; NaN where no token was counted."""
    n, s1, s2 = (pooled[k].sum(axes) if axes else pooled[k] for k in ("count", "s1", "s2"))
    safe = np.maximum(n, 1)
    mx = s1 / safe
    return np.where(n > 0, np.maximum(s2 / safe - mx * mx, 0), np.nan)


@dataclass
class RatioVariance:
    """Variance of one ratio per (MoE layer, expert): `by_sign[..., 0]` A > 0, `[..., 1]` A <= 0; `all` pooled."""

    by_sign: np.ndarray  # [L, E, 2]
    all: np.ndarray  # [L, E]

    @classmethod
    def load(cls, reader: DiagnosticsReader, prefix: str) -> Optional["RatioVariance"]:
        pooled = _pooled_ratio(reader, prefix)
        if pooled is None:
            return None
        return cls(by_sign=_variance(pooled, (3,)), all=_variance(pooled, (2, 3)))

    def flatness(self) -> Optional[str]:
        return flatness(np.sqrt(self.by_sign))  # judged on the standard deviation, the ratio's own scale


@dataclass
class ExpertStats:
    """Per (MoE layer, expert) and per layer statistics over all diagnostic steps; None: not recorded."""

    steps: List[int] = field(default_factory=list)
    flip: Optional[np.ndarray] = None  # [L, E] flip rate trainer vs engine, mean over steps
    drift_flip: Optional[np.ndarray] = None  # [L, E] flip rate pi_old vs pi_theta
    tokens: Optional[np.ndarray] = None  # [L, E] tokens the trainer routed to the expert, all steps
    layer_mismatch: Optional[np.ndarray] = None  # [steps, L] share of (token, layer) pairs that mismatched
    layer_drift: Optional[np.ndarray] = None  # [steps, L]
    w: Optional[RatioVariance] = None  # w = pi_trainer / pi_rollout
    r: Optional[RatioVariance] = None  # r = pi_theta / pi_old

    @classmethod
    def load(cls, reader: DiagnosticsReader) -> "ExpertStats":
        s = cls(steps=reader.steps)
        mean = lambda key: None if (st := reader.stack(key)) is None else nanmean(st[1], axis=0)  # noqa: E731
        s.flip, s.drift_flip = mean("mismatch_expert_flip_rate"), mean("drift_expert_flip_rate")
        chosen = reader.stack("mismatch_expert_chosen_a")
        s.tokens = chosen[1].sum(0) if chosen is not None else None
        for attr, key in (("layer_mismatch", "mismatch_layer_pair_frac"), ("layer_drift", "drift_layer_pair_frac")):
            st = reader.stack(key)
            setattr(s, attr, st[1] if st is not None else None)
        s.w, s.r = RatioVariance.load(reader, "train_rollout_ratio"), RatioVariance.load(reader, "update_ratio")
        return s

    @property
    def has_routing(self) -> bool:
        return any(a is not None for a in (self.flip, self.drift_flip, self.w, self.r))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _at(a: Optional[np.ndarray], *idx) -> Optional[float]:
    return float(a[idx]) if a is not None else None


def _var(v: Optional[float]) -> str:
    """A variance for a table; one whose standard deviation is below NOISE says so instead of 3.9e-17."""
    if v is not None and math.isfinite(v) and math.sqrt(v) < NOISE:
        return "0" if v == 0 else "≈0 (noise)"
    return _fmt(v)


def top_layers(s: ExpertStats) -> Optional[Tuple[List[str], List[List[str]]]]:
    """One row per MoE layer (worst first by routing mismatch, then by variance of w), at most N_TOP."""
    L = next((a.shape[-1] for a in (s.layer_mismatch, s.layer_drift) if a is not None), None)
    if L is None and s.w is not None:
        L = s.w.all.shape[0]
    if L is None:
        return None
    mis = nanmean(s.layer_mismatch, 0) if s.layer_mismatch is not None else None
    drift = nanmean(s.layer_drift, 0) if s.layer_drift is not None else None
    wv = nanmean(s.w.by_sign, 1) if s.w is not None else None  # [L, 2], mean over the layer's experts
    rv = nanmean(s.r.by_sign, 1) if s.r is not None else None
    worst_mis = np.nan_to_num(mis, nan=0.0) if mis is not None else np.zeros(L)
    worst_w = np.nan_to_num(np.fmax.reduce(wv, axis=1), nan=0.0) if wv is not None else np.zeros(L)
    key = lambda i: (-worst_mis[i], -worst_w[i])  # noqa: E731
    header = ["MoE layer", "routing mismatch (pairs)", "routing drift (pairs)", "var w, A>0", "var w, A≤0",
              "var r, A>0", "var r, A≤0"]
    rows = [[str(i), _fmt(_at(mis, i)), _fmt(_at(drift, i)), _var(_at(wv, i, 0)), _var(_at(wv, i, 1)),
             _var(_at(rv, i, 0)), _var(_at(rv, i, 1))] for i in sorted(range(L), key=key)[:N_TOP]]
    return header, rows


def _ranked(score: np.ndarray) -> List[Tuple[int, int]]:
    """(layer, expert) of the N_TOP highest finite, positive scores, highest first."""
    flat = np.nan_to_num(score, nan=-1.0)
    order = np.argsort(-flat, axis=None, kind="stable")[:N_TOP]
    return [tuple(int(x) for x in np.unravel_index(i, score.shape)) for i in order if flat.flat[i] > 0]


def top_experts_by_mismatch(s: ExpertStats) -> Optional[Tuple[List[str], List[List[str]]]]:
    if s.flip is None or flatness(s.flip) == "zero":
        return None
    header = ["MoE layer", "expert", "flip rate", "tokens (trainer)", "var w, A>0", "var w, A≤0"]
    w = s.w.by_sign if s.w is not None and s.w.all.shape == s.flip.shape else None
    rows = [[str(layer), str(e), _fmt(float(s.flip[layer, e])), _fmt(_at(s.tokens, layer, e)),
             _var(_at(w, layer, e, 0)), _var(_at(w, layer, e, 1))] for layer, e in _ranked(s.flip)]
    return header, rows


def top_experts_by_variance(s: ExpertStats) -> Optional[Tuple[List[str], List[List[str]]]]:
    if s.w is None or s.w.flatness() is not None:
        return None
    r = s.r.by_sign if s.r is not None and s.r.all.shape == s.w.all.shape else None
    header = ["MoE layer", "expert", "var w", "var w, A>0", "var w, A≤0", "var r, A>0", "var r, A≤0",
              "tokens (trainer)"]
    rows = [[str(layer), str(e), _var(float(s.w.all[layer, e])), _var(float(s.w.by_sign[layer, e, 0])),
             _var(float(s.w.by_sign[layer, e, 1])), _var(_at(r, layer, e, 0)), _var(_at(r, layer, e, 1)),
             _fmt(_at(s.tokens, layer, e))] for layer, e in _ranked(s.w.all)]
    return header, rows


def distinct_prompt_samples(samples: List[dict]) -> List[dict]:
    """The most recent N_PROMPTS distinct prompts (the trainer logs several samples of one prompt per step),
    each with up to RESPONSES_PER_PROMPT of its responses from its latest step: {step, prompt, answer, responses:
    [(response, reward)]}."""
    latest: Dict[str, dict] = {}
    for s in samples:  # file order is step order; a later step replaces a prompt's earlier responses
        prompt = str(s.get("prompt", ""))
        cur = latest.get(prompt)
        if cur is None or cur["step"] != s.get("step"):
            cur = latest[prompt] = {"step": s.get("step"), "prompt": prompt, "answer": s.get("answer"), "responses": []}
            latest[prompt] = latest.pop(prompt)  # move to the end: dicts keep insertion order
        if len(cur["responses"]) < RESPONSES_PER_PROMPT:
            cur["responses"].append((str(s.get("response", "")), s.get("reward")))
    recent = list(latest.values())[-N_PROMPTS:]
    return sorted(recent, key=lambda c: -c["step"] if isinstance(c["step"], (int, float)) else 0)  # newest first
