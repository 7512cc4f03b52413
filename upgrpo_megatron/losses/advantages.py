"""GRPO group advantages, DAPO dynamic sampling and overlong shaping, KL estimators, entropy."""

from __future__ import annotations

from typing import Tuple

import torch


def compute_grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, *, norm_by_std: bool = True,
                            epsilon: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage per response: A_i = (r_i - mean_g) / (std_g + eps), or r_i - mean_g.

    Args:
        rewards: `[num_responses]`; group: `[num_responses]` prompt id of each response.
    A group of one response has mean 0 and std 1 (as verl), so its advantage is its reward.
    """
    rewards = rewards.float()
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts)).index_add_(0, inv, rewards)
    mean = sums / counts
    sq = torch.zeros(len(counts)).index_add_(0, inv, (rewards - mean[inv]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))  # unbiased, like torch.std
    single = counts == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = rewards - mean[inv]
    if norm_by_std:
        denom = std[inv] + epsilon
        adv = adv / torch.where(denom > 0, denom, torch.ones_like(denom))  # all-equal group: 0, never 0/0
    return adv


def dynamic_sampling_filter(rewards: torch.Tensor, group: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """DAPO dynamic sampling: keep responses of groups whose rewards are not all equal.

    Returns (indices of kept responses, number of dropped groups)."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    rmin = torch.full((len(counts),), float("inf")).scatter_reduce(0, inv, rewards.float(), "amin")
    rmax = torch.full((len(counts),), float("-inf")).scatter_reduce(0, inv, rewards.float(), "amax")
    varied = rmax > rmin
    keep = torch.nonzero(varied[inv]).flatten()
    return keep, int((~varied).sum())


def overlong_reward_penalty(lengths: torch.Tensor, *, max_response_length: int, buffer_len: int,
                            penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment: 0 up to L_max - buffer, then linearly down to -factor at L_max."""
    expected = max_response_length - buffer_len
    exceed = lengths.float() - expected
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators (Schulman's k1/k2/k3), as in verl.

    k1 = log pi - log pi_ref;  k2 = 0.5 (log pi - log pi_ref)^2;
    k3 ("low_var_kl") = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1, clamped to [-10, 10].
    """
    diff = log_prob - ref_log_prob
    if kind in ("k1", "kl"):
        return diff
    if kind in ("k2", "mse"):
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        kl = -diff
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10.0, max=10.0)
    raise ValueError(f"kl_loss_type: unknown estimator '{kind}'; choose k1, k2 or k3 (low_var_kl)")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension: logsumexp(l) - sum softmax(l) * l."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)
