"""Reference implementations transcribed as oracles (float64 tests compare ours against them).

- `verl_masked_mean`, `verl_agg_loss`: verl's helpers as of the seed's writing (mid-2025, verl ~0.4:
  `masked_mean` divides by mask.sum() + 1e-8; `seq-mean-token-sum-norm` divides the token sum by the width L).
- `seed_compute_policy_loss`: the seed's appendix (seed/up-grpo.md), line for line.
- `verl_vanilla_policy_loss`: verl's dual-clip `compute_policy_loss` (with its +-20 log-ratio clamp).
- `verl_gspo_policy_loss`: verl's `compute_policy_loss_gspo`, with the aggregation mode as a parameter.
These are test helpers, not a library: they allocate freely and assert like the originals.
"""
import torch


class verl_F:  # noqa: N801 - the namespace the seed's code refers to
    @staticmethod
    def masked_mean(values, mask, axis=None):
        return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    if loss_agg_mode == "token-mean":
        loss = verl_F.masked_mean(loss_mat, loss_mask)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)  # token-sum
        loss = torch.mean(seq_losses)  # seq-mean
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)  # token-mean
        loss = torch.mean(seq_losses)  # seq-mean
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        loss = torch.sum(seq_losses) / loss_mask.shape[-1]
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


agg_loss = verl_agg_loss  # the seed's code calls it by this name


def seed_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                             cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """The seed's appendix implementation of the UP-GRPO policy loss (transcribed)."""
    assert clip_ratio_c > 1.0, (f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, "
                                f"but get the value: {clip_ratio_c}.")
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)
    # 1. POSITIVE PATH (A > 0)
    pg_losses_pos = -advantages * log_prob
    # 2. NEGATIVE PATH (A <= 0)
    pg_losses1_neg = -advantages * ratio
    if cliprange_low is None:
        cliprange_low = cliprange
    if cliprange_high is None:
        cliprange_high = cliprange
    pg_losses2_neg = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1_neg = torch.maximum(pg_losses1_neg, pg_losses2_neg)
    pg_losses3_neg = -advantages * clip_ratio_c
    clip_pg_losses2_neg = torch.min(pg_losses3_neg, clip_pg_losses1_neg)
    pg_losses_neg = torch.where(advantages < 0, clip_pg_losses2_neg, clip_pg_losses1_neg)
    pg_losses = torch.where(advantages > 0, pg_losses_pos, pg_losses_neg)
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    neg_adv_mask = (advantages <= 0).float() * response_mask
    clip_frac_tensor = torch.gt(pg_losses2_neg, pg_losses1_neg).float()
    pg_clipfrac = verl_F.masked_mean(clip_frac_tensor, neg_adv_mask)
    lower_clip_frac_tensor = torch.gt(clip_pg_losses1_neg, pg_losses3_neg).float()
    pg_clipfrac_lower = verl_F.masked_mean(lower_clip_frac_tensor, neg_adv_mask)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_vanilla_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                             clip_ratio_c=3.0, loss_agg_mode="token-mean", return_mat=False):
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = verl_F.masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(),
                                           response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if return_mat:
        return pg_losses
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_gspo_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                          loss_agg_mode="seq-mean-token-mean", return_mat=False):
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    if return_mat:
        return pg_losses
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    pg_clipfrac = verl_F.masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, response_mask)
    return pg_loss, pg_clipfrac, ppo_kl, torch.tensor(0.0)


def up_gspo_oracle(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                   loss_agg_mode):
    """Seed §4.4 composed from the two oracles: the seed's positive path, verl's GSPO for A <= 0."""
    neg = verl_gspo_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                                return_mat=True)
    pg_losses = torch.where(advantages > 0, -advantages * log_prob, neg)
    return agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
