"""Router-aware statistics: pure tensor math (no Megatron, no vLLM), vectorised, run every RL step.

Shapes: routing `[batch, response_len, layers, topk]` int64 expert ids (-1 = missing), token tensors
`[batch, response_len]`, `mask` 1 on real response tokens. A (token, layer) pair "mismatches" when the two
top-k *sets* differ.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch

Arrays = Dict[str, torch.Tensor]


def _expert_onehot(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., k] ids -> [..., E] 0/1 membership (ids outside [0, E) ignored)."""
    valid = (experts >= 0) & (experts < num_experts)
    oh = torch.zeros(*experts.shape[:-1], num_experts, dtype=torch.float32)
    oh.scatter_add_(-1, experts.clamp(0, num_experts - 1), valid.float())
    return oh.clamp(max=1.0)


def routing_mismatch(experts_a: torch.Tensor, experts_b: torch.Tensor, mask: torch.Tensor, num_experts: int,
                     prefix: str = "mismatch") -> Tuple[Dict[str, float], Arrays]:
    """Compare two routings of the same tokens (e.g. trainer at pi_old vs rollout engine).

    Scalars: `{prefix}/pair_frac` (token, layer) pairs whose top-k sets differ; `{prefix}/jaccard` mean
    |A∩B|/|A∪B|; `{prefix}/top1_agree` first choices equal; `{prefix}/token_any_frac` tokens with at least
    one mismatched layer; `{prefix}/layers_per_token` mean mismatched layers per token.
    Arrays: `layer_pair_frac [L]`, `expert_flip_rate [L, E]` = (#tokens where the expert is chosen by exactly
    one side) / (#tokens where either side chose it), `mismatched [B, R, L]` bool.
    """
    m = mask.float()
    a, b = _expert_onehot(experts_a, num_experts), _expert_onehot(experts_b, num_experts)  # [B,R,L,E]
    inter = (a * b).sum(-1)
    union = ((a + b) > 0).float().sum(-1)
    k = experts_a.shape[-1]
    differs = inter < k  # [B,R,L]
    jac = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
    top1 = (experts_a[..., 0] == experts_b[..., 0]).float()
    ml = m.unsqueeze(-1)  # [B,R,1]
    n_tok = m.sum().clamp(min=1)
    n_pairs = (ml * torch.ones_like(jac)).sum().clamp(min=1)
    per_token = (differs.float() * ml).sum(-1)  # [B,R] mismatched layers per token
    xor = ((a + b) == 1).float() * ml.unsqueeze(-1)
    either = ((a + b) > 0).float() * ml.unsqueeze(-1)
    flips = xor.sum((0, 1))  # [L,E]
    seen = either.sum((0, 1))
    scalars = {
        f"{prefix}/pair_frac": float((differs.float() * ml).sum() / n_pairs),
        f"{prefix}/jaccard": float((jac * ml).sum() / n_pairs),
        f"{prefix}/top1_agree": float((top1 * ml).sum() / n_pairs),
        f"{prefix}/token_any_frac": float(((per_token > 0).float() * m).sum() / n_tok),
        f"{prefix}/layers_per_token": float(per_token.sum() / n_tok),
    }
    arrays = {
        "layer_pair_frac": (differs.float() * ml).sum((0, 1)) / m.sum().clamp(min=1),
        "expert_flip_rate": torch.where(seen > 0, flips / seen.clamp(min=1), torch.zeros_like(seen)),
        "mismatched": differs & (ml > 0),
    }
    return scalars, arrays


def ratio_stats_per_expert(log_ratio: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor,
                           advantages: torch.Tensor, mismatched: torch.Tensor, num_experts: int,
                           clip_low: float, clip_high: float) -> Arrays:
    """Importance-ratio statistics attributed to each of a token's k experts in each layer.

    Returns `[L, E, 4]` arrays (groups: A>0 & routing matched, A>0 & mismatched, A<=0 & matched, A<=0 &
    mismatched) of: count, mean r, variance of r, max |log r|, fraction of r outside [1-eps_l, 1+eps_h].
    """
    B, R, L, K = experts.shape
    r = torch.exp(log_ratio.clamp(-20, 20))  # [B,R]
    outside = ((r < 1 - clip_low) | (r > 1 + clip_high)).float()
    pos = (advantages > 0)
    group = (~pos).long().unsqueeze(-1) * 2 + mismatched.long()  # [B,R,L] in 0..3
    valid = (mask > 0).unsqueeze(-1).unsqueeze(-1) & (experts >= 0) & (experts < num_experts)  # [B,R,L,K]
    e = experts.clamp(0, num_experts - 1)
    layer = torch.arange(L).view(1, 1, L, 1).expand(B, R, L, K)
    g = group.unsqueeze(-1).expand(B, R, L, K)
    flat = ((layer * num_experts + e) * 4 + g)[valid]  # bucket index in [L*E*4]
    size = L * num_experts * 4

    def bucket_sum(values: torch.Tensor) -> torch.Tensor:
        v = values.view(B, R, 1, 1).expand(B, R, L, K)[valid].double()
        return torch.zeros(size, dtype=torch.float64).index_add_(0, flat, v)

    count = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    s1, s2 = bucket_sum(r), bucket_sum(r * r)
    mean = torch.where(count > 0, s1 / count.clamp(min=1), torch.zeros_like(s1))
    var = torch.where(count > 0, s2 / count.clamp(min=1) - mean**2, torch.zeros_like(s1)).clamp(min=0)
    abs_lr = log_ratio.abs().view(B, R, 1, 1).expand(B, R, L, K)[valid].double()
    maxabs = torch.zeros(size, dtype=torch.float64).scatter_reduce(0, flat, abs_lr, "amax", include_self=True)
    out_frac = torch.where(count > 0, bucket_sum(outside) / count.clamp(min=1), torch.zeros_like(s1))
    shape = (L, num_experts, 4)
    return {"ratio_count": count.view(shape).float(), "ratio_mean": mean.view(shape).float(),
            "ratio_var": var.view(shape).float(), "ratio_max_abs_log": maxabs.view(shape).float(),
            "ratio_outside_clip": out_frac.view(shape).float()}


def prob_gap(train_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor,
             taus: Sequence[float] = (2.0, 5.0, 10.0), threshold: float = 0.5,
             prefix: str = "mismatch") -> Dict[str, float]:
    """Train-inference probability gap of the sampled tokens (NeMo-RL / slime / R3 paper style metrics).

    d = log p_train - log p_rollout; w = p_train / p_rollout = exp(d) (the sampling importance ratio).
    """
    m = mask.float()
    n = m.sum().clamp(min=1)
    d = (train_log_prob - rollout_log_prob).double()
    p_t, p_r = train_log_prob.double().exp(), rollout_log_prob.double().exp()
    w = torch.exp(d.clamp(-20, 20))
    md = m.double()
    mean = lambda x: float((x * md).sum() / n)  # noqa: E731
    out = {
        f"{prefix}/abs_prob_diff_mean": mean((p_t - p_r).abs()),
        f"{prefix}/abs_prob_diff_max": float(((p_t - p_r).abs() * md).max()) if m.sum() > 0 else 0.0,
        f"{prefix}/token_mult_prob_error": math.exp(mean(d.abs())),  # NeMo-RL: exp(mean |Δ log p|)
        f"{prefix}/kl_k3_rollout_to_train": mean(torch.exp(-d) - 1 + d),  # KL(rollout || train), k3
        f"{prefix}/kl_k3_train_to_rollout": mean(w - 1 - d),  # KL(train || rollout) estimated on rollout samples
        f"{prefix}/logp_diff_frac_above_threshold": mean((d.abs() > threshold).double()),
        f"{prefix}/is_ratio_mean": mean(w),
        f"{prefix}/is_ratio_chi2": mean(w * w) - 1.0,
    }
    mw = mean(w)
    out[f"{prefix}/is_ratio_ess_frac"] = (mw * mw) / max(mean(w * w), 1e-12)  # ESS / N = (E w)^2 / E w^2
    m_mix = 0.5 * (p_t + p_r)  # Jensen-Shannon on the sampled token's two-point distributions
    js = 0.5 * (p_t * (p_t / m_mix).log() + p_r * (p_r / m_mix).log())
    out[f"{prefix}/js_sampled_token"] = mean(js)
    for tau in taus:
        extreme = (d.abs() > math.log(tau)).double()  # max(w, 1/w) > tau
        out[f"{prefix}/extreme_token_frac_tau{tau:g}"] = mean(extreme)
    return out


def expert_load(experts: torch.Tensor, mask: torch.Tensor, num_experts: int) -> Tuple[Dict[str, float], torch.Tensor]:
    """Tokens routed to each expert per layer `[L, E]`, and imbalance (max/mean, coefficient of variation)."""
    oh = _expert_onehot(experts, num_experts) * mask.float()[..., None, None]
    load = oh.sum((0, 1))  # [L,E]
    mean = load.mean(-1).clamp(min=1e-9)
    return {"max_over_mean": float((load.max(-1).values / mean).mean()),
            "cv": float((load.std(-1, unbiased=False) / mean).mean())}, load


def capture_validity(experts: torch.Tensor, mask: torch.Tensor, num_experts: int) -> Dict[str, float]:
    """Counts of invalid captures among real tokens: out-of-range ids, duplicates within a token's top-k,
    missing routes (-1), and layers whose ids are all zero across the batch (a silent capture failure)."""
    m = (mask > 0)[..., None]  # [B,R,1]
    missing = ((experts < 0).any(-1) & m).sum()
    out_of_range = ((experts >= num_experts).any(-1) & m).sum()
    srt = experts.sort(-1).values
    dup = (((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1) & m).sum()
    real = experts[(mask > 0)]  # [N, L, k]
    zero_layers = int(((real == 0).all(-1).all(0)).sum()) if real.numel() and experts.shape[-1] > 1 else 0
    return {"missing": float(missing), "out_of_range": float(out_of_range), "duplicate": float(dup),
            "all_zero_layers": float(zero_layers)}


def flip_margins(router_probs: torch.Tensor, mismatched: torch.Tensor, mask: torch.Tensor, k: int) -> Dict[str, float]:
    """Router score margin between the k-th and (k+1)-th expert, for flipped vs stable (token, layer) pairs.

    router_probs: `[B, R, L, E]`. Flips are expected on near-ties: a small margin."""
    top = router_probs.topk(min(k + 1, router_probs.shape[-1]), dim=-1).values
    margin = top[..., k - 1] - top[..., k] if top.shape[-1] > k else torch.zeros_like(top[..., 0])
    valid = (mask > 0)[..., None].expand_as(margin)
    flip, stable = valid & mismatched, valid & ~mismatched
    mean = lambda sel: float(margin[sel].mean()) if sel.any() else float("nan")  # noqa: E731
    return {"flip_margin_mean": mean(flip), "stable_margin_mean": mean(stable)}
