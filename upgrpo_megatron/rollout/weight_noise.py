"""A controlled train-inference routing mismatch: noise on the rollout engine's copy of the router weights.

An fp32 engine on the trainer's weights routes exactly like the trainer, so the mismatch UP-GRPO is about is
absent. `rollout.router_noise = sigma` perturbs, in the weight stream sent to the engine (start and every
sync), each MoE router weight `model.layers.N.mlp.gate.weight` (HF name, `[num_experts, hidden]`):

    W_engine = W + sigma * rms(W) * eps,   eps ~ N(0, 1) elementwise

with eps drawn from a generator seeded by (seed, weight version, layer), so a run is reproducible and every
weight version has its own draw. The trainer's weights are never touched: only what the engine routes with.
Tokens whose top-k scores are close flip experts; the measured pair mismatch per sigma is in the README.
"""

from __future__ import annotations

import re
from typing import Iterator, Tuple

import numpy as np
import torch

ROUTER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


def noise_generator(seed: int, version: int, layer: int) -> torch.Generator:
    key = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(version), int(layer), 0x5EED])
    return torch.Generator().manual_seed(int(key.generate_state(1, np.uint64)[0] >> 1))


def perturb_router(weight: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """W + sigma * rms(W) * eps, computed in fp32 and returned in W's dtype (a new tensor)."""
    w = weight.detach().float()
    rms = w.pow(2).mean().sqrt()
    eps = torch.randn(w.shape, generator=generator, dtype=torch.float32)
    return (w + sigma * rms * eps).to(weight.dtype)


def with_router_noise(stream: Iterator[Tuple[str, torch.Tensor]], sigma: float, *, seed: int,
                      version: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """The HF-named weight stream with every router weight perturbed (sigma = 0: the stream unchanged)."""
    for name, t in stream:
        m = ROUTER_WEIGHT.match(name) if sigma > 0 else None
        if m is not None:
            t = perturb_router(t, sigma, noise_generator(seed, version, int(m.group(1))))
        yield name, t
