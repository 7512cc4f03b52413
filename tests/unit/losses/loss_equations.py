"""Test oracles written from the equations (the UP-GRPO post, PPO/DAPO dual clip, GSPO, TOPR, CISPO, the
train-inference correction arms), not from any implementation: explicit loops over the tokens of float64 tensors,
with Python `math` for everything that carries no gradient. Deliberately slow and plain; use them on small batches.

Losses are built token by token from the 0-dim elements of `log_prob`, so autograd through an oracle gives the
oracle's gradient. Masked tokens never enter an oracle (their values do not matter).
"""
import math
import statistics

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def clip(x, lo, hi):
    """clip(x, lo, hi) of a float or a 0-dim tensor."""
    if isinstance(x, torch.Tensor):
        return torch.clamp(x, lo, hi)
    return min(max(x, lo), hi)


def valid_tokens(mask, i):
    return [t for t in range(mask.shape[1]) if mask[i, t] > 0]


def seq_ratio(old, lp, mask, i):
    """GSPO: s_i = exp((1/|y_i|) sum_t (log pi_t - log pi_old,t)), a float."""
    toks, lp = valid_tokens(mask, i), lp.detach()
    return math.exp(sum(float(lp[i, t]) - float(old[i, t]) for t in toks) / len(toks))


# --- per-token losses (x = log pi_theta of the token, a 0-dim tensor with grad) -------------------------------------
def ppo_dual_clip(r, a, eps_low, eps_high, c):
    """PPO clip with the dual clip: max(-A r, -A clip(r, 1-eps_l, 1+eps_h)), and for A < 0 min(-A c, that)."""
    loss = torch.maximum(-a * r, -a * clip(r, 1 - eps_low, 1 + eps_high))
    if a < 0:
        loss = torch.minimum(loss, torch.tensor(-a * c, dtype=torch.float64))
    return loss


def gspo_clip(s, a, eps_low, eps_high):
    """GSPO: max(-A s, -A clip(s, 1-eps_l, 1+eps_h)) (no dual clip)."""
    return torch.maximum(-a * s, -a * clip(s, 1 - eps_low, 1 + eps_high))


def token_loss(mode, x, old, a, s, eps_low=0.2, eps_high=0.28, c=3.0):
    """One token's loss. x: log pi (0-dim, grad); old: log pi_old (float); a: advantage (float); s: the GSPO
    sequence ratio (float), used by gspo / up_gspo."""
    x_val = float(x.detach())
    r = torch.exp(x - old)  # r = pi_theta / pi_old
    r_val = math.exp(x_val - old)  # the same number, without gradient: sg(r)
    if mode in ("up_grpo", "up_gspo", "topr") and a > 0:
        return -a * x  # the positive branch: -A log pi, no ratio, no clip
    if mode in ("vanilla", "up_grpo"):
        return ppo_dual_clip(r, a, eps_low, eps_high, c)
    if mode in ("gspo", "up_gspo"):
        s_t = s * torch.exp(x - x_val)  # GSPO-token: value s_i, gradient s_i grad log pi_t
        return gspo_clip(s_t, a, eps_low, eps_high)
    if mode == "topr":
        return -min(r_val, 1.0) * a * x  # A <= 0: -sg(clamp(r, 0, 1)) A log pi
    if mode == "cispo":
        lo = 1 - eps_low if eps_low < 1 else 0.0
        return -clip(r_val, lo, 1 + eps_high) * a * x  # -sg(clip(r)) A log pi
    raise ValueError(mode)


def aggregate(rows, mode, L):
    """rows: one list per sequence of its valid tokens' losses. The four aggregation modes, written out."""
    n_tok = sum(len(r) for r in rows)
    kept = [r for r in rows if r]  # sequences with no valid token count for nothing
    total = sum(sum(r) for r in kept)
    if mode == "token-mean":
        return total / n_tok
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in kept) / len(kept)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in kept) / len(kept)
    if mode == "seq-mean-token-sum-norm":
        return total / L
    raise ValueError(mode)


def policy_loss(mode, old, lp, adv, mask, agg="token-mean", eps_low=0.2, eps_high=0.28, c=3.0, weights=None, L=None):
    """The aggregated loss of `mode` as a 0-dim tensor built from lp's elements; weights: optional per-token
    multipliers u_it (a correction arm)."""
    rows = []
    for i in range(lp.shape[0]):
        toks = valid_tokens(mask, i)
        s = seq_ratio(old, lp, mask, i) if toks and mode in ("gspo", "up_gspo") else None
        row = []
        for t in toks:
            l_t = token_loss(mode, lp[i, t], float(old[i, t]), float(adv[i, t]), s, eps_low, eps_high, c)
            row.append(l_t if weights is None else float(weights[i, t]) * l_t)
        rows.append(row)
    return aggregate(rows, agg, lp.shape[1] if L is None else L)


def value_and_grad(mode, old, lp, adv, mask, **kw):
    x = lp.clone().requires_grad_()
    loss = policy_loss(mode, old, x, adv, mask, **kw)
    loss.backward()
    return loss.detach(), x.grad


def literal_up_grpo_loss(old, lp, adv, mask, eps_low=0.2, eps_high=0.28, c=3.0, agg="token-mean"):
    """UP-GRPO in the post's literal form, vectorised (three products, a max, a min and two wheres; no clamp of the
    log-ratio): a second reference at sizes the loops cannot reach, and the straightforward form a benchmark can
    time against. Returns (loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), clip fractions over all valid tokens."""
    m = mask.to(lp.dtype)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    loss_pos = -adv * lp                                                      # A > 0: -A log pi
    loss1 = -adv * ratio                                                      # -A r
    loss2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)              # -A clip(r)
    clipped = torch.maximum(loss1, loss2)                                     # max(-A r, -A clip(r))
    loss3 = -adv * c                                                          # -A c
    loss_neg = torch.where(adv < 0, torch.minimum(loss3, clipped), clipped)   # dual clip for A < 0
    loss_mat = torch.where(adv > 0, loss_pos, loss_neg)
    n_tok = m.sum()
    seq_tok = m.sum(-1)
    has = seq_tok > 0
    if agg == "token-mean":
        loss = (loss_mat * m).sum() / n_tok
    elif agg == "seq-mean-token-sum":
        loss = (loss_mat * m).sum(-1)[has].sum() / has.sum()
    elif agg == "seq-mean-token-mean":
        loss = ((loss_mat * m).sum(-1)[has] / seq_tok[has]).sum() / has.sum()
    else:
        loss = (loss_mat * m).sum() / lp.shape[-1]
    neg = (adv <= 0).to(lp.dtype) * m
    pg_clipfrac = ((loss2 > loss1).to(lp.dtype) * neg).sum() / n_tok
    pg_clipfrac_lower = ((clipped > loss3) & (adv < 0)).to(lp.dtype).mul(m).sum() / n_tok
    ppo_kl = (-log_ratio * m).sum() / n_tok
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


# --- metrics -------------------------------------------------------------------------------------------------------
def _frac(num, den):
    return num / den if den else 0.0


def policy_metrics(mode, old, lp, adv, mask, eps_low=0.2, eps_high=0.28, c=3.0):
    """The metrics every mode reports, from their definitions, one token at a time."""
    n = n_neg = n_pos = clipped = clipped_neg = lower = above = 0
    kl, r_pos, r_neg = [], [], []
    for i in range(lp.shape[0]):
        toks = valid_tokens(mask, i)
        s = seq_ratio(old, lp, mask, i) if toks else None
        for t in toks:
            a, o, x = float(adv[i, t]), float(old[i, t]), float(lp[i, t])
            r = math.exp(x - o)
            lo = 1 - eps_low if eps_low < 1 else 0.0
            if mode in ("vanilla", "up_grpo"):
                is_clipped = -a * clip(r, lo, 1 + eps_high) > -a * r  # the PPO clip changed the loss
                if mode == "up_grpo":
                    is_clipped = is_clipped and a <= 0
                is_lower = a < 0 and max(-a * r, -a * clip(r, lo, 1 + eps_high)) > -a * c  # the dual clip binds
            elif mode in ("gspo", "up_gspo"):
                is_clipped = -a * clip(s, lo, 1 + eps_high) > -a * s
                if mode == "up_gspo":
                    is_clipped = is_clipped and a <= 0
                is_lower = False
            elif mode == "topr":
                is_clipped, is_lower = a <= 0 and r > 1.0, False  # the taper min(r, 1) binds
            else:  # cispo
                is_clipped, is_lower = clip(r, lo, 1 + eps_high) != r, False  # the IS weight was clipped
            n += 1
            clipped += is_clipped
            lower += is_lower
            kl.append(o - x)
            if a > 0:
                n_pos += 1
                r_pos.append(r)
                above += (s if mode in ("gspo", "up_gspo") else r) > 1 + eps_high
            else:
                n_neg += 1
                r_neg.append(r)
                clipped_neg += is_clipped
    out = {
        "pg_clipfrac": _frac(clipped, n),
        "pg_clipfrac_lower": _frac(lower, n),
        "neg/pg_clipfrac": _frac(clipped_neg, n_neg),
        "ppo_kl": statistics.fmean(kl) if kl else 0.0,
        "pos/ratio_above_clip_frac": _frac(above, n_pos),
        "ratio/pos_mean": statistics.fmean(r_pos) if r_pos else 0.0,
        "ratio/pos_var": statistics.pvariance(r_pos) if r_pos else 0.0,
        "ratio/neg_mean": statistics.fmean(r_neg) if r_neg else 0.0,
        "ratio/neg_var": statistics.pvariance(r_neg) if r_neg else 0.0,
    }
    if mode.startswith("up_"):
        out["up/pos_token_frac"] = _frac(n_pos, n)
        out["up/pos_ratio_above_clip_frac"] = out["pos/ratio_above_clip_frac"]
    return out


# --- correction arms ------------------------------------------------------------------------------------------------
def engine_ratios(trainer_lp, rollout_lp, mask):
    """{(i, t): w_it = pi_trainer / pi_rollout} over the valid tokens."""
    return {(i, t): math.exp(float(trainer_lp[i, t]) - float(rollout_lp[i, t]))
            for i in range(mask.shape[0]) for t in valid_tokens(mask, i)}


def tis(trainer_lp, rollout_lp, mask, cap=2.0):
    """TIS: u = min(w, C); metrics: truncated fraction, mean weight (over valid tokens)."""
    w = engine_ratios(trainer_lp, rollout_lp, mask)
    u = torch.zeros(mask.shape, dtype=torch.float64)
    for (i, t), x in w.items():
        u[i, t] = min(x, cap)
    return u, {"tis/truncated_frac": _frac(sum(x > cap for x in w.values()), len(w)),
               "tis/weight_mean": statistics.fmean(min(x, cap) for x in w.values()) if w else 0.0}


def icepop(trainer_lp, rollout_lp, mask, low=0.5, high=5.0, scale_by_ratio=True):
    """IcePop: u = w (or 1) inside [low, high], 0 outside."""
    w = engine_ratios(trainer_lp, rollout_lp, mask)
    u = torch.zeros(mask.shape, dtype=torch.float64)
    for (i, t), x in w.items():
        if low <= x <= high:
            u[i, t] = x if scale_by_ratio else 1.0
    n = len(w)
    lo_n, hi_n = sum(x < low for x in w.values()), sum(x > high for x in w.values())
    return u, {"icepop/masked_frac": _frac(lo_n + hi_n, n), "icepop/masked_low_frac": _frac(lo_n, n),
               "icepop/masked_high_frac": _frac(hi_n, n),
               "icepop/weight_mean": statistics.fmean(float(u[k]) for k in w) if w else 0.0}


def seq_mask_is(trainer_lp, rollout_lp, mask, low=0.999, high=1.001):
    """Geometric-mean sequence mask: u = 1 on the valid tokens of sequences with low <= prod_t w_t^(1/n) <= high."""
    u = torch.zeros(mask.shape, dtype=torch.float64)
    seqs = masked_seqs = toks = masked_toks = 0
    for i in range(mask.shape[0]):
        valid = valid_tokens(mask, i)
        if not valid:
            continue
        logs = [float(trainer_lp[i, t]) - float(rollout_lp[i, t]) for t in valid]
        geo = math.exp(sum(logs) / len(logs))  # exp of the mean log w
        keep = low <= geo <= high
        seqs += 1
        toks += len(valid)
        masked_seqs += not keep
        masked_toks += 0 if keep else len(valid)
        for t in valid:
            u[i, t] = 1.0 if keep else 0.0
    return u, {"seq_mask_is/masked_seq_frac": _frac(masked_seqs, seqs),
               "seq_mask_is/masked_token_frac": _frac(masked_toks, toks)}


def routing_mask(train_routing, rollout_routing, mask, min_layers=1, alpha=0.0, only_negative=False, advantages=None):
    """u = alpha on tokens whose top-k expert SETS differ in >= min_layers layers (a layer with -1 on either side
    is not compared), 1 elsewhere; with only_negative, A > 0 tokens are left at 1."""
    u = torch.zeros(mask.shape, dtype=torch.float64)
    n = hit_n = pos_n = pos_hit = neg_n = neg_hit = 0
    for i in range(mask.shape[0]):
        for t in valid_tokens(mask, i):
            differing = 0
            for layer in range(train_routing.shape[2]):
                a = [int(e) for e in train_routing[i, t, layer]]
                b = [int(e) for e in rollout_routing[i, t, layer]]
                if min(a) < 0 or min(b) < 0:
                    continue  # not captured on one side: not compared
                differing += set(a) != set(b)
            hit = differing >= min_layers
            if only_negative and float(advantages[i, t]) > 0:
                hit = False
            u[i, t] = alpha if hit else 1.0
            n += 1
            hit_n += hit
            if advantages is not None:
                if float(advantages[i, t]) > 0:
                    pos_n, pos_hit = pos_n + 1, pos_hit + hit
                else:
                    neg_n, neg_hit = neg_n + 1, neg_hit + hit
    metrics = {"routing_mask/masked_frac": _frac(hit_n, n)}
    if advantages is not None:
        metrics["routing_mask/masked_pos_frac"] = _frac(pos_hit, pos_n)
        metrics["routing_mask/masked_neg_frac"] = _frac(neg_hit, neg_n)
    return u, metrics
