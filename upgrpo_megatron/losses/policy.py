"""Policy losses behind a registry: a new loss is one function and one decorator.

A registered loss maps per-token tensors `[batch, response_len]` to a per-token loss matrix and metric
counts; `policy_loss_per_token` validates the input, applies optional per-token weights (correction.py) and turns
the counts into python floats; `compute_policy_loss` aggregates the matrix (aggregation.py).

Notation (as in the UP-GRPO post): r = exp(log_prob - old_log_prob) the token ratio pi_theta / pi_old, A the
advantage, eps_low / eps_high the decoupled clip range, c the dual-clip constant (`clip_ratio_c`), sg the
stop-gradient, s_i the GSPO sequence ratio exp(mean over the valid tokens of sequence i of log r).

Loss modes (per-token loss; the aggregation is the caller's `loss_agg_mode`):
    vanilla   A > 0: max(-A r, -A clip(r, 1-eps_low, 1+eps_high));  A < 0: min(-A c, that max);  A = 0: 0
              PPO's clip (Schulman et al. 2017, arXiv 1707.06347) with DAPO's decoupled clip-higher (Yu et al. 2025,
              arXiv 2503.14476) and the dual clip (Ye et al. 2020, arXiv 1912.09729), as verl's vanilla loss
    up_grpo   A > 0: -A log pi (advantage-weighted SFT: no ratio, no clip);  A <= 0: as vanilla    (the UP-GRPO post)
    gspo      max(-A s, -A clip(s, 1-eps_low, 1+eps_high)) with s the GSPO-token ratio (value s_i, gradient
              s_i grad log pi_t), no dual clip                   GSPO (Zheng et al. 2025, arXiv 2507.18071)
    up_gspo   A > 0: -A log pi;  A <= 0: as gspo                                                   (the UP-GRPO post)
    topr      A > 0: -A log pi;  A <= 0: -sg(clamp(r, 0, 1)) A log pi, r the TOKEN ratio
              Tapered Off-Policy REINFORCE (Le Roux et al. 2025, arXiv 2503.14286). The paper writes the truncated
              ratio per trajectory, pi(tau) / mu(tau); alibaba/ROLL's `pg_variant='topr'` (the rlvr actor worker's
              TOPR loss) truncates the per-token ratio exp(log pi - log pi_old), and we follow ROLL. ROLL splits the
              two branches by the sign of the sequence's reward; we split by the sign of A (with outcome advantages
              the same split per sequence, and A = 0 tokens contribute 0 on either branch).
    cispo     -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi for every token (REINFORCE with a clipped,
              stop-gradient IS weight: no token loses its gradient)   CISPO, MiniMax-M1 (arXiv 2506.13585)
              Bounds: the loss's clip_ratio_low / clip_ratio_high. With the function defaults (0.2, 0.28) the weight
              is clipped to [0.8, 1.28]. MiniMax sets eps_low "to a large value" (no lower bound) and tunes only
              eps_high; verl's CISPO example recipe passes clip_ratio_low=10, clip_ratio_high=0.2. cispo therefore
              accepts clip_ratio_low >= 1, meaning no lower bound (1 - eps_low <= 0 < r).

Metrics (python floats; each a count ratio, 0 when its denominator is 0; no gradient):
    pg_clipfrac                 tokens whose clip is active (indicator per mode, below) / ALL valid tokens
    pg_clipfrac_lower           A < 0 tokens where the dual clip is active (r > c) / ALL valid tokens (0 without
                                a dual clip: gspo, up_gspo, topr, cispo)
    neg/pg_clipfrac             the same clip indicator, among the A <= 0 valid tokens only
    ppo_kl                      mean over valid tokens of log pi_old - log pi (not clamped)
    pos/ratio_above_clip_frac   A > 0 valid tokens whose ratio exceeds 1 + eps_high: the tokens DAPO's clip zeroes
                                and the UP modes keep. The ratio the mode's clip sees: r, or s_i for gspo / up_gspo.
    ratio/pos_mean, ratio/pos_var   mean and population variance (divide by n) of the token ratio r over the A > 0
    ratio/neg_mean, ratio/neg_var   valid tokens, and over the A <= 0 valid tokens (float64; r capped at e^300)
    up/pos_token_frac           (up_grpo, up_gspo) A > 0 valid tokens / valid tokens
    up/pos_ratio_above_clip_frac  (up_grpo, up_gspo) the same number as pos/ratio_above_clip_frac
Clip indicators ("the clip is active"):
    vanilla   -A clip(r) > -A r, i.e. A < 0 and r < 1-eps_low, or A > 0 and r > 1+eps_high
    up_grpo   A < 0 and r < 1-eps_low (the positive branch has no clip)
    gspo      -A clip(s) > -A s;   up_gspo: the same among A <= 0 tokens
    topr      A <= 0 and r > 1 (the negative branch's weight was truncated to 1)
    cispo     r outside [1-eps_low, 1+eps_high] (the IS weight was clipped, whatever A: verl's definition)
Until this version up_grpo / up_gspo divided pg_clipfrac by the A <= 0 tokens only, so their clip fraction was not
comparable with vanilla's; neg/pg_clipfrac now carries that figure, with the same denominator in every mode.

Closed forms. The post writes the dual-clip loss as three products, a max, a min and a where. For the value and
the gradient (almost everywhere) that is one clamp of the ratio:
    A > 0:  max(-A r, -A clip(r, 1-eps_low, 1+eps_high))                = -A min(r, 1+eps_high)
    A < 0:  min(-A c, max(-A r, -A clip(r, 1-eps_low, 1+eps_high)))      = -A clamp(r, 1-eps_low, c)
    A = 0:  0
(for A < 0, -A > 0 factors out: max(r, clip(r, lo, hi)) = max(r, lo), and min(c, max(r, lo)) = clamp(r, lo, c)
since lo < 1 < c). The clamp is applied to log r before exp (exp is monotone: the same value to an ulp, and exp
can never overflow, so verl's +-20 clamp of log r is not needed). The forms differ only in how a gradient is split
at an exact tie r == c (measure zero). We use them because they need a third of the temporaries and half the time
(bench/losses.py); the tests check them against oracles written from the equations. The clip indicators follow
the same algebra and are compared in log space.
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
# modes whose clip_ratio_low may be >= 1 (no lower bound on the ratio): see register_policy_loss
_NO_LOWER_BOUND_OK: set = set()

# verl clamps GSPO's token-form log-ratio from above (a runaway sequence ratio).
_GSPO_LOG_RATIO_MAX = 10.0
# the ratio summaries (ratio/*) cap log r here: e^600 and (n e^300)^2 are finite in float64
_RATIO_STATS_LOG_MAX = 300.0


def register_policy_loss(name: str, *, clip_low_may_exceed_one: bool = False):
    """Decorator: `@register_policy_loss("my_loss")` makes `loss_mode="my_loss"` available.

    The function is called as `fn(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high,
    clip_ratio_c)` with `mask` a bool `[batch, response_len]` tensor, and returns `(loss_mat, counts)`.
    `clip_low_may_exceed_one`: the loss accepts clip_ratio_low >= 1 (its ratio then has no lower bound); every
    other loss requires clip_ratio_low in [0, 1). Registering a name twice raises ValueError.
    """

    def deco(fn: LossFn) -> LossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"register_policy_loss: a loss named '{name}' is already registered")
        POLICY_LOSSES[name] = fn
        if clip_low_may_exceed_one:
            _NO_LOWER_BOUND_OK.add(name)
        return fn

    return deco


def _log_ratio(old_log_prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    # log r_t = log pi_theta - log pi_old   (r_t = pi_theta / pi_old)
    return log_prob - old_log_prob


def _common_counts(log_ratio, clip_log_ratio, clipped, lower, pos, mask, clip_high):
    """The metrics every mode reports (module docstring). log_ratio: the token log r; clip_log_ratio: the log of
    the ratio the mode's clip sees (log r, or log s_i for GSPO); clipped / lower: the mode's clip indicators
    (lower None: no dual clip)."""
    with torch.no_grad():
        pos_valid, neg_valid = mask & pos, mask & ~pos
        # A > 0 tokens above 1 + eps_high: those DAPO's clip zeroes, the UP modes keep
        above = pos_valid & (clip_log_ratio.detach() > math.log1p(clip_high))
        flags = [mask, pos_valid, neg_valid, clipped & mask, clipped & neg_valid, above]
        if lower is not None:
            flags.append(lower & mask)
        # count_nonzero over the whole tensor, not .sum() and not count_nonzero(dim=...): both first copy the bools
        # to int64 (~70x slower on CPU)
        n = [torch.count_nonzero(f) for f in flags]
        n_valid, n_pos, n_neg = n[0], n[1], n[2]
        zero = torch.zeros((), dtype=n_valid.dtype, device=n_valid.device)
        log_r = torch.where(mask, log_ratio.detach(), 0.0)  # padding's inf / NaN never enter
        # sum r and sum r^2 over the A > 0 and the A <= 0 tokens, in float64; log r is capped at 300 so that every
        # r^2 and (sum r)^2 stays finite (a ratio above e^300 enters as e^300)
        # (only the selected tokens are widened: a float64 copy of the whole [batch, response_len] was 4x the
        # bf16 inputs' memory)
        sums = []
        for sel in (pos_valid, neg_valid):
            r_sel = torch.exp(log_r[sel].double().clamp(max=_RATIO_STATS_LOG_MAX))
            sums.append((r_sel.sum(), torch.dot(r_sel, r_sel)))
        # population variance (1/n) sum (r - mean)^2 = (sum r^2 - (sum r)^2 / n) / n
        (s1_pos, s2_pos), (s1_neg, s2_neg) = sums
        var_pos = (s2_pos - s1_pos * s1_pos / n_pos.clamp(min=1)).clamp(min=0.0)
        var_neg = (s2_neg - s1_neg * s1_neg / n_neg.clamp(min=1)).clamp(min=0.0)
        return {
            "pg_clipfrac": (n[3], n_valid),
            "pg_clipfrac_lower": (n[6] if lower is not None else zero, n_valid),
            "neg/pg_clipfrac": (n[4], n_neg),
            "ppo_kl": (-log_r.sum(), n_valid),  # mean over valid tokens of (log pi_old - log pi)
            "pos/ratio_above_clip_frac": (n[5], n_pos),
            "ratio/pos_mean": (s1_pos, n_pos), "ratio/pos_var": (var_pos, n_pos),
            "ratio/neg_mean": (s1_neg, n_neg), "ratio/neg_var": (var_neg, n_neg),
        }


def _up_counts(counts):
    """The up/ names: A > 0 valid tokens / valid tokens, and pos/ratio_above_clip_frac under its older name."""
    counts["up/pos_token_frac"] = (counts["ratio/pos_mean"][1], counts["ppo_kl"][1])
    counts["up/pos_ratio_above_clip_frac"] = counts["pos/ratio_above_clip_frac"]
    return counts


def _dual_clip_neg(log_ratio, advantages, clip_low: float, clip_c: float) -> torch.Tensor:
    # L_Neg, A <= 0: min(-A c, max(-A r, -A clip(r, 1-eps_l, 1+eps_h))) = -A clamp(r, 1-eps_l, c)
    # (clamped in log space, exp after: the same value as exp is monotone, and exp can never overflow)
    return -advantages * torch.exp(torch.clamp(log_ratio, math.log(1.0 - clip_low), math.log(clip_c)))


def _dual_clip_indicators(log_ratio, pos, neg, clip_low, clip_high, clip_c, *, count_pos: bool):
    """(clipped, lower) bool tensors (module docstring), compared in log space."""
    with torch.no_grad():
        clipped = neg & (log_ratio < math.log(1.0 - clip_low))        # A < 0, r < 1 - eps_low
        if count_pos:
            clipped |= pos & (log_ratio > math.log1p(clip_high))      # A > 0, r > 1 + eps_high
        lower = neg & (log_ratio > math.log(clip_c))                   # A < 0, r > c: the dual clip
        return clipped, lower


@register_policy_loss("vanilla")
def vanilla_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """PPO/GRPO clip with decoupled low/high range (DAPO's clip-higher) and dual-clip for A < 0."""
    log_ratio = _log_ratio(old_log_prob, log_prob)
    pos = advantages > 0
    # A > 0: max(-A r, -A clip(r, 1-eps_l, 1+eps_h)) = -A min(r, 1+eps_h);  A <= 0: the dual clip (as L_Neg)
    clipped = torch.where(pos, torch.clamp(log_ratio, max=math.log1p(clip_ratio_high)),
                          torch.clamp(log_ratio, math.log(1.0 - clip_ratio_low), math.log(clip_ratio_c)))
    loss = -advantages * torch.exp(clipped)
    ind, lower = _dual_clip_indicators(log_ratio, pos, advantages < 0, clip_ratio_low, clip_ratio_high,
                                       clip_ratio_c, count_pos=True)
    return loss, _common_counts(log_ratio, log_ratio, ind, lower, pos, mask, clip_ratio_high)


def _up_split(log_prob, advantages, pos, neg_loss):
    # UP-GRPO: A > 0 -> L_Pos = -A log pi_theta (AW-SFT: no ratio, no clip); A <= 0 -> L_Neg
    return torch.where(pos, -advantages * log_prob, neg_loss)


@register_policy_loss("up_grpo")
def up_grpo_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """UP-GRPO: A > 0 tokens -A log pi (no ratio, no clip); A <= 0 tokens bit-identical to `vanilla`."""
    log_ratio = _log_ratio(old_log_prob, log_prob)  # used by the negative branch only
    pos = advantages > 0
    loss = _up_split(log_prob, advantages, pos, _dual_clip_neg(log_ratio, advantages, clip_ratio_low, clip_ratio_c))
    ind, lower = _dual_clip_indicators(log_ratio, pos, advantages < 0, clip_ratio_low, clip_ratio_high,
                                       clip_ratio_c, count_pos=False)
    return loss, _up_counts(_common_counts(log_ratio, log_ratio, ind, lower, pos, mask, clip_ratio_high))


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
    seq_log_ratio = gspo_token_log_ratio(old_log_prob, log_prob, mask)
    loss, pg_losses1, pg_losses2 = _gspo_clip(torch.exp(seq_log_ratio), advantages, clip_ratio_low, clip_ratio_high)
    with torch.no_grad():
        ind = pg_losses2 > pg_losses1  # -A clip(s) > -A s
    return loss, _common_counts(log_prob.detach() - old_log_prob, seq_log_ratio, ind, None, advantages > 0, mask,
                                clip_ratio_high)


@register_policy_loss("up_gspo")
def up_gspo_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """The UP-GRPO post's UP-GSPO: A > 0 as in UP-GRPO (-A log pi), A <= 0 with GSPO's sequence-ratio clip."""
    seq_log_ratio = gspo_token_log_ratio(old_log_prob, log_prob, mask)
    neg_loss, pg_losses1, pg_losses2 = _gspo_clip(torch.exp(seq_log_ratio), advantages, clip_ratio_low,
                                                  clip_ratio_high)
    pos = advantages > 0
    loss = _up_split(log_prob, advantages, pos, neg_loss)
    with torch.no_grad():
        ind = (pg_losses2 > pg_losses1) & ~pos  # GSPO's clip, on the negative branch only
    # the baseline here is GSPO: the ratio it would have clipped is the sequence ratio
    counts = _common_counts(log_prob.detach() - old_log_prob, seq_log_ratio, ind, None, pos, mask, clip_ratio_high)
    return loss, _up_counts(counts)


@register_policy_loss("topr")
def topr_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """TOPR: A > 0 tokens -A log pi (no IS); A <= 0 tokens -sg(clamp(r, 0, 1)) A log pi with the token ratio r
    (ROLL's choice; module docstring). The clip arguments are used by the metrics only."""
    log_ratio = _log_ratio(old_log_prob, log_prob.detach())  # the ratio carries no gradient here
    pos = advantages > 0
    with torch.no_grad():
        # sg(clamp(r, 0, 1)) = exp(min(log r, 0))   (r > 0: the lower clamp never binds)
        taper = torch.exp(torch.clamp(log_ratio, max=0.0))
        weight = torch.where(pos, torch.ones((), dtype=taper.dtype, device=taper.device), taper)
        ind = ~pos & (log_ratio > 0.0)  # A <= 0, r > 1: the weight was truncated
    # L = -w A log pi, w = 1 (A > 0) or sg(min(r, 1)) (A <= 0)   (TOPR's gradient: w A grad log pi)
    loss = -(weight * advantages) * log_prob
    return loss, _common_counts(log_ratio, log_ratio, ind, None, pos, mask, clip_ratio_high)


@register_policy_loss("cispo", clip_low_may_exceed_one=True)
def cispo_loss(old_log_prob, log_prob, advantages, mask, *, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    """CISPO: -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi on every token; clip_ratio_low >= 1 = no lower bound."""
    log_ratio = _log_ratio(old_log_prob, log_prob.detach())  # the ratio carries no gradient here
    log_lo = math.log(1.0 - clip_ratio_low) if clip_ratio_low < 1.0 else -math.inf
    log_hi = math.log1p(clip_ratio_high)
    with torch.no_grad():
        # sg(clip(r, 1-eps_l, 1+eps_h)), clipped in log space
        weight = torch.exp(torch.clamp(log_ratio, max=log_hi) if log_lo == -math.inf
                           else torch.clamp(log_ratio, log_lo, log_hi))
        ind = (log_ratio < log_lo) | (log_ratio > log_hi)  # the IS weight was clipped
    # L = -sg(clip(r)) A log pi   (MiniMax-M1, CISPO objective)
    loss = -(weight * advantages) * log_prob
    return loss, _common_counts(log_ratio, log_ratio, ind, None, advantages > 0, mask, clip_ratio_high)


def _validate(old_log_prob, log_prob, advantages, response_mask, loss_mode, clip_ratio_low, clip_ratio_high,
              clip_ratio_c, token_weights):
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
    if loss_mode in _NO_LOWER_BOUND_OK:
        if not clip_ratio_low >= 0.0:
            raise ValueError(f"clip_ratio_low: must be >= 0 (>= 1: no lower bound), got {clip_ratio_low}")
    elif not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low: must be in [0, 1) (the ratio's lower bound is 1 - it), got {clip_ratio_low}")
    if not clip_ratio_high >= 0.0:
        raise ValueError(f"clip_ratio_high: must be >= 0, got {clip_ratio_high}")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: the dual-clip bound must be > 1.0, got {clip_ratio_c}")
    if token_weights is not None:
        if tuple(token_weights.shape) != shape:
            raise ValueError(f"token_weights: shape {tuple(token_weights.shape)} does not match log_prob's {shape}")
        if not token_weights.is_floating_point():
            raise ValueError(f"token_weights: expected a floating-point tensor, got {token_weights.dtype}")
        if token_weights.requires_grad:
            raise ValueError("token_weights: must not require grad (the weights are constants: detach them)")


def policy_loss_per_token(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                          response_mask: torch.Tensor, *, loss_mode: str = "up_grpo", clip_ratio_low: float = 0.2,
                          clip_ratio_high: float = 0.28, clip_ratio_c: float = 3.0,
                          token_weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The per-token policy loss `[batch, response_len]` (differentiable; masked tokens hold a value but the
    aggregation ignores them) and the metrics as python floats. For diagnostics; training calls
    `compute_policy_loss`.

    token_weights: optional detached `[batch, response_len]` float weights (a correction arm's output,
    correction.py) multiplied into the loss matrix: l_it <- u_it l_it. None: the matrix is returned unchanged.
    The metrics are those of the unweighted loss (they count tokens of the response mask, whatever their weight).
    """
    _validate(old_log_prob, log_prob, advantages, response_mask, loss_mode, clip_ratio_low, clip_ratio_high,
              clip_ratio_c, token_weights)
    mask = response_mask if response_mask.dtype == torch.bool else response_mask > 0
    loss_mat, counts = POLICY_LOSSES[loss_mode](old_log_prob, log_prob, advantages, mask,
                                                clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                                clip_ratio_c=clip_ratio_c)
    if token_weights is not None:
        loss_mat = loss_mat * token_weights  # l_it <- u_it l_it   (verl's rollout_is_weights)
    # one device->host transfer for all metrics
    flat = torch.stack([x.detach().double() for pair in counts.values() for x in pair]).tolist()
    metrics = {k: (flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] > 0 else 0.0) for i, k in enumerate(counts)}
    return loss_mat, metrics


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, *, loss_mode: str = "up_grpo", clip_ratio_low: float = 0.2,
                        clip_ratio_high: float = 0.28, clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean",
                        global_token_count: Optional[float] = None, global_seq_count: Optional[float] = None,
                        max_response_length: Optional[int] = None, return_loss_mat: bool = False,
                        token_weights: Optional[torch.Tensor] = None):
    """Policy loss of `loss_mode`, aggregated with `loss_agg_mode`.

    Args:
        old_log_prob, log_prob, advantages, response_mask: `[batch, response_len]`; only log_prob carries a
            gradient. response_mask: 1/True = a real response token.
        clip_ratio_low / clip_ratio_high / clip_ratio_c: eps_low, eps_high, c (module docstring; cispo accepts
            clip_ratio_low >= 1: no lower bound).
        global_token_count / global_seq_count / max_response_length: normalisers of the whole mini-batch over
            micro-batches and data-parallel ranks (see aggregation.py); None = this batch alone.
        token_weights: optional detached `[batch, response_len]` per-token weights (a correction arm, correction.py)
            multiplied into the per-token loss before aggregation, as verl's `rollout_is_weights`. A zero weight
            does not remove the token from the normalisers (pass a mask without it for that). None: bit-for-bit
            the unweighted loss.
    Returns:
        (loss scalar, metrics {name: float}, module docstring), plus the per-token loss matrix that was aggregated
        (weighted, if token_weights) when `return_loss_mat`.
    """
    if loss_agg_mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode: unknown mode '{loss_agg_mode}'; choose one of {', '.join(AGG_MODES)}")
    mask = response_mask if response_mask.dtype == torch.bool else response_mask > 0  # converted once, here
    loss_mat, metrics = policy_loss_per_token(old_log_prob, log_prob, advantages, mask, loss_mode=loss_mode,
                                              clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                                              clip_ratio_c=clip_ratio_c, token_weights=token_weights)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, global_token_count=global_token_count,
                    global_seq_count=global_seq_count, max_response_length=max_response_length)
    return (loss, metrics, loss_mat) if return_loss_mat else (loss, metrics)
