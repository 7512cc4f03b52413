"""Every loss mode against an oracle written from its equation (tests/unit/losses/loss_equations.py): values, gradients
(autograd on float64 leaves) and metrics; the new modes' gradient identities; per-token weights; the registry."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.losses import loss_equations as eq
from upgrpo_megatron.losses import AGG_MODES, POLICY_LOSSES, agg_loss, compute_policy_loss, register_policy_loss

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
EPS = dict(eps_low=0.2, eps_high=0.28, c=3.0)
MODES = ("vanilla", "up_grpo", "gspo", "up_gspo", "topr", "cispo")
TOL = dict(rtol=1e-12, atol=1e-13)


def _inputs(b=5, t=7, seed=0, spread=1.0, per_token_adv=False):
    """float64 rollout-like tensors: ratios e^{N(0, spread)} (wide enough for every clip to fire), advantages of
    both signs with exact zeros, a ragged mask with >= 1 valid token per row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    if per_token_adv:
        adv = torch.randint(-1, 2, (b, t), generator=g).double() * torch.rand(b, t, generator=g, dtype=torch.float64)
    else:
        adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
        adv[0] = 0.0
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[torch.arange(b), torch.randint(0, t, (b,), generator=g)] = 1
    return old, lp, adv, mask


def _ours(mode, old, lp, adv, mask, agg="token-mean", weights=None, **clip):
    x = lp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(old, x, adv, mask, loss_mode=mode, loss_agg_mode=agg, token_weights=weights,
                                        **{**CLIP, **clip})
    loss.backward()
    return loss.detach(), x.grad, metrics


# --- values and gradients ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_every_mode_matches_its_equation_oracle(mode, agg):
    for seed, per_token in ((0, False), (1, True), (2, False)):
        old, lp, adv, mask = _inputs(seed=seed, per_token_adv=per_token, spread=0.3 if "gspo" in mode else 1.0)
        loss, grad, _ = _ours(mode, old, lp, adv, mask, agg)
        ref_loss, ref_grad = eq.value_and_grad(mode, old, lp, adv, mask, agg=agg, **EPS)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        torch.testing.assert_close(grad, ref_grad, **TOL)
        assert torch.all(grad[mask == 0] == 0)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 5), t=st.integers(1, 8), seed=st.integers(0, 10_000), spread=st.sampled_from([0.1, 0.5, 2.0]),
       mode=st.sampled_from(MODES), agg=st.sampled_from(AGG_MODES))
def test_property_every_mode_matches_its_oracle_on_random_shapes_and_masks(b, t, seed, spread, mode, agg):
    old, lp, adv, mask = _inputs(b, t, seed, spread, per_token_adv=True)
    loss, grad, metrics = _ours(mode, old, lp, adv, mask, agg)
    ref_loss, ref_grad = eq.value_and_grad(mode, old, lp, adv, mask, agg=agg, **EPS)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    ref = eq.policy_metrics(mode, old, lp, adv, mask, **EPS)
    assert metrics.keys() == ref.keys()
    for k, v in ref.items():
        assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("agg", AGG_MODES)
def test_up_grpo_equals_the_posts_literal_form_on_a_large_batch(agg):
    """The closed form (one clamp in log space) against the post's three products, max, min and wheres, at a size
    the loop oracle cannot reach; the literal form itself is checked against the loop oracle on a small batch."""
    small = _inputs(seed=10, per_token_adv=True)
    ref_loss, ref_grad = eq.value_and_grad("up_grpo", *small, agg=agg, **EPS)
    x = small[1].clone().requires_grad_()
    lit = eq.literal_up_grpo_loss(small[0], x, small[2], small[3], agg=agg)[0]
    lit.backward()
    torch.testing.assert_close(lit.detach(), ref_loss, **TOL)
    torch.testing.assert_close(x.grad, ref_grad, **TOL)
    old, lp, adv, mask = _inputs(b=64, t=256, seed=11, spread=1.0)
    loss, grad, m = _ours("up_grpo", old, lp, adv, mask, agg)
    y = lp.clone().requires_grad_()
    lit, clipfrac, kl, lower = eq.literal_up_grpo_loss(old, y, adv, mask, agg=agg)
    lit.backward()
    torch.testing.assert_close(loss, lit.detach(), **TOL)
    torch.testing.assert_close(grad, y.grad, **TOL)
    for name, v in (("pg_clipfrac", clipfrac), ("ppo_kl", kl), ("pg_clipfrac_lower", lower)):
        assert m[name] == pytest.approx(float(v.detach()), rel=1e-12), name


# --- metrics -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reports_the_documented_metrics_with_their_definitions(mode):
    for seed in range(3):
        old, lp, adv, mask = _inputs(b=6, t=9, seed=seed, spread=1.5 if "gspo" not in mode else 0.4,
                                     per_token_adv=seed == 1)
        _, _, m = _ours(mode, old, lp, adv, mask)
        ref = eq.policy_metrics(mode, old, lp, adv, mask, **EPS)
        assert m.keys() == ref.keys()
        for k, v in ref.items():
            assert m[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        # one denominator: pg_clipfrac counts over every valid token, neg/pg_clipfrac over the A <= 0 ones
        n, n_neg = float(mask.sum()), float(((adv <= 0) & (mask > 0)).sum())
        assert m["pg_clipfrac"] * n >= m["neg/pg_clipfrac"] * n_neg - 1e-9


def test_clip_fraction_denominators_on_hand_made_ratios():
    """One token per clip region (the same six tokens for every mode, computed by hand):
    r = 0.5 (A<0, below 1-eps_low), 1.0 (A<0), 4.0 (A<0, above c), 1.5 (A>0, above 1+eps_high), 0.9 (A>0), 1.0 (A=0)."""
    r = torch.tensor([[0.5, 1.0, 4.0, 1.5, 0.9, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -1.0, -1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    old, mask = torch.zeros_like(r), torch.ones_like(r)
    expected = {  # (pg_clipfrac, pg_clipfrac_lower, neg/pg_clipfrac)
        "vanilla": (2 / 6, 1 / 6, 1 / 4),  # 0.5 and 1.5 clipped; 4.0 dual-clipped; of the 4 A<=0 tokens: 0.5
        "up_grpo": (1 / 6, 1 / 6, 1 / 4),  # the positive 1.5 is not clipped by UP-GRPO
        "topr": (1 / 6, 0.0, 1 / 4),       # the taper min(r, 1) binds on 4.0 only
        "cispo": (3 / 6, 0.0, 2 / 4),      # 0.5, 4.0, 1.5 outside [0.8, 1.28]
    }
    for mode, (frac, lower, neg) in expected.items():
        _, m = compute_policy_loss(old, r.log(), adv, mask, loss_mode=mode, **CLIP)
        assert m["pg_clipfrac"] == pytest.approx(frac), mode
        assert m["pg_clipfrac_lower"] == pytest.approx(lower), mode
        assert m["neg/pg_clipfrac"] == pytest.approx(neg), mode
        assert m["pos/ratio_above_clip_frac"] == pytest.approx(1 / 2), mode  # 1.5 of {1.5, 0.9}
        assert m["ratio/pos_mean"] == pytest.approx(1.2) and m["ratio/pos_var"] == pytest.approx(0.09)
        # A <= 0 ratios 0.5, 1, 4, 1: mean 1.625, population variance (1.125^2 + 2 * 0.625^2 + 2.375^2) / 4
        assert m["ratio/neg_mean"] == pytest.approx(1.625) and m["ratio/neg_var"] == pytest.approx(7.6875 / 4)
        assert m["ppo_kl"] == pytest.approx(float(-r.log().mean()))


def test_ratio_metrics_stay_finite_for_huge_ratios():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[300.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)  # r = e^300: r^2 only in fp64
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    for mode in MODES:
        if "gspo" in mode:
            continue
        _, m = compute_policy_loss(old, lp, adv, torch.ones_like(old), loss_mode=mode, **CLIP)
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), mode
        assert m["ratio/pos_mean"] == pytest.approx(math.exp(300.0)) and m["ratio/pos_var"] == 0.0


# --- gradient identities of the REINFORCE-style modes --------------------------------------------------------------
@pytest.mark.parametrize("mode", ("up_grpo", "up_gspo", "topr"))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_positive_tokens_get_exactly_the_aw_sft_gradient_whatever_the_ratio(mode, agg):
    old, lp, _, mask = _inputs(seed=4)
    adv = torch.rand_like(lp) + 0.1  # all A > 0
    y = lp.clone().requires_grad_()
    agg_loss(-adv * y, mask, agg).backward()  # advantage-weighted SFT: -A log pi
    for shift in (-5.0, 0.0, 5.0):  # ratios e^{+-5}: far outside every clip range
        _, g, _ = _ours(mode, old + shift, lp, adv, mask, agg)
        torch.testing.assert_close(g, y.grad, rtol=0, atol=1e-12)


def test_topr_negative_tokens_get_the_tapered_reinforce_gradient():
    """d loss / d log pi_t = -min(r_t, 1) A_t / N (token-mean): a truncated IS weight in [0, 1], never a zero from a
    clip (a token with r far below 1 keeps a small gradient, one above 1 keeps the full REINFORCE gradient)."""
    old, lp, _, mask = _inputs(seed=5, spread=2.0)
    adv = -torch.rand_like(lp) - 0.1  # all A < 0
    _, g, m = _ours("topr", old, lp, adv, mask)
    r = torch.exp(lp - old)
    torch.testing.assert_close(g, -torch.clamp(r, max=1.0) * adv * mask / mask.sum(), rtol=1e-12, atol=1e-15)
    assert torch.all(g[mask > 0] != 0)
    assert m["neg/pg_clipfrac"] == pytest.approx(float(((r > 1) & (mask > 0)).sum() / mask.sum()))


def test_cispo_keeps_a_gradient_on_every_token_where_ppo_zeroes_the_clipped_ones():
    old, lp, adv, mask = _inputs(seed=6, spread=2.0, per_token_adv=True)
    adv = torch.where(adv == 0, torch.ones_like(adv), adv)  # no zero advantage: every token should move
    _, g, _ = _ours("cispo", old, lp, adv, mask)
    r = torch.exp(lp - old)
    torch.testing.assert_close(g, -torch.clamp(r, 0.8, 1.28) * adv * mask / mask.sum(), rtol=1e-12, atol=1e-15)
    assert torch.all(g[mask > 0] != 0)
    _, gv, _ = _ours("vanilla", old, lp, adv, mask)
    assert torch.any((gv == 0) & (mask > 0))  # the PPO clip did zero some of them


def test_cispo_accepts_an_unbounded_lower_clip_as_minimax_does():
    """clip_ratio_low >= 1 (verl's CISPO recipe passes 10): the weight is min(r, 1 + eps_high), however small r."""
    old, lp, adv, mask = _inputs(seed=7, spread=2.0)
    _, g, m = _ours("cispo", old, lp, adv, mask, clip_ratio_low=10.0, clip_ratio_high=0.2)
    r = torch.exp(lp - old)
    torch.testing.assert_close(g, -torch.clamp(r, max=1.2) * adv * mask / mask.sum(), rtol=1e-12, atol=1e-15)
    ref = eq.policy_metrics("cispo", old, lp, adv, mask, eps_low=10.0, eps_high=0.2)
    assert m["pg_clipfrac"] == pytest.approx(ref["pg_clipfrac"]) and m["pg_clipfrac"] > 0
    for mode in ("vanilla", "up_grpo", "gspo", "up_gspo", "topr"):  # a ratio bound 1 - eps_low <= 0 makes no sense
        with pytest.raises(ValueError, match="clip_ratio_low"):
            compute_policy_loss(old, lp, adv, mask, loss_mode=mode, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        compute_policy_loss(old, lp, adv, mask, loss_mode="cispo", clip_ratio_low=-0.1)


# --- per-token weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_token_weights_multiply_the_per_token_loss_before_aggregation(mode, agg):
    old, lp, adv, mask = _inputs(seed=8, spread=0.3 if "gspo" in mode else 1.0)
    u = torch.rand(lp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    u[1, :2] = 0.0
    loss, grad, m = _ours(mode, old, lp, adv, mask, agg, weights=u)
    ref_loss, ref_grad = eq.value_and_grad(mode, old, lp, adv, mask, agg=agg, weights=u, **EPS)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    _, _, m0 = _ours(mode, old, lp, adv, mask, agg)
    assert m == m0  # the metrics describe the unweighted loss


@pytest.mark.parametrize("mode", MODES)
def test_no_token_weights_is_bit_identical_and_unit_weights_change_nothing(mode):
    old, lp, adv, mask = _inputs(seed=9)
    x = lp.clone().requires_grad_()
    loss, m, mat = compute_policy_loss(old, x, adv, mask, loss_mode=mode, return_loss_mat=True, **CLIP)
    loss.backward()
    for w in (None, torch.ones_like(lp)):
        y = lp.clone().requires_grad_()
        loss_w, m_w, mat_w = compute_policy_loss(old, y, adv, mask, loss_mode=mode, return_loss_mat=True,
                                                 token_weights=w, **CLIP)
        loss_w.backward()
        assert torch.equal(loss, loss_w) and torch.equal(x.grad, y.grad) and m == m_w
        assert torch.equal(mat.nan_to_num(), mat_w.nan_to_num())


def test_token_weights_are_checked():
    old, lp, adv, mask = _inputs()
    for bad, match in ((torch.ones(2, 2, dtype=torch.float64), "token_weights: shape"),
                       (torch.ones_like(lp, dtype=torch.long), "floating-point"),
                       (torch.ones_like(lp).requires_grad_(), "grad")):
        with pytest.raises(ValueError, match=match):
            compute_policy_loss(old, lp, adv, mask, token_weights=bad, **CLIP)


# --- registry ------------------------------------------------------------------------------------------------------
def test_registering_a_name_twice_raises_and_keeps_the_first():
    builtin = POLICY_LOSSES["vanilla"]
    with pytest.raises(ValueError, match="'vanilla'"):
        @register_policy_loss("vanilla")
        def impostor(*args, **kwargs):
            raise AssertionError

    assert POLICY_LOSSES["vanilla"] is builtin
    assert set(MODES) <= set(POLICY_LOSSES)
