"""Policy losses behind a registry: a new loss is one function and one decorator.

A registered loss maps per-token tensors `[batch, response_len]` to a per-token loss matrix and metric
counts; `policy_loss_per_token` validates the input and turns the counts into python floats;
`compute_policy_loss` aggregates the matrix (aggregation.py). Notation as in seed/up-grpo.md:
r = exp(log_prob - old_log_prob), A the advantage, eps_low / eps_high the decoupled clip range, c the dual-clip
constant (`clip_ratio_c`).

Closed forms. The seed writes the dual-clip loss as three products, a max, a min and a where. For the value
and the gradient (almost everywhere) that is one clamp of the ratio:
    A > 0:  max(-A r, -A clip(r, 1-eps_low, 1+eps_high))                = -A min(r, 1+eps_high)
    A < 0:  min(-A c, max(-A r, -A clip(r, 1-eps_low, 1+eps_high)))      = -A clamp(r, 1-eps_low, c)
    A = 0:  0
(for A < 0, -A > 0 factors out: max(r, clip(r, lo, hi)) = max(r, lo), and min(c, max(r, lo)) = clamp(r, lo, c)
since lo < 1 < c). The clamp is applied to log r before exp (exp is monotone: the same value to an ulp, and exp
can never overflow, so verl's +-20 clamp of log r is not needed). The forms differ only in how a gradient is split
at an exact tie r == c (measure zero). We use them because they need a third of the temporaries and half the time
(bench/losses.py); the tests check them against the seed's and verl's literal code. The clip indicators follow
the same algebra and are compared in log space:
    pg_clipfrac       (-A clip(r) > -A r):       A < 0 and r < 1-eps_low,  or  A > 0 and r > 1+eps_high
    pg_clipfrac_lower (max(..) > -A c, A < 0):   A < 0 and r > c
ppo_kl is the seed's: the mean over valid tokens of log pi_old - log pi (not clamped).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

from upgrpo_megatron.losses.aggregation import AGG_MODES, agg_loss, masked_sum

# A loss returns (loss_mat `[batch, response_len]`, counts): counts are {metric: (numerator, denominator)}
# as 0-dim tensors; the metric is numerator / denominator (0 when the denominator is 0).
LossFn = Callable[..., Tuple[torch.Tensor, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]]
POLICY_LOSSES: Dict[str, LossFn] = {}

# verl clamps GSPO's token-form log-ratio from above (a runaway sequence ratio).
_GSPO_LOG_RATIO_MAX = 10.0


def register_policy_loss(name: str):
    """Decorator: `@register_policy_loss("my_loss")` makes `loss_mode="my_loss"` available.

    The function is called as `fn(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high,
    clip_ratio_c)` with `mask` a bool `[batch, response_len]` tensor, and returns `(loss_mat, counts)`.
    """

    def deco(fn: LossFn) -> LossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


def _n(b: torch.Tensor) -> torch.Tensor:
    # count_nonzero, not .sum(): summing a bool tensor first copies it to int64 (~70x slower on CPU)
    return torch.count_nonzero(b)


def _count(indicator: torch.Tensor, over: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(number of tokens in `over` where `indicator`, number of tokens in `over`): bool tensors."""
    return _n(indicator & over), _n(over)


def _log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    # log r_t = log pi_theta - log pi_old   (seed §1: r_t = pi_theta / pi_old)
    return log_prob - old_log_prob


def _dual_clip_neg(log_ratio, advantages, clip_low: float, clip_c: float) -> torch.Tensor:
    # L_Neg, A <= 0 (seed §4.1, appendix): min(-A c, max(-A r, -A clip(r, 1-eps_l, 1+eps_h))) = -A clamp(r, 1-eps_l, c)
    # (clamped in log space, exp after: the same value as exp is monotone, and exp can never overflow)
    return -advantages * torch.exp(torch.clamp(log_ratio, math.log(1.0 - clip_low), math.log(clip_c)))


def _clip_counts(log_ratio, pos, neg, over, clip_low, clip_high, clip_c, *, count_pos: bool):
    """pg_clipfrac / pg_clipfrac_lower counts (module docstring), compared in log space. `over`: the tokens to
    average over: the seed's negative path (A <= 0) for UP-GRPO; all valid tokens (verl) for vanilla."""
    with torch.no_grad():
        clipped = neg & (log_ratio < math.log(1.0 - clip_low))        # A < 0, r < 1 - eps_low
        if count_pos:
            clipped |= pos & (log_ratio > math.log1p(clip_high))      # A > 0, r > 1 + eps_high
        lower = neg & (log_ratio > math.log(clip_c))                   # A < 0, r > c: the dual clip
        return {"pg_clipfrac": _count(clipped, over), "pg_clipfrac_lower": _count(lower, over)}


def _kl_counts(log_ratio, mask):
    with torch.no_grad():
        # ppo_kl = mean over valid tokens of (log pi_old - log pi)   (seed's appendix)
        return {"ppo_kl": (-masked_sum(log_ratio, mask), _n(mask))}


@register_policy_loss("vanilla")
def vanilla_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """PPO/GRPO clip with decoupled low/high range (DAPO's clip-higher) and dual-clip for A < 0 (seed §1)."""
    log_ratio = _log_ratio(old_log_prob, log_prob)
    pos = advantages > 0
    # A > 0: max(-A r, -A clip(r, 1-eps_l, 1+eps_h)) = -A min(r, 1+eps_h);  A <= 0: the dual clip (as L_Neg)
    clipped = torch.where(pos, torch.clamp(log_ratio, max=math.log1p(clip_ratio_high)),
                          torch.clamp(log_ratio, math.log(1.0 - clip_ratio_low), math.log(clip_ratio_c)))
    loss = -advantages * torch.exp(clipped)
    counts = _clip_counts(log_ratio, pos, advantages < 0, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c,
                          count_pos=True)
    counts.update(_kl_counts(log_ratio, mask))
    return loss, counts


def _up_split(log_prob, advantages, pos, neg_loss):
    # UP-GRPO (seed §4.1): A > 0 -> L_Pos = -A log pi_theta (AW-SFT: no ratio, no clip); A <= 0 -> L_Neg
    return torch.where(pos, -advantages * log_prob, neg_loss)


def _up_counts(baseline_log_ratio, pos, mask, clip_high):
    with torch.no_grad():
        pos_valid = mask & pos
        return {
            "up/pos_token_frac": (_n(pos_valid), _n(mask)),
            # positive tokens whose (baseline's) ratio is above 1 + eps_high: updates the baseline would have zeroed
            "up/pos_ratio_above_clip_frac": _count(baseline_log_ratio > math.log1p(clip_high), pos_valid),
        }


@register_policy_loss("up_grpo")
def up_grpo_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """UP-GRPO: A > 0 tokens -A log pi (no ratio, no clip); A <= 0 tokens bit-identical to `vanilla`."""
    log_ratio = _log_ratio(old_log_prob, log_prob)  # used by the negative branch only
    pos = advantages > 0
    loss = _up_split(log_prob, advantages, pos, _dual_clip_neg(log_ratio, advantages, clip_ratio_low, clip_ratio_c))
    counts = _clip_counts(log_ratio, pos, advantages < 0, mask & ~pos, clip_ratio_low, clip_ratio_high, clip_ratio_c,
                          count_pos=False)
    counts.update(_kl_counts(log_ratio, mask))
    counts.update(_up_counts(log_ratio, pos, mask, clip_ratio_high))
    return loss, counts


def gspo_token_log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level ratio in its token form (GSPO paper, "GSPO-token"), `[batch, response_len]`.

    The value of every token's ratio is the sequence ratio s_i; its gradient is s_i * grad log pi_t, so that
    with seq-mean-token-mean aggregation the gradient is the paper's (1/G) sum_i s_i A_i (1/|y_i|) sum_t grad log pi.
    """
    # log s_i = (1/|y_i|) sum_t log(pi_theta(y_it) / pi_old(y_it))   (GSPO: length-normalised sequence ratio)
    n_tokens = mask.sum(-1, dtype=torch.int32).clamp(min=1)
    seq_log_ratio = masked_sum(log_prob - old_log_prob, mask, -1) / n_tokens.to(log_prob.dtype)
    # log s_it = sg[log s_i] + log pi_t - sg[log pi_t]   (GSPO-token: stop-gradient form), clamped as verl
    return torch.clamp(seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach(), max=_GSPO_LOG_RATIO_MAX)


def _gspo_clip(seq_ratio, advantages, clip_low, clip_high):
    pg_losses1 = -advantages * seq_ratio                                            # -A s
    pg_losses2 = -advantages * torch.clamp(seq_ratio, 1 - clip_low, 1 + clip_high)  # -A clip(s, 1-eps_l, 1+eps_h)
    return torch.maximum(pg_losses1, pg_losses2), pg_losses1, pg_losses2            # GSPO: max(.,.), no dual clip


@register_policy_loss("gspo")
def gspo_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """GSPO: the PPO clip applied to the length-normalised sequence ratio (no dual clip, as in GSPO and verl).

    GSPO's paper aggregates with seq-mean-token-mean; here the aggregation is the caller's `loss_agg_mode`."""
    seq_ratio = torch.exp(gspo_token_log_ratio(old_log_prob, log_prob, mask))
    loss, pg_losses1, pg_losses2 = _gspo_clip(seq_ratio, advantages, clip_ratio_low, clip_ratio_high)
    with torch.no_grad():
        counts = {"pg_clipfrac": _count(pg_losses2 > pg_losses1, mask),
                  "pg_clipfrac_lower": (torch.zeros((), dtype=torch.long, device=mask.device), _n(mask))}
    counts.update(_kl_counts(log_prob.detach() - old_log_prob, mask))
    return loss, counts


@register_policy_loss("up_gspo")
def up_gspo_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """Seed §4.4: A > 0 as in UP-GRPO (-A log pi), A <= 0 with GSPO's sequence-ratio clip."""
    seq_log_ratio = gspo_token_log_ratio(old_log_prob, log_prob, mask)
    neg_loss, pg_losses1, pg_losses2 = _gspo_clip(torch.exp(seq_log_ratio), advantages, clip_ratio_low,
                                                  clip_ratio_high)
    pos = advantages > 0
    loss = _up_split(log_prob, advantages, pos, neg_loss)
    with torch.no_grad():
        neg = mask & ~pos
        counts = {"pg_clipfrac": _count(pg_losses2 > pg_losses1, neg),
                  "pg_clipfrac_lower": (torch.zeros((), dtype=torch.long, device=neg.device), _n(neg))}
    counts.update(_kl_counts(log_prob.detach() - old_log_prob, mask))
    # the baseline here is GSPO: the ratio it would have clipped is the sequence ratio
    counts.update(_up_counts(seq_log_ratio.detach(), pos, mask, clip_ratio_high))
    return loss, counts


def _validate(old_log_prob, log_prob, advantages, response_mask, loss_mode, clip_ratio_low, clip_ratio_high,
              clip_ratio_c):
    shape = tuple(log_prob.shape)
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected [batch, response_len], got shape {shape}")
    if not log_prob.is_floating_point():
        raise ValueError(f"log_prob: expected a floating-point tensor, got {log_prob.dtype}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match log_prob's {shape}")
    if loss_mode not in POLICY_LOSSES:
        raise ValueError(f"loss_mode: unknown mode '{loss_mode}'; choose one of {', '.join(sorted(POLICY_LOSSES))}")
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low: must be in [0, 1) (the ratio's lower bound is 1 - it), got {clip_ratio_low}")
    if not clip_ratio_high >= 0.0:
        raise ValueError(f"clip_ratio_high: must be >= 0, got {clip_ratio_high}")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1.0, got {clip_ratio_c}")


def policy_loss_per_token(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                          response_mask: torch.Tensor, *, loss_mode: str = "up_grpo", clip_ratio_low: float = 0.2,
                          clip_ratio_high: float = 0.28, clip_ratio_c: float = 3.0
                          ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The per-token policy loss `[batch, response_len]` (differentiable; masked tokens hold a value but the
    aggregation ignores them) and the metrics as python floats. For diagnostics; training calls
    `compute_policy_loss`."""
    _validate(old_log_prob, log_prob, advantages, response_mask, loss_mode, clip_ratio_low, clip_ratio_high,
              clip_ratio_c)
    mask = response_mask if response_mask.dtype == torch.bool else response_mask > 0
    loss_mat, counts = POLICY_LOSSES[loss_mode](old_log_prob, log_prob, advantages, mask,
                                                clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                                clip_ratio_c=clip_ratio_c)
    # one device->host transfer for all metrics
    flat = torch.stack([x.detach().double() for pair in counts.values() for x in pair]).tolist()
    metrics = {k: (flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] > 0 else 0.0) for i, k in enumerate(counts)}
    return loss_mat, metrics


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, *, loss_mode: str = "up_grpo", clip_ratio_low: float = 0.2,
                        clip_ratio_high: float = 0.28, clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean",
                        global_token_count: Optional[float] = None, global_seq_count: Optional[float] = None,
                        max_response_length: Optional[int] = None, return_loss_mat: bool = False):
    """Policy loss of `loss_mode`, aggregated with `loss_agg_mode`.

    Args:
        old_log_prob, log_prob, advantages, response_mask: `[batch, response_len]`; only log_prob carries a
            gradient. response_mask: 1/True = a real response token.
        global_token_count / global_seq_count / max_response_length: normalisers of the whole mini-batch over
            micro-batches and data-parallel ranks (see aggregation.py); None = this batch alone.
    Returns:
        (loss scalar, metrics {"pg_clipfrac", "ppo_kl", "pg_clipfrac_lower", "up/...": float}), plus the per-token
        loss matrix when `return_loss_mat`.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode '{loss_agg_mode}'; choose one of {', '.join(AGG_MODES)}")
    mask = response_mask if response_mask.dtype == torch.bool else response_mask > 0  # converted once, here
    loss_mat, metrics = policy_loss_per_token(old_log_prob, log_prob, advantages, mask, loss_mode=loss_mode,
                                              clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                              clip_ratio_c=clip_ratio_c)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, global_token_count=global_token_count,
                    global_seq_count=global_seq_count, max_response_length=max_response_length)
    return (loss, metrics, loss_mat) if return_loss_mat else (loss, metrics)
