"""Routing statistics: train vs rollout mismatch (or pi_old vs pi_theta drift), expert load, capture validity.

Pure torch, vectorised (bincount / index_add over flattened (layer, expert) ids): no Python loop over tokens.

Shapes and conventions
- `experts_*`: `[batch, response_len, layers, topk]` int64 expert ids; -1 = no route (padding, not captured).
  Slot 0 holds the highest-scoring expert (torch.topk order, used by Megatron's router and vLLM), which is
  what "top-1 agreement" compares.
- Row t of a response is the routing of the input position whose logits score response token t (see
  `rollout/batch.py`), so a statistic attributed to "the token's experts" names the experts that computed its
  log-prob at that position.
- `mask`: `[batch, response_len]`, 1 on real response tokens. Padding never counts.
- A (token, layer) *pair* is compared only when both sides hold `topk` ids in `[0, num_experts)`; pairs with
  a missing or out-of-range id are counted as `invalid_pairs` (a capture problem, see `check_capture_validity`),
  not as mismatches.
- A pair *mismatches* when the two top-k **sets** differ (order within the top-k does not matter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from upgrpo_megatron.errors import UpgrpoError

NAN = float("nan")


class CaptureValidityError(UpgrpoError, ValueError):
    """Captured routing is unusable (missing routes, duplicate or out-of-range ids, all-zero layers)."""


def _check_routing(name: str, experts: torch.Tensor, mask: torch.Tensor) -> None:
    if experts.dim() != 4:
        raise ValueError(f"{name}: expected [batch, response_len, layers, topk] expert ids, got shape "
                         f"{tuple(experts.shape)}")
    if tuple(experts.shape[:2]) != tuple(mask.shape):
        raise ValueError(f"{name}: shape {tuple(experts.shape)} does not match mask {tuple(mask.shape)} "
                         "in [batch, response_len]")


def _valid_ids(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[..., topk]` -> `[...]` True where every slot holds an id in [0, num_experts)."""
    return ((experts >= 0) & (experts < num_experts)).all(-1)


def _bucket_ids(experts: torch.Tensor, select: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Flat (layer, expert) bucket of every (token, slot): experts `[N, L, K]` -> `[N * L * K]` int64 in
    [0, L * E]; slots that are not selected or hold an id outside [0, E) go to the extra bucket L * E.
    (A spare bucket instead of boolean indexing: masked_select copies are the slow part on big batches.)"""
    N, L, K = experts.shape
    ok = select & (experts >= 0) & (experts < num_experts)
    layer = torch.arange(L, device=experts.device).view(1, L, 1)
    return torch.where(ok, layer * num_experts + experts, L * num_experts).reshape(-1)


def _layer_expert_counts(experts: torch.Tensor, select: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of selected (token, slot) entries per (layer, expert): experts, select `[N, L, K]` -> `[L, E]`."""
    L = experts.shape[1]
    ids = _bucket_ids(experts, select, num_experts)
    return torch.bincount(ids, minlength=L * num_experts + 1)[:-1].view(L, num_experts).double()


def _set_bits(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Top-k sets as bitmasks: `[N, L, K]` ids -> `[N, L, W]` int64 words, W = ceil(E / 64). Out-of-range ids
    set no bit. A loop over the K slots and W words only (both small), never over tokens."""
    W = (num_experts + 63) // 64
    ok = (experts >= 0) & (experts < num_experts)
    word, bit = experts.clamp(min=0) // 64, experts.clamp(min=0) % 64
    one = torch.ones((), dtype=torch.int64, device=experts.device)
    out = torch.zeros(*experts.shape[:2], W, dtype=torch.int64, device=experts.device)
    for w in range(W):
        for k in range(experts.shape[-1]):
            hit = ok[..., k] & (word[..., k] == w)
            out[..., w] |= torch.where(hit, one << bit[..., k], 0)
    return out


def _in_other(a: torch.Tensor, b_bits: torch.Tensor) -> torch.Tensor:
    """`[N, L, K]` True where a's slot id is a member of the other side's set (bitmask `[N, L, W]`)."""
    ac = a.clamp(min=0)
    words = b_bits.gather(-1, ac // 64)  # [N, L, K]
    return ((words >> (ac % 64)) & 1).bool() & (a >= 0)


@dataclass
class RoutingMismatch:
    """Result of `compute_routing_mismatch` (side a = trainer, b = rollout engine, or a = pi_old, b = pi_theta).

    scalars (un-prefixed names; `metrics(prefix)` adds the prefix):
      pair_frac         compared (token, layer) pairs whose top-k sets differ
      jaccard           mean |A∩B| / |A∪B| over compared pairs
      top1_agree        compared pairs whose slot-0 (top-1) experts are equal
      token_any_frac    real tokens with at least one mismatched layer (R3 paper / slime)
      layers_per_token  mean number of mismatched layers per real token
      invalid_pair_frac real (token, layer) pairs not compared (a side has a missing / out-of-range id)
      flip_margin_mean, stable_margin_mean  (only with scores_a) mean router-score margin between the k-th and
                        (k+1)-th expert of side a over mismatched / matched pairs: flips happen on near-ties
    per_layer `[L]`:     pair_frac, jaccard, top1_agree, (flip_margin_mean with scores)
    per_expert `[L, E]`: chosen_a, chosen_b (tokens whose top-k holds the expert), a_only, b_only (chosen by
                        one side but not the other), flip_rate = (a_only + b_only) / tokens where either side
                        chose it, a_miss_rate = a_only / chosen_a, b_miss_rate = b_only / chosen_b
                        (rates are 0 where the denominator is 0: an expert never chosen)
    mismatched `[batch, response_len, layers]` bool: real, compared, mismatched pairs (feed it to
                        `compute_ratio_stats`).
    """

    scalars: Dict[str, float]
    per_layer: Dict[str, torch.Tensor]
    per_expert: Dict[str, torch.Tensor]
    mismatched: torch.Tensor
    counts: Dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str) -> Dict[str, float]:
        return {f"{prefix}/{k}": v for k, v in self.scalars.items()}

    def arrays(self, prefix: str) -> Dict[str, torch.Tensor]:
        out = {f"{prefix}_layer_{k}": v for k, v in self.per_layer.items()}
        out.update({f"{prefix}_expert_{k}": v for k, v in self.per_expert.items()})
        return out


def pair_frac_by_rows(experts_a: torch.Tensor, experts_b: torch.Tensor, mask: torch.Tensor, num_experts: int,
                      groups: Sequence[Sequence[int]]) -> List[float]:
    """`compute_routing_mismatch(...).scalars["pair_frac"]` of several row groups of one batch, from one pass:
    per group (row indices into the batch), mismatched compared (token, layer) pairs over compared pairs (NaN
    when a group compares none). The routing-drift diagnostics want it per micro-batch and per PPO epoch, where
    the full comparison (per-layer and per-expert tables) per group cost more than the rest of the reduction."""
    _check_routing("experts_a", experts_a, mask)
    _check_routing("experts_b", experts_b, mask)
    B, R, L, _ = experts_a.shape
    real = mask > 0
    compared = real.unsqueeze(-1) & _valid_ids(experts_a, num_experts) & _valid_ids(experts_b, num_experts)
    flat_a, flat_b = experts_a.reshape(B * R, L, -1).long(), experts_b.reshape(B * R, L, -1).long()
    differs = (_set_bits(flat_a, num_experts) != _set_bits(flat_b, num_experts)).any(-1).view(B, R, L)
    mis = (differs & compared).sum((1, 2)).double()  # per row
    n_pairs = compared.sum((1, 2)).double()
    out = []
    for rows in groups:
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        den = float(n_pairs[idx].sum())
        out.append(float(mis[idx].sum()) / den if den > 0 else NAN)
    return out


def compute_routing_mismatch(experts_a: torch.Tensor, experts_b: torch.Tensor, mask: torch.Tensor,
                             num_experts: int, scores_a: Optional[torch.Tensor] = None) -> RoutingMismatch:
    """Compare two routings of the same tokens.

    experts_a, experts_b: `[batch, response_len, layers, topk]` int64; mask `[batch, response_len]`;
    scores_a: optional `[batch, response_len, layers, num_experts]` router scores/probabilities of side a
    (for the k-th vs (k+1)-th margin of flipped pairs).
    """
    _check_routing("experts_a", experts_a, mask)
    _check_routing("experts_b", experts_b, mask)
    if experts_a.shape != experts_b.shape:
        raise ValueError(f"routing shapes differ: {tuple(experts_a.shape)} vs {tuple(experts_b.shape)}")
    B, R, L, K = experts_a.shape
    real = mask > 0  # [B, R]
    compared = real.unsqueeze(-1) & _valid_ids(experts_a, num_experts) & _valid_ids(experts_b, num_experts)  # [B,R,L]

    # work on the real tokens only: [N, L, K]
    a, b, cmp = experts_a[real].long(), experts_b[real].long(), compared[real]  # int16 captures: no overflow
    a_bits, b_bits = _set_bits(a, num_experts), _set_bits(b, num_experts)
    a_in_b, b_in_a = _in_other(a, b_bits), _in_other(b, a_bits)  # [N, L, K]
    # |A ∩ B| counts a's distinct ids found in b (ids in a valid top-k are distinct; duplicates are a capture
    # error reported by check_capture_validity)
    inter = a_in_b.sum(-1).double()  # [N, L]
    union = 2 * K - inter
    differs = (a_bits != b_bits).any(-1)  # sets differ
    top1 = a[..., 0] == b[..., 0]
    cmpf = cmp.double()
    n_pairs = cmpf.sum()
    n_tok = float(real.sum())
    mis = differs & cmp  # [N, L]

    def frac(x: torch.Tensor, denom: torch.Tensor) -> float:
        return float(x.sum() / denom) if float(denom) > 0 else NAN

    jac = inter / union
    per_token = mis.sum(-1).double()  # mismatched layers per real token
    scalars = {
        "pair_frac": frac(mis.double(), n_pairs),
        "jaccard": frac(jac * cmpf, n_pairs),
        "top1_agree": frac((top1 & cmp).double(), n_pairs),
        "token_any_frac": float((per_token > 0).double().sum() / n_tok) if n_tok else NAN,
        "layers_per_token": float(per_token.sum() / n_tok) if n_tok else NAN,
        "invalid_pair_frac": float(1.0 - n_pairs / (n_tok * L)) if n_tok else NAN,
    }
    layer_pairs = cmpf.sum(0)  # [L]
    safe = layer_pairs.clamp(min=1)
    nan_l = torch.full_like(layer_pairs, NAN)
    per_layer = {
        "pair_frac": torch.where(layer_pairs > 0, mis.double().sum(0) / safe, nan_l),
        "jaccard": torch.where(layer_pairs > 0, (jac * cmpf).sum(0) / safe, nan_l),
        "top1_agree": torch.where(layer_pairs > 0, (top1 & cmp).double().sum(0) / safe, nan_l),
    }

    # per (layer, expert): only compared pairs contribute
    cmp_k = cmp.unsqueeze(-1)
    chosen_a = _layer_expert_counts(a, cmp_k, num_experts)
    chosen_b = _layer_expert_counts(b, cmp_k, num_experts)
    a_only = _layer_expert_counts(a, cmp_k & ~a_in_b, num_experts)
    b_only = _layer_expert_counts(b, cmp_k & ~b_in_a, num_experts)
    either = chosen_a + b_only  # tokens where a chose it, plus tokens where only b did

    def rate(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    per_expert = {"chosen_a": chosen_a, "chosen_b": chosen_b, "a_only": a_only, "b_only": b_only,
                  "flip_rate": rate(a_only + b_only, either), "a_miss_rate": rate(a_only, chosen_a),
                  "b_miss_rate": rate(b_only, chosen_b)}

    if scores_a is not None:
        if tuple(scores_a.shape) != (B, R, L, num_experts):
            raise ValueError(f"scores_a: expected [batch, response_len, layers, num_experts] = "
                             f"{(B, R, L, num_experts)}, got {tuple(scores_a.shape)}")
        margin = router_margin(scores_a[real], K)  # [N, L]
        stable = cmp & ~differs
        scalars["flip_margin_mean"] = frac(margin * mis, mis.double().sum())
        scalars["stable_margin_mean"] = frac(margin * stable, stable.double().sum())
        n_flip_l = mis.double().sum(0)
        per_layer["flip_margin_mean"] = torch.where(n_flip_l > 0, (margin * mis).sum(0) / n_flip_l.clamp(min=1), nan_l)

    mismatched = torch.zeros(B, R, L, dtype=torch.bool, device=experts_a.device)
    mismatched[real] = mis
    counts = {"tokens": n_tok, "pairs": float(n_pairs), "mismatched_pairs": float(mis.sum())}
    return RoutingMismatch(scalars, per_layer, per_expert, mismatched, counts)


def router_margin(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Score gap between the k-th and (k+1)-th best expert: `[..., num_experts]` -> `[...]` float64.

    A small gap means the top-k set is decided by a near-tie, where numeric noise flips the routing."""
    if scores.shape[-1] <= k:  # every expert is chosen: no (k+1)-th to flip with
        return torch.full(scores.shape[:-1], float("inf"), dtype=torch.float64, device=scores.device)
    top = scores.double().topk(k + 1, dim=-1).values
    return top[..., k - 1] - top[..., k]


def compute_expert_load(experts: torch.Tensor, mask: torch.Tensor, num_experts: int):
    """Tokens routed to each expert and the imbalance of that load.

    experts `[batch, response_len, layers, topk]`, mask `[batch, response_len]` ->
    (scalars, load `[layers, num_experts]` float64), where a token counts once for each of its k experts and
    out-of-range ids are ignored. Per layer: max_over_mean = max_e load / mean_e load, cv = population std /
    mean. Scalars: `max_over_mean` and `cv` averaged over layers, `max_over_mean_worst` the largest layer's.
    Layers with no routed tokens are left out of the averages (NaN when there are none at all).
    """
    _check_routing("experts", experts, mask)
    real = mask > 0
    e = experts[real].long()  # [N, L, K]
    load = _layer_expert_counts(e, torch.ones((), dtype=torch.bool, device=e.device), num_experts)
    mean = load.mean(-1)  # [L]
    used = mean > 0
    if not bool(used.any()):
        return {"max_over_mean": NAN, "max_over_mean_worst": NAN, "cv": NAN}, load
    mom = load.max(-1).values[used] / mean[used]
    cv = load.std(-1, unbiased=False)[used] / mean[used]
    return {"max_over_mean": float(mom.mean()), "max_over_mean_worst": float(mom.max()),
            "cv": float(cv.mean())}, load


def check_capture_validity(experts: torch.Tensor, mask: torch.Tensor, num_experts: int) -> Dict[str, float]:
    """Counts of invalid captured routes among real (token, layer) pairs (run it on every rollout).

    experts `[batch, response_len, layers, topk]`, mask `[batch, response_len]`. Returns
      tokens, pairs          real tokens and (token, layer) pairs checked
      missing_routes         pairs with a -1 (no id recorded) in some slot
      out_of_range           pairs with an id >= num_experts or < -1
      duplicate_ids          pairs whose top-k repeats an id (a top-k never does)
      all_zero_layers        layers where every real token's ids are all 0 (a silently zero-filled capture);
                             checked only when there are at least 2 real tokens or topk > 1
      padding_routes         padding (mask 0) positions that hold an id instead of -1 (informational)
      invalid_pairs          pairs that are missing, out of range or duplicate
      valid                  1.0 when invalid_pairs == 0 and all_zero_layers == 0, else 0.0
    Use `require_valid_capture` to turn a bad count into an error.
    """
    _check_routing("experts", experts, mask)
    real = mask > 0
    e = experts[real].long()  # [N, L, K]
    N, L, K = e.shape
    missing = (e == -1).any(-1)
    out_of_range = ((e >= num_experts) | (e < -1)).any(-1)
    srt = e.sort(-1).values
    dup = ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1) if K > 1 else torch.zeros_like(missing)
    zero_layers = 0
    if N and (N > 1 or K > 1):
        zero_layers = int((e == 0).all(-1).all(0).sum())
    padding_routes = int((experts[~real] >= 0).any(-1).sum())
    invalid = int((missing | out_of_range | dup).sum())
    return {"tokens": float(N), "pairs": float(N * L), "missing_routes": float(missing.sum()),
            "out_of_range": float(out_of_range.sum()), "duplicate_ids": float(dup.sum()),
            "all_zero_layers": float(zero_layers), "padding_routes": float(padding_routes),
            "invalid_pairs": float(invalid), "valid": float(invalid == 0 and zero_layers == 0)}


def require_valid_capture(counts: Dict[str, float], what: str = "rollout routing") -> None:
    """Raise CaptureValidityError (one line naming the problem) when `check_capture_validity` found any."""
    if counts.get("valid", 1.0) >= 1.0:
        return
    bad = [f"{int(counts[k])} {k.replace('_', ' ')}" for k in
           ("missing_routes", "out_of_range", "duplicate_ids", "all_zero_layers") if counts.get(k)]
    raise CaptureValidityError(f"{what}: invalid capture over {int(counts['pairs'])} (token, layer) pairs: "
                               + ", ".join(bad))
