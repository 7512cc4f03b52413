"""Train-inference correction arms: per-token weights from the engine-vs-trainer ratio w = pi_trainer / pi_rollout.

The rollout engine (vLLM) and the trainer (Megatron) give the same tokens different probabilities (kernels,
precision, MoE routing). Each arm maps two log-prob tensors `[batch, response_len]` (or the two routings) to
detached float weights u `[batch, response_len]`, 0 on masked tokens, and a dict of python-float metrics.
`compute_policy_loss(..., token_weights=u)` multiplies them into the per-token loss before aggregation (verl's
`rollout_is_weights`). Which trainer log-prob is the caller's choice: the pi_old recompute (decoupled: the weight
corrects pi_rollout -> pi_old, the policy loss pi_old -> pi_theta) or the current pi_theta, detached (bypass).

Arms (w_t = exp(log pi_trainer,t - log pi_rollout,t), valid tokens only; log w is compared in log space):
    none          no weights: `apply_correction` returns None and compute_policy_loss stays bit-identical
    tis           u_t = min(w_t, C), C = 2
                  Truncated IS: Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL
                  Training" (Aug 2025); verl's token-level rollout_is with rollout_is_threshold = 2.0.
    icepop        u_t = w_t if lo <= w_t <= hi else 0, [lo, hi] = [0.5, 5]
                  IcePop (Ant Group, "Small Leak Can Sink a Great Ship", and the Ring-1T report, arXiv 2510.18855):
                  the objective multiplies each token by M(k) = k inside [alpha, beta] and 0 outside, so kept
                  tokens keep their ratio as a weight (slime / Miles' icepop_function do the same);
                  `scale_by_ratio=False` gives the plain 0/1 mask.
    seq_mask_is   u_t = 1 if lo <= exp(mean_t log w_t) <= hi else 0, the same for every token of a sequence,
                  [lo, hi] = [0.999, 1.001]: verl's geometric-mean rejection preset (rollout_rs="seq_mean_k1",
                  threshold "0.999_1.001", RolloutCorrectionConfig.decoupled_geo_rs). verl thresholds the mean
                  of -log w, i.e. a band [1/hi, 1/lo] on the geometric mean of w; with these bounds the two bands
                  agree to 1e-6.
    routing_mask  u_t = alpha if the engine's and the trainer's top-k expert SETS differ in >= m MoE layers,
                  else 1 (alpha = 0: drop, m = 1); `only_negative` leaves A > 0 tokens at 1. A (token, layer)
                  with an id -1 (not captured) on either side is not compared, as in diagnostics/routing_stats.py,
                  so a token whose routing was not captured is never masked. A token's routing is that of the
                  input position whose logits score it (the last prompt position for the first token).

A weight of 0 does not take a token out of the loss's normalisers (verl's IS-weight semantics; verl's rejection
sampling instead edits the response mask). To drop such tokens from the token count too, pass
`response_mask & (u > 0)` as the mask (and build the global normalisers from it).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from upgrpo_megatron.losses.aggregation import masked_sum

CORRECTIONS = ("none", "tis", "icepop", "seq_mask_is", "routing_mask")

Weights = Tuple[Optional[torch.Tensor], Dict[str, float]]


# --- helpers -------------------------------------------------------------------------------------------------------
def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


def _check_log_probs(trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor):
    shape = tuple(trainer_log_prob.shape)
    if trainer_log_prob.dim() != 2 or not trainer_log_prob.is_floating_point():
        raise ValueError(f"trainer_log_prob: expected a float [batch, response_len] tensor, got "
                         f"{trainer_log_prob.dtype} {shape}")
    for name, t in (("rollout_log_prob", rollout_log_prob), ("response_mask", response_mask)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match trainer_log_prob's {shape}")


def _log_w(trainer_log_prob, rollout_log_prob, mask) -> torch.Tensor:
    """log w = log pi_trainer - log pi_rollout `[batch, response_len]`, detached, in float32 or wider; 0 on masked
    tokens (whatever padding holds: -inf, NaN)."""
    dtype = torch.promote_types(trainer_log_prob.dtype, torch.float32)
    diff = trainer_log_prob.detach().to(dtype) - rollout_log_prob.detach().to(dtype)  # log w_t
    return torch.where(mask, diff, 0.0)


def _floats(counts: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, float]:
    """{name: (numerator, denominator)} -> {name: numerator / denominator} (0 when the denominator is 0), one
    device -> host transfer."""
    flat = torch.stack([x.detach().double() for pair in counts.values() for x in pair]).tolist()
    return {k: (flat[2 * i] / flat[2 * i + 1] if flat[2 * i + 1] > 0 else 0.0) for i, k in enumerate(counts)}


def _n(b: torch.Tensor) -> torch.Tensor:
    return torch.count_nonzero(b)


def _check_band(name: str, low: float, high: float) -> None:
    if not 0.0 < low <= 1.0 <= high < math.inf:
        raise ValueError(f"{name}: the band must satisfy 0 < low <= 1 <= high < inf, got [{low}, {high}]")


# --- arms ----------------------------------------------------------------------------------------------------------
def tis_weights(trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor, *,
                cap: float = 2.0) -> Weights:
    """Truncated IS: u_t = min(w_t, C).

    Args: trainer_log_prob, rollout_log_prob, response_mask `[batch, response_len]`; cap C > 0 (Yao et al. / verl:
    2.0). Returns (u `[batch, response_len]`, {"tis/truncated_frac": valid tokens with w > C / valid tokens,
    "tis/weight_mean": mean of u over valid tokens}).
    """
    _check_log_probs(trainer_log_prob, rollout_log_prob, response_mask)
    if not 0.0 < cap < math.inf:
        raise ValueError(f"tis cap: must be in (0, inf), got {cap}")
    mask = _bool(response_mask)
    log_w = _log_w(trainer_log_prob, rollout_log_prob, mask)
    # u_t = min(w_t, C)   (truncated importance sampling)
    u = torch.where(mask, torch.exp(torch.clamp(log_w, max=math.log(cap))), 0.0)
    counts = {"tis/truncated_frac": (_n(mask & (log_w > math.log(cap))), _n(mask)),
              "tis/weight_mean": (masked_sum(u, mask), _n(mask))}
    return u, _floats(counts)


def icepop_weights(trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor, *,
                   low: float = 0.5, high: float = 5.0, scale_by_ratio: bool = True) -> Weights:
    """IcePop: u_t = w_t (1 if not scale_by_ratio) where low <= w_t <= high, else 0.

    Args: as tis_weights; [low, high] the band (IcePop: [0.5, 5]). Returns (u, {"icepop/masked_frac",
    "icepop/masked_low_frac" (w < low), "icepop/masked_high_frac" (w > high): over valid tokens;
    "icepop/weight_mean": mean of u over valid tokens}).
    """
    _check_log_probs(trainer_log_prob, rollout_log_prob, response_mask)
    _check_band("icepop", low, high)
    mask = _bool(response_mask)
    log_w = _log_w(trainer_log_prob, rollout_log_prob, mask)
    below, above = mask & (log_w < math.log(low)), mask & (log_w > math.log(high))
    keep = mask & ~below & ~above
    # u_t = M(w_t) = w_t on [low, high], 0 outside   (IcePop's double-sided mask)
    kept = torch.exp(log_w) if scale_by_ratio else torch.ones_like(log_w)
    u = torch.where(keep, kept, 0.0)
    n = _n(mask)
    counts = {"icepop/masked_frac": (_n(below | above), n), "icepop/masked_low_frac": (_n(below), n),
              "icepop/masked_high_frac": (_n(above), n), "icepop/weight_mean": (masked_sum(u, mask), n)}
    return u, _floats(counts)


def seq_mask_is_weights(trainer_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor,
                        response_mask: torch.Tensor, *, low: float = 0.999, high: float = 1.001) -> Weights:
    """Geometric-mean sequence mask: u_t = 1 on the valid tokens of sequences whose geometric-mean ratio
    exp(mean_t log w_t) lies in [low, high], 0 elsewhere.

    Args: as tis_weights; [low, high] (verl's geometric preset: [0.999, 1.001]). Returns (u,
    {"seq_mask_is/masked_seq_frac": masked sequences / sequences with >= 1 valid token,
    "seq_mask_is/masked_token_frac": valid tokens of masked sequences / valid tokens}).
    """
    _check_log_probs(trainer_log_prob, rollout_log_prob, response_mask)
    _check_band("seq_mask_is", low, high)
    mask = _bool(response_mask)
    log_w = _log_w(trainer_log_prob, rollout_log_prob, mask)
    n_tok = mask.sum(-1)  # [batch]
    # log g_i = (1/n_i) sum_t log w_it   (geometric mean of the sequence's ratios)
    log_g = masked_sum(log_w, mask, -1) / n_tok.clamp(min=1).to(log_w.dtype)
    keep_seq = (log_g >= math.log(low)) & (log_g <= math.log(high))  # [batch]
    u = (mask & keep_seq.unsqueeze(-1)).to(log_w.dtype)
    has_tok = n_tok > 0
    counts = {"seq_mask_is/masked_seq_frac": (_n(has_tok & ~keep_seq), _n(has_tok)),
              "seq_mask_is/masked_token_frac": (_n(mask & ~keep_seq.unsqueeze(-1)), _n(mask))}
    return u, _floats(counts)


def _check_routing(train_routing, rollout_routing, mask):
    for name, r in (("train_routing", train_routing), ("rollout_routing", rollout_routing)):
        if r.dim() != 4 or r.is_floating_point() or r.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer expert ids [batch, response_len, layers, topk], got "
                             f"{r.dtype} {tuple(r.shape)}")
    if train_routing.shape != rollout_routing.shape:
        raise ValueError(f"rollout_routing: shape {tuple(rollout_routing.shape)} does not match train_routing's "
                         f"{tuple(train_routing.shape)}")
    if tuple(train_routing.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"response_mask: shape {tuple(mask.shape)} does not match the routing's [batch, "
                         f"response_len] {tuple(train_routing.shape[:2])}")


def mismatched_layers(train_routing: torch.Tensor, rollout_routing: torch.Tensor) -> torch.Tensor:
    """Number of MoE layers whose top-k expert SETS differ, per token: `[batch, response_len, layers, topk]` ids ->
    `[batch, response_len]` int64. A layer with an id < 0 (not captured) on either side is not compared. The sets
    are compared as sorted id lists (ids within a top-k are distinct)."""
    captured = (train_routing >= 0).all(-1) & (rollout_routing >= 0).all(-1)  # [B, T, L]
    differs = (torch.sort(train_routing, -1).values != torch.sort(rollout_routing, -1).values).any(-1)
    return (differs & captured).sum(-1)


def routing_mask_weights(train_routing: torch.Tensor, rollout_routing: torch.Tensor, response_mask: torch.Tensor, *,
                         min_layers: int = 1, alpha: float = 0.0, only_negative: bool = False,
                         advantages: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> Weights:
    """Routing mask: u_t = alpha on tokens whose routing differs in >= min_layers MoE layers, 1 elsewhere.

    Args:
        train_routing, rollout_routing: `[batch, response_len, layers, topk]` int64 expert ids (-1: not captured).
        response_mask: `[batch, response_len]`. min_layers: m >= 1. alpha: weight of a hit token, in [0, 1]
            (0: drop it). only_negative: hit A <= 0 tokens only (needs advantages).
        advantages: `[batch, response_len]`, optional unless only_negative; with it the metrics split by sign.
    Returns:
        (u `[batch, response_len]` of `dtype`, {"routing_mask/masked_frac": hit tokens / response tokens, and
        with advantages "routing_mask/masked_pos_frac" / "routing_mask/masked_neg_frac": hit tokens among the
        A > 0 / A <= 0 tokens}). A "hit" token is one whose weight was set to alpha. A token's routing is that
        of the position whose logits score it (`rollout/batch.py`).
    """
    _check_routing(train_routing, rollout_routing, response_mask)
    if not (isinstance(min_layers, int) and min_layers >= 1):
        raise ValueError(f"routing_mask min_layers: must be an int >= 1, got {min_layers!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"routing_mask alpha: must be in [0, 1], got {alpha}")
    if only_negative and advantages is None:
        raise ValueError("routing_mask only_negative=True: needs advantages")
    if advantages is not None and tuple(advantages.shape) != tuple(response_mask.shape):
        raise ValueError(f"advantages: shape {tuple(advantages.shape)} does not match response_mask's "
                         f"{tuple(response_mask.shape)}")
    mask = _bool(response_mask)
    hit = mask & (mismatched_layers(train_routing, rollout_routing) >= min_layers)
    if only_negative:
        hit &= advantages <= 0
    # u_t = alpha if the routing differs in >= m layers, else 1
    u = torch.where(hit, float(alpha), mask.to(dtype))
    counts = {"routing_mask/masked_frac": (_n(hit), _n(mask))}
    if advantages is not None:
        pos = mask & (advantages > 0)
        counts["routing_mask/masked_pos_frac"] = (_n(hit & pos), _n(pos))
        counts["routing_mask/masked_neg_frac"] = (_n(hit & ~pos), _n(mask & ~pos))
    return u, _floats(counts)


# --- dispatcher ----------------------------------------------------------------------------------------------------
_LOG_PROB_ARMS = {"tis": tis_weights, "icepop": icepop_weights, "seq_mask_is": seq_mask_is_weights}


def apply_correction(name: str, response_mask: torch.Tensor, *, trainer_log_prob: Optional[torch.Tensor] = None,
                     rollout_log_prob: Optional[torch.Tensor] = None, train_routing: Optional[torch.Tensor] = None,
                     rollout_routing: Optional[torch.Tensor] = None, advantages: Optional[torch.Tensor] = None,
                     **options) -> Weights:
    """Run the correction arm `name` (one of CORRECTIONS) with its keyword `options` (the arm's keyword
    arguments, e.g. cap=2.0 for tis).

    tis / icepop / seq_mask_is need trainer_log_prob and rollout_log_prob; routing_mask needs train_routing and
    rollout_routing (and takes advantages). Returns (token_weights or None for "none", metrics).
    """
    if name not in CORRECTIONS:
        raise ValueError(f"correction: unknown arm '{name}'; choose one of {', '.join(CORRECTIONS)}")
    if name == "none":
        if options:
            raise ValueError(f"correction 'none' takes no options, got {sorted(options)}")
        return None, {}
    if name == "routing_mask":
        if train_routing is None or rollout_routing is None:
            raise ValueError("correction 'routing_mask': needs train_routing and rollout_routing")
        return routing_mask_weights(train_routing, rollout_routing, response_mask, advantages=advantages, **options)
    if trainer_log_prob is None or rollout_log_prob is None:
        raise ValueError(f"correction '{name}': needs trainer_log_prob and rollout_log_prob")
    return _LOG_PROB_ARMS[name](trainer_log_prob, rollout_log_prob, response_mask, **options)
