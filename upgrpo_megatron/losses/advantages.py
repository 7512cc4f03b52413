"""GRPO group advantages, DAPO dynamic sampling and overlong shaping, KL estimators, entropy."""

from __future__ import annotations

from typing import Tuple

import torch

KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")


def _check_per_response(rewards: torch.Tensor, group: torch.Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected one reward per response, [num_responses], got {tuple(rewards.shape)}")
    if tuple(group.shape) != tuple(rewards.shape):
        raise ValueError(f"group: shape {tuple(group.shape)} does not match rewards' {tuple(rewards.shape)}")


def _group_stats(rewards: torch.Tensor, group: torch.Tensor):
    """Per-response group mean and unbiased std (a group of one: mean 0, std 1, as verl)."""
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    zeros = torch.zeros(len(counts), dtype=rewards.dtype, device=rewards.device)
    mean = zeros.index_add(0, inv, rewards) / counts
    sq = zeros.index_add(0, inv, (rewards - mean[inv]) ** 2)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))  # unbiased, like torch.std in verl
    single = counts == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[inv], std[inv]


def compute_grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, *, norm_by_std: bool = True,
                            epsilon: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage per response.

    Args:
        rewards: `[num_responses]` scalar reward of each response; group: `[num_responses]` prompt id of each.
    Returns:
        `[num_responses]`: A_i = (r_i - mean_g) / (std_g + eps) with norm_by_std (GRPO), else r_i - mean_g
        (Dr. GRPO). A group of one response has mean 0 and std 1 (as verl), so its advantage is its reward.
        Broadcast to tokens with `adv[:, None] * response_mask`.
    """
    _check_per_response(rewards, group)
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    mean, std = _group_stats(rewards, group)
    adv = rewards - mean  # A_i = r_i - mean(r_group)   (GRPO, group-relative baseline)
    if norm_by_std:
        denom = std + epsilon  # A_i / (std(r_group) + eps)   (GRPO's std normalisation)
        adv = adv / torch.where(denom > 0, denom, torch.ones_like(denom))  # all-equal group, eps=0: 0, never 0/0
    return adv


def dynamic_sampling_filter(rewards: torch.Tensor, group: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """DAPO dynamic sampling: keep the responses of groups whose rewards are not all equal.

    Args: rewards, group: `[num_responses]`.
    Returns: (indices of kept responses `[num_kept]` int64, number of dropped groups)."""
    _check_per_response(rewards, group)
    _, inv, counts = torch.unique(group, return_inverse=True, return_counts=True)
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    rmin = torch.full((len(counts),), float("inf"), dtype=r.dtype).scatter_reduce(0, inv, r, "amin")
    rmax = torch.full((len(counts),), float("-inf"), dtype=r.dtype).scatter_reduce(0, inv, r, "amax")
    varied = rmax > rmin  # a group with one distinct reward has zero advantage everywhere: no signal
    keep = torch.nonzero(varied[inv]).flatten()
    return keep, int((~varied).sum())


def overlong_reward_penalty(lengths: torch.Tensor, *, max_response_length: int, buffer_len: int,
                            penalty_factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, `[num_responses]` added to the reward:
    0 for |y| <= L_max - L_buffer, then linearly down to -penalty_factor at |y| = L_max."""
    if buffer_len <= 0:
        raise ValueError(f"overlong_buffer_len: must be > 0 to shape rewards, got {buffer_len}")
    if buffer_len > max_response_length:
        raise ValueError(f"overlong_buffer_len={buffer_len}: must be <= max_response_length={max_response_length}")
    expected = max_response_length - buffer_len
    exceed = lengths.float() - expected
    # R_length = min(-(|y| - (L_max - L_buffer)) / L_buffer * factor, 0)   (DAPO: soft overlong punishment)
    return torch.clamp(-exceed / buffer_len * penalty_factor, max=0.0)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimators (Schulman, "Approximating KL divergence"), as in verl.

    Args: log_prob, ref_log_prob: `[batch, response_len]`. Returns `[batch, response_len]`.
    k1 = log pi - log pi_ref;  abs = |k1|;  k2 = 0.5 (log pi - log pi_ref)^2;
    k3 ("low_var_kl") = exp(d) - d - 1 with d = log pi_ref - log pi clamped to [-20, 20], result clamped to
    [-10, 10] (verl's clamps: one runaway token cannot overflow the loss).
    """
    if tuple(log_prob.shape) != tuple(ref_log_prob.shape):
        raise ValueError(f"ref_log_prob: shape {tuple(ref_log_prob.shape)} does not match log_prob's "
                         f"{tuple(log_prob.shape)}")
    if kind in ("k1", "kl"):
        return log_prob - ref_log_prob
    if kind == "abs":
        return (log_prob - ref_log_prob).abs()
    if kind in ("k2", "mse"):
        return 0.5 * (log_prob - ref_log_prob).square()
    if kind in ("k3", "low_var_kl"):
        d = torch.clamp(ref_log_prob - log_prob, -20.0, 20.0)
        return torch.clamp(torch.exp(d) - d - 1, min=-10.0, max=10.0)
    raise ValueError(f"kl_loss_type: unknown estimator '{kind}'; choose one of {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, `[..., vocab] -> [...]`, computed in fp32 or wider:
    H = logsumexp(l) - sum softmax(l) * l."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)
