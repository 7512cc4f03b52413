"""Masked reductions and loss aggregation (verl's `agg_loss` modes), exact under gradient accumulation.

Every mode is a *sum* over this micro-batch's valid tokens divided by a normaliser (l = per-token loss,
m = response mask, n_i = sum_t m_it, L = a constant length):

    token-mean               sum_{i,t} l_it m_it / N_tokens
    seq-mean-token-sum       sum_i (sum_t l_it m_it) / N_seqs
    seq-mean-token-mean      sum_i (sum_t l_it m_it / n_i) / N_seqs
    seq-mean-token-sum-norm  sum_{i,t} l_it m_it / L                  (verl's Dr. GRPO mode; L = max response length)

N_seqs counts sequences with at least one valid token (fully masked rows, e.g. data-parallel padding rows,
count for nothing), as in verl.

Gradient accumulation. Because each mode is (sum over tokens or sequences) / (normaliser), the loss of one big
batch equals the SUM of the micro-batch losses if every micro-batch divides by the normaliser of the big batch.
The caller (the actor) therefore passes, for each mini-batch:
    global_token_count  = valid tokens in the whole mini-batch, over all micro-batches and all DP ranks
    global_seq_count    = sequences with >= 1 valid token in the whole mini-batch, likewise
    max_response_length = the constant L (the recipe's data.max_response_length; default: this tensor's width)
sums (not averages) the micro-batch losses, and, if the data-parallel all-reduce averages gradients over the
DP ranks (Megatron DDP does), multiplies the loss by the DP size before backward. Then the gradient on every rank
is exactly the gradient of the one-big-batch loss. With all three left None, the normaliser is this batch's own
(the one-batch case). (verl expresses the same thing with `batch_num_tokens` / `global_batch_size` / `dp_size`.)
"""

from __future__ import annotations

from typing import Optional

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


def _count_dtype(dtype: torch.dtype) -> torch.dtype:
    # counts stay exact: a bf16/fp16 loss is divided in fp32 (bf16 cannot hold 1001 exactly)
    return torch.promote_types(dtype, torch.float32)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of x where mask is set. Values under the mask's zeros are ignored even if inf/NaN (padding), also in
    the gradient."""
    valid = torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return valid.sum() if dim is None else valid.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is set; 0 where the mask is empty (never NaN)."""
    count = torch.count_nonzero(_bool(mask)) if dim is None else _bool(mask).sum(dim, dtype=torch.int32)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(_count_dtype(x.dtype))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the masked elements (Bessel-corrected when `unbiased`, as verl)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = int(_bool(mask).sum())
        if n < 2:
            raise ValueError(f"masked_var: the unbiased variance needs at least 2 masked elements, got {n}")
        var = var * (n / (n - 1))
    return var


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str = "token-mean", *,
             global_token_count: Optional[float] = None, global_seq_count: Optional[float] = None,
             max_response_length: Optional[int] = None) -> torch.Tensor:
    """Aggregate a `[batch, response_len]` per-token loss into a scalar (see the module docstring).

    Args:
        loss_mat: `[batch, response_len]` per-token loss; loss_mask: `[batch, response_len]`, 1/True = valid.
        global_token_count, global_seq_count, max_response_length: the whole mini-batch's normalisers (None:
            this batch's own).
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode '{loss_agg_mode}'; choose one of {', '.join(AGG_MODES)}")
    if tuple(loss_mat.shape) != tuple(loss_mask.shape):
        raise ValueError(f"loss_mask: shape {tuple(loss_mask.shape)} does not match loss_mat's {tuple(loss_mat.shape)}")
    for name, v in (("global_token_count", global_token_count), ("global_seq_count", global_seq_count)):
        if v is not None and float(v) < 0:
            raise ValueError(f"{name}: must be >= 0, got {v}")
    if max_response_length is not None and max_response_length < 1:
        raise ValueError(f"max_response_length: must be >= 1, got {max_response_length}")
    mask = _bool(loss_mask)
    if loss_agg_mode == "token-mean":
        n_tok = (torch.count_nonzero(mask) if global_token_count is None
                 else torch.tensor(float(global_token_count), device=mask.device))
        return masked_sum(loss_mat, mask) / n_tok.clamp(min=1).to(_count_dtype(loss_mat.dtype))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        length = loss_mat.shape[-1] if max_response_length is None else max_response_length
        return masked_sum(loss_mat, mask) / float(length)
    seq_tokens = mask.sum(-1, dtype=torch.int32)
    n_seq = (torch.count_nonzero(seq_tokens) if global_seq_count is None
             else torch.tensor(float(global_seq_count), device=mask.device))
    seq_sum = masked_sum(loss_mat, mask, -1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_sum = seq_sum / seq_tokens.clamp(min=1).to(_count_dtype(loss_mat.dtype))
    return seq_sum.sum() / n_seq.clamp(min=1).to(_count_dtype(loss_mat.dtype))
