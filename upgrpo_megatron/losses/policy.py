"""Policy losses behind a registry: a new loss is one function and one decorator.

A registered loss maps per-token tensors `[batch, response_len]` to a per-token loss matrix and per-token
metric indicators; `compute_policy_loss` validates the input, aggregates (aggregation.py) and turns the
metrics into python floats. Notation as in seed/up-grpo.md: r = exp(log_prob - old_log_prob), A the
advantage, eps_low/eps_high the decoupled clip range, c the dual-clip constant.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from upgrpo_megatron.losses.aggregation import AGG_MODES, agg_loss, masked_mean

# A loss returns (loss_mat, indicators): indicators are {name: (per-token 0/1 or value, mask to average over)}.
LossFn = Callable[..., Tuple[torch.Tensor, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]]
POLICY_LOSSES: Dict[str, LossFn] = {}

# verl clamps the log-ratio before exp so that one wild token cannot overflow the ratio to inf.
_LOG_RATIO_CLAMP = 20.0


def register_policy_loss(name: str):
    def deco(fn: LossFn) -> LossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def _dual_clip_grpo(log_ratio, advantages, clip_low, clip_high, clip_c):
    """Per-token dual-clip PPO/GRPO loss and its clip indicators (seed §1, appendix)."""
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio                                            # -A r
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)  # -A clip(r, 1-eps_l, 1+eps_h)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)                     # max(.,.): the PPO clip
    pg_losses3 = -advantages * clip_c                                           # -A c: dual-clip bound
    clip_pg_losses2 = torch.minimum(pg_losses3, clip_pg_losses1)                # min(-A c, .) for A < 0
    loss = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    clipped = torch.gt(pg_losses2, pg_losses1).to(loss.dtype)
    clipped_lower = torch.gt(clip_pg_losses1, pg_losses3).to(loss.dtype) * (advantages < 0).to(loss.dtype)
    return loss, ratio, clipped, clipped_lower


@register_policy_loss("vanilla")
def vanilla_loss(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low, clip_ratio_high,
                 clip_ratio_c):
    """PPO/GRPO clip with decoupled low/high range (DAPO's clip-higher) and dual-clip for A < 0."""
    log_ratio = torch.clamp(log_prob - old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    loss, ratio, clipped, clipped_lower = _dual_clip_grpo(log_ratio, advantages, clip_ratio_low,
                                                          clip_ratio_high, clip_ratio_c)
    m = response_mask
    return loss, {"pg_clipfrac": (clipped, m), "pg_clipfrac_lower": (clipped_lower, m),
                  "ppo_kl": (-log_ratio.detach(), m), "ratio_mean": (ratio.detach(), m)}


def _up_split(old_log_prob, log_prob, advantages, response_mask, clip_ratio_high, neg_loss, neg_ind, ratio):
    """UP-GRPO's split (seed §4.1): A > 0 -> -A log pi (AW-SFT, no ratio, no clip); A <= 0 -> the baseline."""
    pos_loss = -advantages * log_prob                        # L_Pos = -A log pi_theta
    loss = torch.where(advantages > 0, pos_loss, neg_loss)   # L_Neg = the baseline's clipped loss
    pos = (advantages > 0).to(loss.dtype) * response_mask
    neg = (advantages <= 0).to(loss.dtype) * response_mask
    # the seed logs clip fractions over the negative path only
    ind = {k: (v, neg) for k, (v, _) in neg_ind.items() if k in ("pg_clipfrac", "pg_clipfrac_lower")}
    ind.update({k: v for k, v in neg_ind.items() if k not in ind})
    ind["up/pos_token_frac"] = (pos, response_mask)
    # positive tokens whose ratio is above 1 + eps_high: updates the baseline's clip would have zeroed
    ind["up/pos_ratio_above_clip_frac"] = ((ratio.detach() > 1 + clip_ratio_high).to(loss.dtype), pos)
    return loss, ind


@register_policy_loss("up_grpo")
def up_grpo_loss(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low, clip_ratio_high,
                 clip_ratio_c):
    neg_loss, neg_ind = vanilla_loss(old_log_prob, log_prob, advantages, response_mask,
                                     clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                     clip_ratio_c=clip_ratio_c)
    ratio = neg_ind["ratio_mean"][0]
    return _up_split(old_log_prob, log_prob, advantages, response_mask, clip_ratio_high, neg_loss, neg_ind, ratio)


def gspo_token_log_ratio(old_log_prob, log_prob, response_mask):
    """GSPO's sequence-level ratio in its token form (GSPO paper, eq. for GSPO-token):

    log s_i = (1/|y_i|) sum_t (log pi_t - log old_t);  log r_it = sg(log s_i) + log pi_t - sg(log pi_t).
    The value of r_it is the sequence ratio s_i; its gradient is s_i * grad log pi_t.
    """
    mask = response_mask.to(log_prob.dtype)
    seq_log_ratio = ((log_prob - old_log_prob) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    seq_log_ratio = torch.clamp(seq_log_ratio, max=10.0)  # as verl: keeps exp finite for a runaway sequence
    return seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach()


@register_policy_loss("gspo")
def gspo_loss(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low, clip_ratio_high,
              clip_ratio_c):
    """GSPO: the PPO clip applied to the length-normalised sequence ratio (no dual clip, as in GSPO)."""
    log_ratio = gspo_token_log_ratio(old_log_prob, log_prob, response_mask)
    ratio = torch.exp(log_ratio)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    loss = torch.maximum(pg_losses1, pg_losses2)
    m = response_mask
    clipped = torch.gt(pg_losses2, pg_losses1).to(loss.dtype)
    return loss, {"pg_clipfrac": (clipped, m), "pg_clipfrac_lower": (torch.zeros_like(loss), m),
                  "ppo_kl": (-(log_prob - old_log_prob).detach(), m), "ratio_mean": (ratio.detach(), m)}


@register_policy_loss("up_gspo")
def up_gspo_loss(old_log_prob, log_prob, advantages, response_mask, *, clip_ratio_low, clip_ratio_high,
                 clip_ratio_c):
    """Seed §4.4: A > 0 as in UP-GRPO, A <= 0 with GSPO's sequence-ratio clip."""
    neg_loss, neg_ind = gspo_loss(old_log_prob, log_prob, advantages, response_mask,
                                  clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                  clip_ratio_c=clip_ratio_c)
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return _up_split(old_log_prob, log_prob, advantages, response_mask, clip_ratio_high, neg_loss, neg_ind, ratio)


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, *, loss_mode: str = "up_grpo", clip_ratio_low: float = 0.2,
                        clip_ratio_high: float = 0.28, clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean",
                        global_token_count: Optional[float] = None, global_seq_count: Optional[float] = None,
                        max_response_length: Optional[int] = None, return_loss_mat: bool = False):
    """Policy loss of `loss_mode`, aggregated with `loss_agg_mode`.

    Args:
        old_log_prob, log_prob, advantages, response_mask: `[batch, response_len]`.
        global_token_count / global_seq_count: normalisers of the whole mini-batch over micro-batches and
            data-parallel ranks (see aggregation.py); None = this batch alone.
    Returns:
        (loss scalar, metrics: {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", ...: float}), plus the per-token
        loss matrix when `return_loss_mat`.
    """
    shape = tuple(log_prob.shape)
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match log_prob's {shape}")
    if loss_mode not in POLICY_LOSSES:
        raise ValueError(f"loss_mode: unknown mode '{loss_mode}'; choose one of {', '.join(sorted(POLICY_LOSSES))}")
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode '{loss_agg_mode}'; choose one of {', '.join(AGG_MODES)}")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1.0, got {clip_ratio_c}")
    mask = response_mask.to(log_prob.dtype)
    loss_mat, indicators = POLICY_LOSSES[loss_mode](
        old_log_prob, log_prob, advantages, mask, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, global_token_count=global_token_count,
                    global_seq_count=global_seq_count, max_response_length=max_response_length)
    with torch.no_grad():
        metrics = {k: float(masked_mean(v.double(), w.double())) for k, (v, w) in indicators.items()}
    return (loss, metrics, loss_mat) if return_loss_mat else (loss, metrics)
