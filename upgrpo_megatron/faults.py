"""Fault injection for the reliability tests (tests/reliability/): inert unless UPGRPO_FAULTS is set.

    UPGRPO_FAULTS="nan_loss@3,inf_grad@5-7,kill_in_checkpoint@2"

Each entry is NAME@STEPS (STEPS: `4`, `4-6` or `*`):
    nan_loss            the RL policy loss is NaN in those steps (every micro-batch)
    inf_grad            the RL loss stays finite but its backward pass yields +inf gradients
    kill_in_checkpoint  SIGKILL this process while writing the checkpoint of that step: model and optimizer
                        files are on disk, the COMPLETE marker is not (the worst moment for a crash)
    nan_weights         after that step's updates one actor weight is NaN (a diverged run)
    zero_reward         every reward of that step's rollouts is 0 (a broken reward: no group has a signal)

Only the tests set it; a typo in it is an error rather than a silently healthy run.
"""

from __future__ import annotations

import os
import signal
from typing import Dict, Optional, Set

import torch

from upgrpo_megatron.errors import UpgrpoError

KNOWN = ("nan_loss", "inf_grad", "kill_in_checkpoint", "nan_weights", "zero_reward")


class FaultSpecError(UpgrpoError, ValueError):
    pass


def _parse(spec: str) -> Dict[str, Optional[Set[int]]]:
    out: Dict[str, Optional[Set[int]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = item.partition("@")
        if name not in KNOWN or not steps:
            raise FaultSpecError(f"UPGRPO_FAULTS: cannot read {item!r} (expected NAME@STEPS, NAME one of {KNOWN})")
        if steps == "*":
            out[name] = None
            continue
        lo, _, hi = steps.partition("-")
        try:
            out.setdefault(name, set()).update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise FaultSpecError(f"UPGRPO_FAULTS: bad step range in {item!r}") from None
    return out


def active(name: str, step: int) -> bool:
    spec = os.environ.get("UPGRPO_FAULTS", "")
    if not spec:
        return False
    faults = _parse(spec)
    if name not in faults:
        return False
    steps = faults[name]
    return steps is None or step in steps


class InfGrad(torch.autograd.Function):
    """0 in the forward pass, +inf gradient for its input in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.new_zeros(()).sum()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.full_like(x, float("inf"))


def corrupt_loss(loss: torch.Tensor, log_probs: torch.Tensor, step: int) -> torch.Tensor:
    """Apply nan_loss / inf_grad to an RL loss when they are active for this step."""
    if active("nan_loss", step):
        loss = loss * float("nan")
    if active("inf_grad", step):
        loss = loss + InfGrad.apply(log_probs)
    return loss


def maybe_kill_in_checkpoint(step: Optional[int]) -> None:
    if step is not None and active("kill_in_checkpoint", int(step)):
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def maybe_corrupt_weights(module, step: int) -> None:
    if active("nan_weights", step):
        next(module.parameters()).view(-1)[0] = float("nan")


def maybe_zero_rewards(scores: torch.Tensor, step: int) -> torch.Tensor:
    return torch.zeros_like(scores) if active("zero_reward", step) else scores
