"""Masked reductions and loss aggregation (verl's `agg_loss` modes), exact under gradient accumulation.

Every mode is a *sum* over this micro-batch's tokens divided by a normaliser. When the caller passes the
normaliser of the whole mini-batch (`global_token_count`: valid tokens over all micro-batches and all
data-parallel ranks; `global_seq_count`: sequences with at least one valid token, likewise), summing the
micro-batch losses (and summing gradients over DP ranks) gives exactly the loss of one big batch. Without
them, the normaliser is this batch's own count (the one-batch case).

    token-mean               sum_{i,t} l_it m_it / N_tokens
    seq-mean-token-sum       sum_i (sum_t l_it m_it) / N_seqs
    seq-mean-token-mean      sum_i (sum_t l_it m_it / sum_t m_it) / N_seqs
    seq-mean-token-sum-norm  sum_i (sum_t l_it m_it) / (N_seqs * L)     (Dr. GRPO: L = max response length)
"""

from __future__ import annotations

from typing import Optional

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1; 0 where the mask is empty (never NaN)."""
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
             global_token_count: Optional[float] = None, global_seq_count: Optional[float] = None,
             max_response_length: Optional[int] = None) -> torch.Tensor:
    """Aggregate a `[batch, response_len]` per-token loss into a scalar (see module docstring)."""
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode '{loss_agg_mode}'; choose one of {', '.join(AGG_MODES)}")
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        n = global_token_count if global_token_count is not None else mask.sum()
        return masked_sum(loss_mat, mask) / max(float(n), 1.0)
    seq_tokens = mask.sum(-1)
    n_seq = global_seq_count if global_seq_count is not None else (seq_tokens > 0).sum()
    n_seq = max(float(n_seq), 1.0)
    seq_sum = masked_sum(loss_mat, mask, -1)
    if loss_agg_mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if loss_agg_mode == "seq-mean-token-mean":
        return (seq_sum / seq_tokens.clamp(min=1)).sum() / n_seq
    length = max_response_length if max_response_length is not None else loss_mat.shape[-1]
    return seq_sum.sum() / (n_seq * float(length))
