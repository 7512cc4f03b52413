"""UP-GRPO and the baselines: the seed's gradient identities, the seed's own code as an oracle, aggregation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upgrpo_megatron.losses import agg_loss, compute_policy_loss

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)


# --- the seed's appendix implementation, transcribed as an oracle (with verl's helpers of that era) ---------
def _oracle_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _oracle_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    if loss_agg_mode == "token-mean":
        return _oracle_masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum":
        return torch.mean(torch.sum(loss_mat * loss_mask, dim=-1))
    if loss_agg_mode == "seq-mean-token-mean":
        return torch.mean(torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1))
    if loss_agg_mode == "seq-mean-token-sum-norm":  # Dr. GRPO: mean over sequences of token sums / L
        return torch.mean(torch.sum(loss_mat * loss_mask, dim=-1)) / loss_mask.shape[-1]
    raise ValueError(loss_agg_mode)


def seed_up_grpo(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                 clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = _oracle_masked_mean(-negative_approx_kl, response_mask)
    pg_losses_pos = -advantages * log_prob
    pg_losses1_neg = -advantages * ratio
    pg_losses2_neg = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1_neg = torch.maximum(pg_losses1_neg, pg_losses2_neg)
    pg_losses3_neg = -advantages * clip_ratio_c
    clip_pg_losses2_neg = torch.min(pg_losses3_neg, clip_pg_losses1_neg)
    pg_losses_neg = torch.where(advantages < 0, clip_pg_losses2_neg, clip_pg_losses1_neg)
    pg_losses = torch.where(advantages > 0, pg_losses_pos, pg_losses_neg)
    pg_loss = _oracle_agg_loss(pg_losses, response_mask, loss_agg_mode)
    neg_adv_mask = (advantages <= 0).float() * response_mask
    pg_clipfrac = _oracle_masked_mean(torch.gt(pg_losses2_neg, pg_losses1_neg).float(), neg_adv_mask)
    pg_clipfrac_lower = _oracle_masked_mean(torch.gt(clip_pg_losses1_neg, pg_losses3_neg).float(), neg_adv_mask)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def seed_vanilla(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high,
                 clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """verl's dual-clip compute_policy_loss (the seed's negative path applied to every token)."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip2 = torch.min(pg_losses3, clip1)
    pg_losses = torch.where(advantages < 0, clip2, clip1)
    return _oracle_agg_loss(pg_losses, response_mask, loss_agg_mode)


def _inputs(b=4, t=7, seed=0, dtype=torch.float64, adv=None):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    lp = (old + 0.4 * torch.randn(b, t, generator=g, dtype=dtype)).clamp(max=0)
    a = torch.randn(b, 1, generator=g, dtype=dtype).expand(b, t).clone() if adv is None else adv
    mask = (torch.rand(b, t, generator=g) > 0.3).to(dtype)
    mask[:, 0] = 1  # at least one token per row (the seed's seq-mean modes divide by it)
    return old, lp, a, mask


def _grad(fn, lp):
    lp = lp.clone().requires_grad_()
    fn(lp).backward()
    return lp.grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_positive_branch_gradient_equals_aw_sft_for_any_old_log_prob(agg):
    old, lp, _, mask = _inputs()
    adv = torch.rand_like(lp) + 0.1  # all A > 0
    ref = _grad(lambda x: agg_loss(-adv * x, mask, agg), lp)  # advantage-weighted SFT: -A log pi
    for shift in (-5.0, 0.0, 5.0):
        g = _grad(lambda x: compute_policy_loss(old + shift, x, adv, mask, loss_mode="up_grpo",
                                                loss_agg_mode=agg, **CLIP)[0], lp)
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-12)
    # token-mean: the gradient is exactly -A / (number of valid tokens) on valid tokens, 0 elsewhere
    g = _grad(lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="up_grpo", **CLIP)[0], lp)
    torch.testing.assert_close(g, -adv * mask / mask.sum(), rtol=0, atol=1e-12)


def test_non_positive_advantages_are_bit_identical_to_vanilla():
    old, lp, _, mask = _inputs(seed=3)
    adv = -torch.rand_like(lp)
    adv[0, :3] = 0.0
    lv, mv = compute_policy_loss(old, lp, adv, mask, loss_mode="vanilla", **CLIP)
    lu, mu = compute_policy_loss(old, lp, adv, mask, loss_mode="up_grpo", **CLIP)
    assert torch.equal(lv, lu)
    gv = _grad(lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="vanilla", **CLIP)[0], lp)
    gu = _grad(lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="up_grpo", **CLIP)[0], lp)
    assert torch.equal(gv, gu)
    assert mv["pg_clipfrac"] == mu["pg_clipfrac"] and mv["ppo_kl"] == mu["ppo_kl"]


@pytest.mark.parametrize("mode", ["vanilla", "up_grpo", "gspo", "up_gspo"])
def test_zero_advantage_and_masked_tokens_get_zero_gradient(mode):
    old, lp, adv, mask = _inputs(seed=5)
    adv[1] = 0.0
    g = _grad(lambda x: compute_policy_loss(old, x, adv, mask, loss_mode=mode, **CLIP)[0], lp)
    assert torch.all(g[1] == 0)
    assert torch.all(g[mask == 0] == 0)
    assert g[mask.bool() & (adv != 0)].abs().sum() > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_up_grpo_and_vanilla_agree_with_the_seeds_code(agg):
    for seed in range(5):
        old, lp, adv, mask = _inputs(b=6, t=9, seed=seed)
        f_ours = lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="up_grpo", loss_agg_mode=agg, **CLIP)[0]  # noqa: E731
        f_seed = lambda x: seed_up_grpo(old, x, adv, mask, 0.2, 0.28, 3.0, agg)[0]  # noqa: E731
        torch.testing.assert_close(f_ours(lp), f_seed(lp), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_grad(f_ours, lp), _grad(f_seed, lp), rtol=1e-12, atol=1e-12)
        _, metrics = compute_policy_loss(old, lp, adv, mask, loss_mode="up_grpo", loss_agg_mode=agg, **CLIP)
        _, clipfrac, kl, lower = seed_up_grpo(old, lp, adv, mask, 0.2, 0.28, 3.0, agg)
        assert metrics["pg_clipfrac"] == pytest.approx(float(clipfrac), abs=1e-12)
        assert metrics["ppo_kl"] == pytest.approx(float(kl), abs=1e-12)
        assert metrics["pg_clipfrac_lower"] == pytest.approx(float(lower), abs=1e-12)
        fv = lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="vanilla", loss_agg_mode=agg, **CLIP)[0]  # noqa: E731
        fsv = lambda x: seed_vanilla(old, x, adv, mask, 0.2, 0.28, 3.0, agg)  # noqa: E731
        torch.testing.assert_close(fv(lp), fsv(lp), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_grad(fv, lp), _grad(fsv, lp), rtol=1e-12, atol=1e-12)


def test_up_metrics_count_positive_tokens_and_those_the_baseline_would_clip():
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.5, 1.0, 1.1, 2.0]], dtype=torch.float64))  # ratios 1.5, 1.0, 1.1, 2.0
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    _, m = compute_policy_loss(old, lp, adv, mask, loss_mode="up_grpo", **CLIP)
    assert m["up/pos_token_frac"] == pytest.approx(3 / 4)
    assert m["up/pos_ratio_above_clip_frac"] == pytest.approx(1 / 3)  # only 1.5 > 1.28 among positives


def test_gspo_uses_the_length_normalised_sequence_ratio():
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.tensor([[0.3, -0.1, 0.1], [0.05, 0.05, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    s = torch.exp(torch.tensor([0.1, 0.05], dtype=torch.float64))  # exp(mean log-ratio over valid tokens)
    loss, mat = compute_policy_loss(old, lp, adv, mask, loss_mode="gspo", clip_ratio_low=0.2, clip_ratio_high=0.28,
                                    loss_agg_mode="token-mean", return_loss_mat=True)[0::2]
    torch.testing.assert_close(mat[0], -s[0].expand(3))  # inside the clip range: -A s
    torch.testing.assert_close(mat[1, :2], s[1].expand(2))
    # gradient of the token form: d(-A s_i)/d log pi_t = -A s_i / N_tokens
    g = _grad(lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="gspo", **CLIP)[0], lp)
    expected = (-adv * s[:, None] * mask) / mask.sum()
    torch.testing.assert_close(g, expected)


def test_up_gspo_positive_branch_is_aw_sft_and_negative_branch_is_gspo():
    old, lp, _, mask = _inputs(seed=9)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:, None].expand_as(lp).clone()
    _, _, mat = compute_policy_loss(old, lp, adv, mask, loss_mode="up_gspo", **CLIP, return_loss_mat=True)
    _, _, gmat = compute_policy_loss(old, lp, adv, mask, loss_mode="gspo", **CLIP, return_loss_mat=True)
    pos = adv > 0
    torch.testing.assert_close(mat[pos], (-adv * lp)[pos])
    torch.testing.assert_close(mat[~pos], gmat[~pos])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_with_global_normaliser_equal_one_big_batch(agg):
    old, lp, adv, mask = _inputs(b=6, t=5, seed=11)
    big = lambda x: compute_policy_loss(old, x, adv, mask, loss_mode="up_grpo", loss_agg_mode=agg, **CLIP)[0]  # noqa: E731
    n_tok, n_seq = float(mask.sum()), float((mask.sum(-1) > 0).sum())

    def accumulated(x):
        total = 0
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):  # uneven micro-batches, like DP ranks would see
            total = total + compute_policy_loss(old[rows], x[rows], adv[rows], mask[rows], loss_mode="up_grpo",
                                                loss_agg_mode=agg, global_token_count=n_tok,
                                                global_seq_count=n_seq, **CLIP)[0]
        return total

    torch.testing.assert_close(accumulated(lp), big(lp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(accumulated, lp), _grad(big, lp), rtol=1e-12, atol=1e-12)


def test_bad_input_names_the_argument():
    old, lp, adv, mask = _inputs()
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss(old, lp, adv[:, :3], mask, loss_mode="up_grpo")
    with pytest.raises(ValueError, match="loss_mode"):
        compute_policy_loss(old, lp, adv, mask, loss_mode="ppo2")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        compute_policy_loss(old, lp, adv, mask, loss_agg_mode="mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss(old, lp, adv, mask, clip_ratio_c=1.0)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 8), seed=st.integers(0, 10_000),
       mode=st.sampled_from(["vanilla", "up_grpo", "gspo", "up_gspo"]),
       agg=st.sampled_from(["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]))
def test_property_finite_loss_and_gradient_confined_to_valid_tokens(b, t, seed, mode, agg):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    lp = old + torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t, generator=g, dtype=torch.float64).sign() * torch.rand(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.5).double()
    mask[0, 0] = 1  # a row with possibly a single token
    x = lp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(old, x, adv, mask, loss_mode=mode, loss_agg_mode=agg, **CLIP)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    assert torch.all(x.grad[mask == 0] == 0)
    assert 0.0 <= metrics["pg_clipfrac"] <= 1.0 and 0.0 <= metrics["pg_clipfrac_lower"] <= 1.0
    if mode == "up_grpo":  # positive tokens: exactly the AW-SFT gradient, whatever the ratio
        pos = (adv > 0) & (mask > 0)
        y = lp.clone().requires_grad_()
        agg_loss(-adv * y * pos, mask, agg, global_token_count=float(mask.sum()),
                 global_seq_count=float((mask.sum(-1) > 0).sum())).backward()
        torch.testing.assert_close(x.grad[pos], y.grad[pos], rtol=1e-10, atol=1e-12)
