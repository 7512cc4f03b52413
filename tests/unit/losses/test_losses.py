"""UP-GRPO and the baselines: the UP-GRPO post's gradient identities, agreement between modes, aggregation,
gradient accumulation, GSPO, bad input. All float64 unless a test says otherwise. The oracles written from each
mode's equation are in test_losses_equations.py."""
import pytest
import torch

from upgrpo_megatron.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    agg_loss,
    compute_policy_loss,
    gspo_token_log_ratio,
    policy_loss_per_token,
    register_policy_loss,
)

CLIP = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
MODES = ("vanilla", "up_grpo", "gspo", "up_gspo", "topr", "cispo")


def _inputs(b=4, t=7, seed=0, dtype=torch.float64, adv=None, spread=0.4):
    """Random rollout-like tensors: per-sequence advantages of both signs, ratios around 1 (some clipped), a
    ragged mask with at least one token per row."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    lp = (old + spread * torch.randn(b, t, generator=g, dtype=dtype)).clamp(max=0)
    a = torch.randn(b, 1, generator=g, dtype=dtype).expand(b, t).clone() if adv is None else adv
    mask = (torch.rand(b, t, generator=g) > 0.3).to(dtype)
    mask[:, 0] = 1  # every row has a valid token
    return old, lp, a, mask


def _grad(fn, lp):
    lp = lp.clone().requires_grad_()
    fn(lp).backward()
    return lp.grad


def _loss(mode, agg="token-mean", **kw):
    return lambda old, x, adv, mask: compute_policy_loss(old, x, adv, mask, loss_mode=mode, loss_agg_mode=agg,
                                                         **{**CLIP, **kw})[0]


# --- the post's identities -------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", AGG_MODES)
def test_positive_branch_gradient_equals_aw_sft_for_any_old_log_prob(agg):
    old, lp, _, mask = _inputs()
    adv = torch.rand_like(lp) + 0.1  # all A > 0
    ref = _grad(lambda x: agg_loss(-adv * x, mask, agg), lp)  # advantage-weighted SFT: -A log pi
    for shift in (-5.0, 0.0, 5.0):  # ratios e^{+-5}: far outside any clip range, the gradient must not care
        g = _grad(lambda x, shift=shift: _loss("up_grpo", agg)(old + shift, x, adv, mask), lp)
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-12)
    # token-mean: the gradient is exactly -A / (number of valid tokens) on valid tokens, 0 elsewhere
    g = _grad(lambda x: _loss("up_grpo")(old - 5.0, x, adv, mask), lp)
    torch.testing.assert_close(g, -adv * mask / mask.sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_non_positive_advantages_are_bit_identical_to_vanilla(agg):
    old, lp, _, mask = _inputs(seed=3, spread=1.5)  # wide ratios: low clip and dual clip both fire
    adv = -torch.rand_like(lp)
    adv[0, :3] = 0.0
    lv, mv = compute_policy_loss(old, lp, adv, mask, loss_mode="vanilla", loss_agg_mode=agg, **CLIP)
    lu, mu = compute_policy_loss(old, lp, adv, mask, loss_mode="up_grpo", loss_agg_mode=agg, **CLIP)
    assert torch.equal(lv, lu)
    gv = _grad(lambda x: _loss("vanilla", agg)(old, x, adv, mask), lp)
    gu = _grad(lambda x: _loss("up_grpo", agg)(old, x, adv, mask), lp)
    assert torch.equal(gv, gu)
    for k in mv:  # every metric vanilla reports (clip fractions, ppo_kl, ratio summaries) is the same
        assert mv[k] == mu[k], k
    assert mv["pg_clipfrac"] > 0 and mv["pg_clipfrac_lower"] > 0  # the comparison exercised both clips


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_zero_advantage_and_masked_tokens_get_zero_gradient(mode, agg):
    old, lp, adv, mask = _inputs(seed=5)
    adv[1] = 0.0
    g = _grad(lambda x: _loss(mode, agg)(old, x, adv, mask), lp)
    assert torch.all(g[1] == 0)
    assert torch.all(g[mask == 0] == 0)
    assert g[mask.bool() & (adv != 0)].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_log_probs_under_the_mask_do_not_leak(mode):
    """Padding may hold -inf log-probs (and advantage 0): the loss and the gradient must stay finite."""
    old, lp, adv, mask = _inputs(seed=6)
    lp = torch.where(mask.bool(), lp, torch.tensor(float("-inf"), dtype=lp.dtype))
    adv = adv * mask
    x = lp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(old, x, adv, mask, loss_mode=mode, **CLIP)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    assert all(v == v for v in metrics.values())  # no NaN metric


# --- metrics ------------------------------------------------------------------------------------------------------
def test_up_metrics_count_positive_tokens_and_those_the_baseline_would_clip():
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.5, 1.0, 1.1, 2.0]], dtype=torch.float64))  # ratios 1.5, 1.0, 1.1, 2.0
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    _, m = compute_policy_loss(old, lp, adv, mask, loss_mode="up_grpo", **CLIP)
    assert m["up/pos_token_frac"] == pytest.approx(3 / 4)
    assert m["up/pos_ratio_above_clip_frac"] == pytest.approx(1 / 3)  # only 1.5 > 1.28 among positives
    assert m["pos/ratio_above_clip_frac"] == m["up/pos_ratio_above_clip_frac"]
    assert m["pg_clipfrac"] == 0.0  # the one negative token has r = 2 in (0.8, 3): unclipped
    # up_gspo's baseline clips the *sequence* ratio: exp(mean log r over the 3 valid tokens) = (1.5*1*1.1)^(1/3)
    mask3 = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    _, mg = compute_policy_loss(old, lp, adv, mask3, loss_mode="up_gspo", **CLIP)
    assert (1.5 * 1.1) ** (1 / 3) < 1.28 and mg["up/pos_ratio_above_clip_frac"] == 0.0
    assert mg["up/pos_token_frac"] == pytest.approx(1.0)


def test_clip_fractions_count_each_clip():
    """Hand-made ratios, one per clip region; every mode divides pg_clipfrac and pg_clipfrac_lower by all valid
    tokens, and neg/pg_clipfrac by the A <= 0 tokens."""
    r = torch.tensor([[0.5, 1.0, 4.0, 1.5, 0.9, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, -1.0, -1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    old, mask = torch.zeros_like(r), torch.ones_like(r)
    _, mv = compute_policy_loss(old, r.log(), adv, mask, loss_mode="vanilla", **CLIP)
    # clipped: A<0 & r<0.8 (0.5), A>0 & r>1.28 (1.5) -> 2 of 6; dual clip: A<0 & r>3 (4.0) -> 1 of 6
    assert mv["pg_clipfrac"] == pytest.approx(2 / 6) and mv["pg_clipfrac_lower"] == pytest.approx(1 / 6)
    assert mv["neg/pg_clipfrac"] == pytest.approx(1 / 4)  # 0.5 among the A <= 0 tokens 0.5, 1.0, 4.0, 1.0
    # up_grpo does not clip the positive 1.5: 1 of 6 (it used to report 1/4, dividing by the A <= 0 tokens only)
    _, mu = compute_policy_loss(old, r.log(), adv, mask, loss_mode="up_grpo", **CLIP)
    assert mu["pg_clipfrac"] == pytest.approx(1 / 6) and mu["pg_clipfrac_lower"] == pytest.approx(1 / 6)
    assert mu["neg/pg_clipfrac"] == pytest.approx(1 / 4)
    assert mu["ppo_kl"] == pytest.approx(float(-r.log().mean()))


# --- aggregation and gradient accumulation ------------------------------------------------------------------------
def _direct_agg(loss_mat, mask, mode, L):
    """Every mode written as explicit loops over sequences and tokens (fully masked rows do not count)."""
    total, n_tok, n_seq = 0.0, 0, 0
    rows = []
    for i in range(loss_mat.shape[0]):
        toks = [loss_mat[i, t] for t in range(loss_mat.shape[1]) if mask[i, t] > 0]
        n_tok += len(toks)
        if toks:
            n_seq += 1
            rows.append((sum(toks), len(toks)))
        total = total + sum(toks)
    if mode == "token-mean":
        return total / n_tok
    if mode == "seq-mean-token-sum":
        return sum(s for s, _ in rows) / n_seq
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in rows) / n_seq
    return total / L


@pytest.mark.parametrize("agg", AGG_MODES)
def test_every_aggregation_mode_matches_its_direct_formula(agg):
    g = torch.Generator().manual_seed(2)
    loss_mat = torch.randn(5, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 6, generator=g) > 0.4).double()
    mask[2] = 0  # a fully masked row (a data-parallel padding row)
    mask[3] = 0
    mask[3, 4] = 1  # a row with one token
    torch.testing.assert_close(agg_loss(loss_mat, mask, agg), _direct_agg(loss_mat, mask, agg, 6) * torch.ones((),
                               dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(agg_loss(loss_mat, mask.bool(), agg, max_response_length=16),
                               _direct_agg(loss_mat, mask, agg, 16) * torch.ones((), dtype=torch.float64))
    # an empty batch gives 0, never NaN
    assert float(agg_loss(loss_mat, torch.zeros_like(mask), agg)) == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batches_with_global_normaliser_equal_one_big_batch(mode, agg):
    """Uneven micro-batches (as DP ranks and gradient accumulation see them), each trimmed to its own padded width:
    summing their losses with the big batch's normalisers gives the big batch's loss and gradient."""
    old, lp, adv, mask = _inputs(b=7, t=6, seed=11)
    mask[5] = 0  # a padding row
    mask[6, 3:] = 0
    L = 6
    big = lambda x: _loss(mode, agg)(old, x, adv, mask)  # noqa: E731
    norm = dict(global_token_count=float(mask.sum()), global_seq_count=float((mask.sum(-1) > 0).sum()),
                max_response_length=L)

    def accumulated(x):
        total = 0
        for rows, width in ((slice(0, 1), 6), (slice(1, 4), 6), (slice(4, 5), 6), (slice(5, 7), 3)):
            total = total + compute_policy_loss(old[rows, :width], x[rows, :width], adv[rows, :width],
                                                mask[rows, :width], loss_mode=mode, loss_agg_mode=agg, **norm,
                                                **CLIP)[0]
        return total

    torch.testing.assert_close(accumulated(lp), big(lp), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(accumulated, lp), _grad(big, lp), rtol=1e-12, atol=1e-12)


def test_per_token_loss_is_what_compute_policy_loss_aggregates():
    old, lp, adv, mask = _inputs(seed=4)
    for mode in MODES:
        mat, metrics = policy_loss_per_token(old, lp, adv, mask, loss_mode=mode, **CLIP)
        loss, metrics2 = compute_policy_loss(old, lp, adv, mask, loss_mode=mode, **CLIP)
        assert mat.shape == lp.shape and metrics == metrics2
        torch.testing.assert_close(agg_loss(mat, mask), loss, rtol=0, atol=0)
        _, _, mat2 = compute_policy_loss(old, lp, adv, mask, loss_mode=mode, return_loss_mat=True, **CLIP)
        assert torch.equal(mat, mat2)


# --- GSPO ---------------------------------------------------------------------------------------------------------
def test_gspo_ratio_is_the_length_normalised_sequence_ratio():
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.tensor([[0.3, -0.1, 0.1], [0.05, 0.05, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    s = torch.exp(torch.tensor([0.1, 0.05], dtype=torch.float64))  # exp(mean log-ratio over valid tokens)
    torch.testing.assert_close(torch.exp(gspo_token_log_ratio(old, lp, mask)), s[:, None].expand(2, 3))
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=torch.float64)
    mat, _ = policy_loss_per_token(old, lp, adv, mask, loss_mode="gspo", **CLIP)
    torch.testing.assert_close(mat[0], -s[0].expand(3))  # inside the clip range: -A s
    torch.testing.assert_close(mat[1, :2], s[1].expand(2))


def test_gspo_token_gradient_has_the_papers_form():
    """GSPO paper: grad J = (1/G) sum_i s_i A_i (1/|y_i|) sum_t grad log pi(y_it) for unclipped sequences, i.e.
    d loss / d log pi_it = -s_i A_i / (G |y_i|) with seq-mean-token-mean aggregation."""
    old, lp, _, mask = _inputs(b=5, t=6, seed=8, spread=0.05)  # small drift: every sequence ratio is unclipped
    adv = torch.randn(5, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64).expand(5, 6)
    s = torch.exp(((lp - old) * mask).sum(-1) / mask.sum(-1))
    assert torch.all((s > 0.8) & (s < 1.28))
    g = _grad(lambda x: _loss("gspo", "seq-mean-token-mean")(old, x, adv, mask), lp)
    expected = -(s[:, None] * adv) / (5 * mask.sum(-1, keepdim=True)) * mask
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14)


def test_gspo_with_equal_token_log_ratios_reduces_to_vanilla_clipping_of_the_sequence_ratio():
    """If every token of a sequence has the same log-ratio c_i, the GSPO ratio is e^{c_i} = r_it for each token, so
    GSPO equals the token-level PPO clip (without dual clip): same values and same gradients."""
    b, t = 6, 5
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    c = torch.tensor([-0.6, -0.1, 0.0, 0.1, 0.2, 0.7], dtype=torch.float64)  # below, inside and above the range
    lp = old + c[:, None]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -2.0], dtype=torch.float64)[:, None].expand(b, t).clone()
    mask = torch.ones(b, t, dtype=torch.float64)
    mask[1, 3:] = 0
    no_dual = dict(CLIP, clip_ratio_c=1e9)  # GSPO has no dual clip
    for agg in AGG_MODES:
        gs = lambda x, agg=agg: _loss("gspo", agg)(old, x, adv, mask)  # noqa: E731
        va = lambda x, agg=agg: _loss("vanilla", agg, **no_dual)(old, x, adv, mask)  # noqa: E731
        torch.testing.assert_close(gs(lp), va(lp), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(_grad(gs, lp), _grad(va, lp), rtol=1e-12, atol=1e-12)


def test_up_gspo_positive_branch_is_aw_sft_and_negative_branch_is_gspo():
    old, lp, _, mask = _inputs(seed=9)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)[:, None].expand_as(lp).clone()
    mat, _ = policy_loss_per_token(old, lp, adv, mask, loss_mode="up_gspo", **CLIP)
    gmat, _ = policy_loss_per_token(old, lp, adv, mask, loss_mode="gspo", **CLIP)
    pos = adv > 0
    torch.testing.assert_close(mat[pos], (-adv * lp)[pos])
    torch.testing.assert_close(mat[~pos], gmat[~pos])


# --- registry, dtypes, bad input ----------------------------------------------------------------------------------
def test_a_new_loss_is_one_function_and_one_decorator():
    @register_policy_loss("test_reinforce")
    def reinforce(old_log_prob, log_prob, advantages, mask, **clip):
        return -advantages * log_prob, {"ppo_kl": (-((log_prob - old_log_prob).detach() * mask).sum(), mask.sum())}

    try:
        old, lp, adv, mask = _inputs()
        loss, m = compute_policy_loss(old, lp, adv, mask, loss_mode="test_reinforce", **CLIP)
        torch.testing.assert_close(loss, agg_loss(-adv * lp, mask))
        assert set(m) == {"ppo_kl"}
    finally:
        POLICY_LOSSES.pop("test_reinforce")


@pytest.mark.parametrize("mode", MODES)
def test_bf16_inputs_give_bf16_gradients_close_to_fp64(mode):
    old, lp, adv, mask = _inputs(b=8, t=32, seed=12)
    ref_loss = _loss(mode)(old, lp, adv, mask)
    ref_grad = _grad(lambda x: _loss(mode)(old, x, adv, mask), lp)
    b = [x.to(torch.bfloat16) for x in (old, lp, adv, mask)]
    x = b[1].clone().requires_grad_()
    loss = _loss(mode)(b[0], x, b[2], b[3])
    loss.backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=2e-2, atol=1e-4)


def test_bad_input_names_the_argument():
    old, lp, adv, mask = _inputs()
    cases = [
        (dict(advantages=adv[:, :3]), "advantages"),
        (dict(old_log_prob=old[:2]), "old_log_prob"),
        (dict(response_mask=mask[:, :2]), "response_mask"),
        (dict(log_prob=lp[0], old_log_prob=old[0], advantages=adv[0], response_mask=mask[0]), "log_prob"),
        (dict(loss_mode="ppo2"), "loss_mode"),
        (dict(loss_agg_mode="mean"), "loss_agg_mode"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(clip_ratio_low=1.0), "clip_ratio_low"),
        (dict(clip_ratio_high=-0.1), "clip_ratio_high"),
        (dict(global_token_count=-1.0), "global_token_count"),
        (dict(max_response_length=0, loss_agg_mode="seq-mean-token-sum-norm"), "max_response_length"),
    ]
    for override, name in cases:
        kw = dict(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask)
        kw.update(override)
        tensors = [kw.pop(k) for k in ("old_log_prob", "log_prob", "advantages", "response_mask")]
        with pytest.raises(ValueError, match=name):
            compute_policy_loss(*tensors, **{"loss_mode": "up_grpo", **kw})
    with pytest.raises(ValueError, match="loss_mask"):
        agg_loss(lp, mask[:, :2])
