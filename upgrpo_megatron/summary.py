"""The run, told in a few terminal lines: the progress bar's fields, one line per eval, the final summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional


def _get(m: Dict[str, float], key: str) -> Optional[float]:
    v = m.get(key)
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def progress_fields(m: Dict[str, float], last_val: Optional[float]) -> Dict[str, str]:
    """Short fields for the progress bar: reward, val/acc, KL to the reference, routing mismatch."""
    out = {}
    for name, key, fmt in (("reward", "critic/score/mean", "{:.2f}"), ("kl", "actor/kl_loss", "{:.1e}"),
                           ("mismatch", "mismatch/routing/pair_frac", "{:.1%}")):
        v = _get(m, key)
        if v is not None:
            out[name] = fmt.format(v)
    if last_val is not None:
        out["val/acc"] = f"{last_val:.3f}"
    return out


def eval_line(step: int, m: Dict[str, float]) -> str:
    extra = "".join(f", {k.split('/', 1)[1]} {v:.3f}" for k, v in m.items()
                    if k.startswith("val/mean@") and isinstance(v, float))
    return f"step {step}: val/acc {m['val/acc']:.3f}{extra}"


def binomial_std(p: float, n: int) -> float:
    """The standard error of an accuracy p measured on n problems."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def final_summary(run_dir: Path, records: List[dict], *, loss_mode: str, steps: int, minutes: float,
                  num_val: int, checkpoint: Optional[Path], hf: Optional[Path], report: Optional[Path]) -> List[str]:
    """3-5 lines: what ran, accuracy before/after with the eval's noise, mismatch and KL, where things are."""
    lines = [f"done in {minutes:.1f} min: {steps} RL steps of {loss_mode}, run dir {run_dir}"]
    vals = [(r["step"], r["val/acc"]) for r in records if isinstance(r.get("val/acc"), (int, float))]
    if vals:
        (_, v0), (_, v1) = vals[0], vals[-1]
        peak_step, peak = max(vals, key=lambda x: x[1])
        noise = binomial_std(v0, num_val)
        lines.append(f"  val/acc {v0:.3f} after SFT warm-up -> {v1:.3f} after {steps} RL steps (peak {peak:.3f} at "
                     f"step {peak_step}); eval noise: one binomial std = {noise:.3f} ({num_val} problems)")
    last = records[-1] if records else {}
    mis, kl = _get(last, "mismatch/routing/pair_frac"), _get(last, "actor/kl_loss")
    if mis is not None or kl is not None:
        parts = []
        if mis is not None:
            parts.append(f"routing mismatch engine vs trainer {mis:.2%} of (token, layer) pairs"
                         + (" (they route identically)" if mis == 0 else ""))
        if kl is not None:
            parts.append(f"KL to the reference {kl:.2e}")
        lines.append("  last step: " + "; ".join(parts))
    where = [f"{name} {p}" for name, p in (("report", report), ("HF export", hf), ("checkpoint", checkpoint)) if p]
    if where:
        lines.append("  " + " | ".join(where))
    return lines
