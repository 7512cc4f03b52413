"""Synthetic run directories for previewing and testing the reports without training anything.

    python -m upgrpo_megatron.diagnostics.synthetic OUT_DIR [--loss-mode up_grpo] [--seed 1] [--steps 12]

Writes what a real run writes, through the same APIs the trainer uses: `config.yaml`, `metrics.jsonl`,
`diagnostics/step_*.npz` (from `step_diagnostics` / `update_diagnostics` on random routing whose rollout side
flips a chosen share of (token, layer) pairs, near-tie experts flipping most), and `samples.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from upgrpo_megatron.diagnostics.step import step_diagnostics, update_diagnostics
from upgrpo_megatron.diagnostics.storage import DiagnosticsWriter, append_samples


def random_routing(batch: int, response_len: int, layers: int, topk: int, num_experts: int,
                   generator: torch.Generator, skew: float = 1.0):
    """(top-k ids `[b, r, l, k]` in score order, router probabilities `[b, r, l, E]`) with a skewed load."""
    bias = skew * torch.linspace(1.0, -1.0, num_experts)
    logits = torch.randn(batch, response_len, layers, num_experts, generator=generator) + bias
    probs = logits.softmax(-1)
    return probs.topk(topk, dim=-1).indices, probs


def perturb_routing(experts: torch.Tensor, probs: torch.Tensor, flip_frac: float,
                    generator: torch.Generator) -> torch.Tensor:
    """Another side's routing: in a `flip_frac` share of (token, layer) pairs the k-th expert is swapped for
    the (k+1)-th (what numeric noise does near a tie)."""
    k = experts.shape[-1]
    nxt = probs.topk(k + 1, dim=-1).indices[..., k]
    flip = torch.rand(experts.shape[:-1], generator=generator) < flip_frac
    out = experts.clone()
    out[..., k - 1] = torch.where(flip, nxt, experts[..., k - 1])
    return out


def make_synthetic_run(run_dir, *, loss_mode: str = "up_grpo", seed: int = 1, steps: int = 12,
                       batch: int = 16, response_len: int = 8, layers: int = 2, num_experts: int = 8, topk: int = 2,
                       eval_every: int = 2, samples: Optional[Sequence[dict]] = None,
                       with_diagnostics: bool = True) -> Path:
    """Write a complete, plausible run directory; returns its path. Deterministic in `seed`."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    up = loss_mode.startswith("up_")
    (run / "config.yaml").write_text(
        f"# synthetic run (upgrpo_megatron.diagnostics.synthetic)\nmodel:\n  num_experts: {num_experts}\n"
        f"  moe_router_topk: {topk}\n  num_layers: {layers}\nalgorithm:\n  loss_mode: {loss_mode}\n"
        f"  clip_ratio_low: 0.2\n  clip_ratio_high: 0.28\ntrainer:\n  seed: {seed}\n  total_steps: {steps}\n")
    writer = DiagnosticsWriter(run) if with_diagnostics else None
    mask = torch.ones(batch, response_len)
    mask[::3, response_len // 2:] = 0  # some short responses
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(0, steps + 1):
            rec = {"step": step}
            if step % eval_every == 0:
                peak = 0.62 if up else 0.55
                rec["val/acc"] = peak - 0.3 * math.exp(-step / 4) + 0.02 * float(torch.randn(1, generator=g))
            if step == 0:
                f.write(json.dumps(rec) + "\n")
                continue
            train, probs = random_routing(batch, response_len, layers, topk, num_experts, g)
            roll = perturb_routing(train, probs, 0.05 + 0.01 * step, g)
            adv = torch.randn(batch, 1, generator=g).expand(batch, response_len) * mask
            old = -torch.rand(batch, response_len, generator=g) * 2
            rollout = old + 0.05 * torch.randn(batch, response_len, generator=g)
            m, arrays = step_diagnostics(response_mask=mask, advantages=adv, old_log_prob=old, rollout_log_prob=rollout,
                                         train_routing=train, rollout_routing=roll, num_experts=num_experts,
                                         clip_low=0.2, clip_high=0.28, router_scores=probs)
            new = perturb_routing(train, probs, 0.02, g)
            lp = old + 0.1 * torch.randn(batch, response_len, generator=g) + 0.05 * (adv > 0)
            dm, darr = update_diagnostics(response_mask=mask, advantages=adv, old_log_prob=old, log_prob=lp,
                                          old_routing=train, new_routing=new, num_experts=num_experts,
                                          clip_low=0.2, clip_high=0.28)
            m.update(dm)
            arrays.update(darr)
            t = step / steps
            rec.update({k: v for k, v in m.items() if isinstance(v, float) and math.isfinite(v)})
            rec.update({"actor/ppo_kl": 1e-3 * (1 + t) * (0.9 if up else 1.0),
                        "actor/entropy": 0.8 + (0.3 if up else -0.2) * t,
                        "actor/pg_clipfrac": 0.05 + 0.02 * t, "actor/pg_clipfrac_lower": 0.001,
                        "critic/score/mean": 0.3 + 0.3 * t})
            f.write(json.dumps(rec) + "\n")
            if writer is not None:
                writer.write(step, arrays)
            default_samples = [{"prompt": f"{step}+1=", "response": str(step + 1), "reward": 1.0}]
            append_samples(run, step, list(samples or default_samples))
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--loss-mode", default="up_grpo")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args(argv)
    print(make_synthetic_run(a.out_dir, loss_mode=a.loss_mode, seed=a.seed, steps=a.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
