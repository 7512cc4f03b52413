"""Importance-ratio statistics per expert, and the train-inference probability gap of the sampled tokens.

Pure torch, vectorised (index_add / scatter_reduce / bincount): no Python loop over tokens.

Two ratios are studied, with the same code:
- update ratio        r = pi_theta / pi_old       (log_ratio = log_prob - old_log_prob), during the PPO update;
- train/rollout ratio w = pi_old / pi_rollout     (log_ratio = old_log_prob - rollout_log_prob).
UP-GRPO's positive branch (A > 0) does not use r at all, the negative branch (A <= 0) clips it: splitting the
statistics by advantage sign shows what each branch is exposed to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Sequence

import torch

NAN = float("nan")
ADV_GROUPS = ("adv_pos", "adv_nonpos")  # A > 0 (UP-GRPO: AW-SFT, no ratio) | A <= 0 (clipped ratio)
MATCH_GROUPS = ("matched", "mismatched")  # routing of the (token, layer) pair agreed | differed
# log-ratio histogram bin edges: symmetric, log-spaced magnitudes 1e-6 .. 10, so that fp32-identical engines
# (|log r| ~ 1e-7) and real bf16 drift (~1e-2) are both visible; values beyond ±10 land in the end bins.
HIST_EDGES = torch.cat([-torch.logspace(1, -6, 29, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                        torch.logspace(-6, 1, 29, dtype=torch.float64)])


def _check_tokens(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"token tensors must share [batch, response_len]: {shapes}")


@dataclass
class RatioStats:
    """Sufficient statistics of a ratio r = exp(log_ratio), bucketed per (layer, expert, adv group, match group).

    Arrays are `[layers, num_experts, 2, 2]`: axis 2 = ADV_GROUPS (A > 0, A <= 0), axis 3 = MATCH_GROUPS.
    A real token adds one entry to the bucket of each of its k experts in each layer (so a token counts L*k
    times over the whole array; per (layer, expert) it counts once when that expert is in its top-k).
      count, sum_x, sum_x2 (sums of x = r - 1 and x^2: centred at 1 for precision), n_outside (r outside
      [1 - clip_low, 1 + clip_high]), max_abs_log (max |log r|)
    Derived (0 where count is 0): mean = 1 + sum_x / count, var = sum_x2 / count - (sum_x / count)^2
    (population variance),
    outside_frac = n_outside / count. `reduce(adv=..., match=...)` pools groups exactly.
    `token_scalars` holds token-level statistics (each real token counted once) per split:
    `{all, adv_pos, adv_nonpos, matched, mismatched}/{count, mean, var, max_abs_log, outside_clip_frac}`,
    where a token is "mismatched" when any of its layers mismatched.
    """

    count: torch.Tensor
    sum_x: torch.Tensor
    sum_x2: torch.Tensor
    n_outside: torch.Tensor
    max_abs_log: torch.Tensor
    token_scalars: Dict[str, float]

    def reduce(self, adv: bool = False, match: bool = False) -> Dict[str, torch.Tensor]:
        """Pool over the adv axis and/or the match axis; returns count/mean/var/outside_frac/max_abs_log."""
        dims = tuple(d for d, on in ((2, adv), (3, match)) if on)
        c, s1, s2, no, mx = self.count, self.sum_x, self.sum_x2, self.n_outside, self.max_abs_log
        if dims:
            c, s1, s2, no = (t.sum(dims) for t in (c, s1, s2, no))
            mx = mx.amax(dims)
        safe = c.clamp(min=1)
        mx_ = s1 / safe  # mean of r - 1
        mean = torch.where(c > 0, 1 + mx_, torch.zeros_like(s1))
        var = torch.where(c > 0, (s2 / safe - mx_ * mx_).clamp(min=0), torch.zeros_like(s1))
        return {"count": c, "mean": mean, "var": var,
                "outside_frac": torch.where(c > 0, no / safe, torch.zeros_like(s1)), "max_abs_log": mx}

    def metrics(self, prefix: str) -> Dict[str, float]:
        out = {f"{prefix}/{k}": v for k, v in self.token_scalars.items()}
        pooled = self.reduce(adv=True, match=True)
        has = pooled["count"] > 0
        out[f"{prefix}/expert_var_max"] = float(pooled["var"][has].max()) if bool(has.any()) else NAN
        return out

    def arrays(self, prefix: str) -> Dict[str, torch.Tensor]:
        d = self.reduce()
        return {f"{prefix}_{k}": v for k, v in d.items()}


def _token_split_stats(r: torch.Tensor, log_r: torch.Tensor, outside: torch.Tensor,
                       sel: torch.Tensor) -> Dict[str, float]:
    n = float(sel.sum())
    if n == 0:
        return {"count": 0.0, "mean": NAN, "var": NAN, "max_abs_log": NAN, "outside_clip_frac": NAN}
    xs = r[sel] - 1  # centred at 1 for precision (see RatioStats)
    mx = float(xs.mean())
    return {"count": n, "mean": 1 + mx, "var": max(float((xs * xs).mean()) - mx * mx, 0.0),
            "max_abs_log": float(log_r[sel].abs().max()), "outside_clip_frac": float(outside[sel].double().mean())}


def compute_ratio_stats(log_ratio: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                        mismatched_token_layer: torch.Tensor, num_experts: int, clip_low: float,
                        clip_high: float) -> RatioStats:
    """Ratio statistics attributed to the experts that served each token.

    log_ratio, mask, advantages: `[batch, response_len]`; experts: `[batch, response_len, layers, topk]`
    (the routing the ratio is attributed to, e.g. the trainer's at pi_old); mismatched_token_layer:
    `[batch, response_len, layers]` bool (from `compute_routing_mismatch(...).mismatched`).
    clip_low / clip_high: eps_low / eps_high of the PPO clip [1 - eps_low, 1 + eps_high].
    """
    _check_tokens(log_ratio=log_ratio, mask=mask, advantages=advantages)
    B, R, L, K = experts.shape
    if (B, R) != tuple(mask.shape) or tuple(mismatched_token_layer.shape) != (B, R, L):
        raise ValueError(f"experts {tuple(experts.shape)} / mismatched_token_layer "
                         f"{tuple(mismatched_token_layer.shape)} do not match mask {tuple(mask.shape)}")
    real = mask > 0
    lr = log_ratio[real].double()  # [N]
    r = torch.exp(lr.clamp(-30, 30))  # clamp: a garbage log-prob must not turn every sum into inf
    outside = (r < 1 - clip_low) | (r > 1 + clip_high)
    adv_g = (advantages[real] <= 0).long()  # 0: A > 0, 1: A <= 0
    mis = mismatched_token_layer[real]  # [N, L]
    e = experts[real].long()  # [N, L, K]; int16 captures would overflow the bucket ids
    N = e.shape[0]

    # bucket id ((layer * E + expert) * 2 + adv) * 2 + match, one per (token, layer, slot); slots with an id
    # outside [0, E) go to a spare last bucket (cheaper than boolean indexing on N * L * K entries)
    ok = (e >= 0) & (e < num_experts)
    layer = torch.arange(L, device=e.device).view(1, L, 1)
    size = L * num_experts * 4
    bucket = (((layer * num_experts + e) * 2 + adv_g.view(N, 1, 1)) * 2 + mis.long().unsqueeze(-1))
    idx = torch.where(ok, bucket, size).reshape(-1)
    tok = lambda v: v.view(N, 1, 1).expand(N, L, K).reshape(-1)  # noqa: E731  token value -> every slot

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(idx, weights=tok(values), minlength=size + 1)[:size]

    count = torch.bincount(idx, minlength=size + 1)[:size].double()
    # sums of (r - 1), not r: ratios sit near 1, and E[x^2] - E[x]^2 of centred values keeps a variance of
    # 1e-12 that the uncentred form would cancel away
    x = r - 1
    s1, s2 = scatter(x), scatter(x * x)
    n_out = scatter(outside.double())
    max_abs = torch.zeros(size + 1, dtype=torch.float64, device=e.device).scatter_reduce_(
        0, idx, tok(lr.abs()), "amax")[:size]
    shape = (L, num_experts, 2, 2)
    tok_mis = mis.any(-1) if L else torch.zeros(N, dtype=torch.bool)
    token_scalars: Dict[str, float] = {}
    for name, sel in (("all", torch.ones(N, dtype=torch.bool, device=e.device)), ("adv_pos", adv_g == 0),
                      ("adv_nonpos", adv_g == 1), ("matched", ~tok_mis), ("mismatched", tok_mis)):
        for k, v in _token_split_stats(r, lr, outside, sel).items():
            token_scalars[f"{name}/{k}"] = v
    return RatioStats(count=count.view(shape), sum_x=s1.view(shape), sum_x2=s2.view(shape),
                      n_outside=n_out.view(shape), max_abs_log=max_abs.view(shape), token_scalars=token_scalars)


def log_ratio_histogram(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                        token_mismatched: torch.Tensor, edges: torch.Tensor = HIST_EDGES) -> torch.Tensor:
    """Counts of real tokens per log-ratio bin, split by advantage sign and routing match.

    log_ratio, mask, advantages, token_mismatched (bool): `[batch, response_len]` ->
    `[2 (A>0, A<=0), 2 (matched, mismatched), len(edges) - 1]` int64. Values beyond the outer edges are
    counted in the end bins (a histogram that drops outliers would hide exactly what we look for)."""
    _check_tokens(log_ratio=log_ratio, mask=mask, advantages=advantages, token_mismatched=token_mismatched)
    real = mask > 0
    nb = len(edges) - 1
    b = (torch.bucketize(log_ratio[real].double(), edges.to(log_ratio.device), right=True) - 1).clamp(0, nb - 1)
    g = ((advantages[real] <= 0).long() * 2 + token_mismatched[real].long()) * nb + b
    return torch.bincount(g, minlength=4 * nb).view(2, 2, nb)


def compute_prob_gap(train_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor,
                     taus: Sequence[float] = (2, 5, 10), threshold: float = 0.5) -> Dict[str, float]:
    """Train-inference gap of the sampled tokens' probabilities (metrics of NeMo-RL, slime and the R3 paper).

    train_log_prob, rollout_log_prob, mask: `[batch, response_len]`. With d = log p_train - log p_rollout and
    w = p_train / p_rollout = exp(d) (tokens are sampled from the rollout policy), over real tokens:
      abs_prob_diff_mean / _max     mean / max |p_train - p_rollout|
      token_mult_prob_error         mean exp(|d|)  (NeMo-RL's definition: a mean of exps)
      exp_mean_abs_log_prob_diff    exp(mean |d|)  (the geometric form; <= token_mult_prob_error)
      abs_log_prob_diff_mean / _max mean / max |d|
      log_prob_diff_frac_above_threshold   share of tokens with |d| > threshold
      kl_k1                         mean(-d): k1 estimate of KL(rollout || train)
      kl_k3_rollout_train           mean(w - 1 - d): k3 estimate of KL(rollout || train) (NeMo-RL gen_kl_error)
      kl_k3_train_rollout           mean(1/w - 1 + d): NeMo-RL's policy_kl_error, "KL(train || rollout)"
      js_divergence                 NeMo-RL's js_divergence_error: 0.5 k3(p_train, m) + 0.5 k3(p_rollout, m),
                                    m = (p_train + p_rollout) / 2, k3(p, m) = p/m - 1 - log(p/m)
      is_ratio_mean                 mean w (NeMo-RL sampling_importance_ratio)
      is_ratio_chi2                 E[w^2] - 1 (chi-square divergence estimate)
      is_ratio_ess_frac             (E w)^2 / E[w^2]: effective sample size / number of tokens
      extreme_token_frac_tau{τ}     F(τ): share of tokens with max(w, 1/w) > τ (R3 paper)
    All NaN when there is no real token.
    """
    _check_tokens(train_log_prob=train_log_prob, rollout_log_prob=rollout_log_prob, mask=mask)
    real = mask > 0
    lt, lro = train_log_prob[real].double(), rollout_log_prob[real].double()
    names = ["abs_prob_diff_mean", "abs_prob_diff_max", "token_mult_prob_error", "exp_mean_abs_log_prob_diff",
             "abs_log_prob_diff_mean", "abs_log_prob_diff_max", "log_prob_diff_frac_above_threshold", "kl_k1",
             "kl_k3_rollout_train", "kl_k3_train_rollout", "js_divergence", "is_ratio_mean", "is_ratio_chi2",
             "is_ratio_ess_frac"] + [f"extreme_token_frac_tau{t:g}" for t in taus]
    if lt.numel() == 0:
        return {k: NAN for k in names}
    d = lt - lro
    dc = d.clamp(-30, 30)  # exp of a garbage log-prob must not make the mean inf
    w = torch.exp(dc)
    pt, pr = lt.exp(), lro.exp()
    ad = d.abs()
    mix = 0.5 * (pt + pr)
    k3 = lambda p: p / mix - 1 - torch.log(p / mix)  # noqa: E731
    mw, mw2 = float(w.mean()), float((w * w).mean())
    out = {
        "abs_prob_diff_mean": float((pt - pr).abs().mean()),
        "abs_prob_diff_max": float((pt - pr).abs().max()),
        "token_mult_prob_error": float(torch.exp(ad.clamp(max=30)).mean()),
        "exp_mean_abs_log_prob_diff": math.exp(min(float(ad.mean()), 30.0)),
        "abs_log_prob_diff_mean": float(ad.mean()),
        "abs_log_prob_diff_max": float(ad.max()),
        "log_prob_diff_frac_above_threshold": float((ad > threshold).double().mean()),
        "kl_k1": float((-d).mean()),
        "kl_k3_rollout_train": float((w - 1 - dc).mean()),
        "kl_k3_train_rollout": float((torch.exp(-dc) - 1 + dc).mean()),
        "js_divergence": float((0.5 * k3(pt) + 0.5 * k3(pr)).mean()),
        "is_ratio_mean": mw,
        "is_ratio_chi2": mw2 - 1.0,
        "is_ratio_ess_frac": mw * mw / mw2,
    }
    for t in taus:
        out[f"extreme_token_frac_tau{t:g}"] = float((ad > math.log(t)).double().mean())  # max(w, 1/w) > τ
    return out
