"""Cost of the per-step routing diagnostics: ours (sparse: bincount / index_add over the k chosen ids) vs the
dense one-hot formulation a first implementation reaches for (`[tokens, layers, num_experts]` membership masks).

    python bench/diagnostics.py [--tiny]

Records `diagnostics_step` in bench/results.json: seconds per call of the train-vs-rollout bundle
(`step_diagnostics`: mismatch, ratio per expert, probability gap, loads, validity), ratio = dense / ours, the
median of interleaved pairs (`bench.common.interleave`).
`extra.us_per_token` lets one project the share of an RL step at a given batch size.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import MIN_PAIRS, interleave, record  # noqa: E402
from upgrpo_megatron.diagnostics import step_diagnostics  # noqa: E402
from upgrpo_megatron.diagnostics.synthetic import perturb_routing, random_routing  # noqa: E402


def dense_baseline(train, roll, mask, log_ratio, adv, num_experts):
    """The one-hot formulation of the same core statistics (mismatch rate, per-expert flip and ratio sums)."""
    oh = lambda e: torch.zeros(*e.shape[:-1], num_experts).scatter_(-1, e, 1.0)  # noqa: E731
    a, b = oh(train), oh(roll)  # [B, R, L, E]
    m = mask[..., None, None]
    differs = ((a != b).any(-1).float() * mask[..., None]).sum() / (mask.sum() * train.shape[2])
    flips = (((a + b) == 1).float() * m).sum((0, 1)) / (((a + b) > 0).float() * m).sum((0, 1)).clamp(min=1)
    r = log_ratio.exp()[..., None, None]
    out = {}
    for name, sel in (("pos", (adv > 0)), ("neg", (adv <= 0))):
        w = a * m * sel[..., None, None]
        c = w.sum((0, 1))
        s1, s2 = (w * r).sum((0, 1)), (w * r * r).sum((0, 1))
        out[name] = s2 / c.clamp(min=1) - (s1 / c.clamp(min=1)) ** 2
    return differs, flips, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--pairs", type=int, default=MIN_PAIRS)
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    B, R, L, E, K = (8, 32, 4, 16, 2) if a.tiny else (64, 256, 24, 64, 8)
    g = torch.Generator().manual_seed(0)
    train, probs = random_routing(B, R, L, K, E, g)
    roll = perturb_routing(train, probs, 0.05, g)
    mask = (torch.rand(B, R, generator=g) < 0.9).float()
    old = -torch.rand(B, R, generator=g)
    rollout = old + 0.05 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, R)

    def ours():
        step_diagnostics(response_mask=mask, advantages=adv, old_log_prob=old, rollout_log_prob=rollout,
                         train_routing=train, rollout_routing=roll, num_experts=E, clip_low=0.2, clip_high=0.28)

    def theirs():
        dense_baseline(train, roll, mask, old - rollout, adv, E)

    pairs = interleave(ours, theirs, pairs=a.pairs)
    t_ours, t_theirs = pairs.summary()["ours"]["median"], pairs.summary()["theirs"]["median"]
    tokens = int(mask.sum())
    entry = record("diagnostics_step" + ("_tiny" if a.tiny else ""), t_ours, t_theirs, None, "s/call",
                   {"batch": B, "response_len": R, "layers": L, "experts": E, "topk": K, "tiny": a.tiny},
                   {"us_per_token": 1e6 * t_ours / tokens, "tokens": tokens,
                    "note": "ours computes the full bundle; the dense baseline only 3 of its statistics"},
                   path=a.results, pairs=pairs)
    print(f"diagnostics_step: ours {t_ours * 1e3:.1f} ms, dense one-hot {t_theirs * 1e3:.1f} ms (medians), "
          f"ratio {pairs.describe()}, {entry['extra']['us_per_token']:.2f} us/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
