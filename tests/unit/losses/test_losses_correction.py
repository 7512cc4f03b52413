"""Train-inference correction arms against oracles written from their definitions (tests/unit/losses/loss_equations.py):
weights, masked-fraction metrics, the dispatcher, and the weights inside compute_policy_loss."""
import math

import pytest
import torch

from tests.unit.losses import loss_equations as eq
from upgrpo_megatron.losses import (
    CORRECTIONS,
    apply_correction,
    compute_policy_loss,
    icepop_weights,
    mismatched_layers,
    routing_mask_weights,
    seq_mask_is_weights,
    tis_weights,
)


def _log_probs(b=6, t=8, seed=0, spread=0.8, pad=float("-inf")):
    """trainer / rollout log-probs whose ratio w = e^{N(0, spread)} crosses every band; padding holds `pad` in
    both tensors (and one fully padded row)."""
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    trainer = rollout + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[-1] = False
    trainer = torch.where(mask, trainer, torch.tensor(pad, dtype=torch.float64))
    rollout = torch.where(mask, rollout, torch.tensor(pad, dtype=torch.float64))
    return trainer, rollout, mask


def _assert_metrics(ours, ref):
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        assert isinstance(ours[k], float) and ours[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


# --- the log-prob arms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", [float("-inf"), float("nan"), 0.0])
@pytest.mark.parametrize("cap", [2.0, 1.2])
def test_tis_truncates_the_ratio_at_the_cap(pad, cap):
    tr, ro, mask = _log_probs(pad=pad)
    u, m = tis_weights(tr, ro, mask, cap=cap)
    ref_u, ref_m = eq.tis(tr, ro, mask, cap=cap)
    torch.testing.assert_close(u, ref_u, rtol=1e-12, atol=0)
    _assert_metrics(m, ref_m)
    assert 0 < m["tis/truncated_frac"] < 1


@pytest.mark.parametrize("band", [(0.5, 5.0), (0.8, 1.25)])
@pytest.mark.parametrize("scale_by_ratio", [True, False])
def test_icepop_keeps_the_ratio_inside_the_band_and_zeroes_the_rest(band, scale_by_ratio):
    tr, ro, mask = _log_probs(seed=1, spread=1.0)
    u, m = icepop_weights(tr, ro, mask, low=band[0], high=band[1], scale_by_ratio=scale_by_ratio)
    ref_u, ref_m = eq.icepop(tr, ro, mask, low=band[0], high=band[1], scale_by_ratio=scale_by_ratio)
    torch.testing.assert_close(u, ref_u, rtol=1e-12, atol=0)
    _assert_metrics(m, ref_m)
    assert m["icepop/masked_low_frac"] > 0 and m["icepop/masked_high_frac"] > 0


def test_icepop_defaults_are_the_papers_band():
    """w = 0.49 and 5.1 are dropped, 0.51 and 4.9 kept with their ratio as weight (M(k) = k inside [0.5, 5])."""
    w = torch.tensor([[0.49, 0.51, 1.0, 4.9, 5.1]], dtype=torch.float64)
    rollout = torch.full_like(w, -2.0)
    u, m = icepop_weights(rollout + w.log(), rollout, torch.ones_like(w, dtype=torch.bool))
    torch.testing.assert_close(u, torch.tensor([[0.0, 0.51, 1.0, 4.9, 0.0]], dtype=torch.float64))
    assert m["icepop/masked_frac"] == pytest.approx(2 / 5) and m["icepop/masked_low_frac"] == pytest.approx(1 / 5)


@pytest.mark.parametrize("band", [(0.999, 1.001), (0.9, 1.1)])
def test_seq_mask_is_masks_whole_sequences_by_their_geometric_mean_ratio(band):
    tr, ro, mask = _log_probs(seed=2, spread=0.5)
    # two rows with a tiny mean drift, so that the default band keeps some sequences
    tr[0] = torch.where(mask[0], ro[0] + 0.0004 * torch.tensor([1.0, -1.0] * 4, dtype=torch.float64), tr[0])
    tr[1] = torch.where(mask[1], ro[1] + 0.002, tr[1])  # e^0.002 > 1.001: masked by the default band
    u, m = seq_mask_is_weights(tr, ro, mask, low=band[0], high=band[1])
    ref_u, ref_m = eq.seq_mask_is(tr, ro, mask, low=band[0], high=band[1])
    torch.testing.assert_close(u, ref_u, rtol=0, atol=0)
    _assert_metrics(m, ref_m)
    assert 0 < m["seq_mask_is/masked_seq_frac"] < 1
    assert torch.all(u[-1] == 0)  # the fully padded row: no weight, and not counted as a sequence


def test_seq_mask_is_defaults_are_verls_geometric_band():
    rollout = torch.full((3, 4), -1.0, dtype=torch.float64)
    log_w = torch.tensor([[0.0009, -0.0009, 0.0005, 0.0003],   # mean 0.0002: kept
                          [0.0020, 0.0010, 0.0005, 0.0001],    # mean 0.0009: kept (e^0.0009 < 1.001)
                          [0.0030, 0.0010, 0.0005, 0.0001]],   # mean 0.0011: e^0.0011 > 1.001, masked
                         dtype=torch.float64)
    u, m = seq_mask_is_weights(rollout + log_w, rollout, torch.ones_like(rollout, dtype=torch.bool))
    assert u.tolist() == [[1.0] * 4, [1.0] * 4, [0.0] * 4]
    assert m["seq_mask_is/masked_seq_frac"] == pytest.approx(1 / 3) and m["seq_mask_is/masked_token_frac"] == \
        pytest.approx(4 / 12)


# --- routing mask --------------------------------------------------------------------------------------------------
def _routing(b=5, t=6, layers=4, k=2, experts=8, seed=0):
    """Engine routing = trainer routing with the top-k order shuffled (the same sets), then some layers changed
    and some tokens not captured (-1) on one side."""
    g = torch.Generator().manual_seed(seed)
    train = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(b * t * layers)]).view(b, t, layers, k)
    rollout = train.flip(-1).clone()  # same sets, other order
    change = torch.rand(b, t, layers, generator=g) < 0.3
    other = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(b * t * layers)]).view(b, t, layers, k)
    rollout = torch.where(change.unsqueeze(-1), other, rollout)
    rollout[0, :2] = -1  # not captured by the engine
    train[1, 0, 0] = -1  # one layer not captured by the trainer
    mask = torch.rand(b, t, generator=g) > 0.2
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    adv[2] = 0.0
    return train, rollout, mask, adv


@pytest.mark.parametrize("min_layers", [1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("only_negative", [False, True])
def test_routing_mask_matches_its_definition(min_layers, alpha, only_negative):
    for seed in range(3):
        train, rollout, mask, adv = _routing(seed=seed)
        u, m = routing_mask_weights(train, rollout, mask, min_layers=min_layers, alpha=alpha,
                                    only_negative=only_negative, advantages=adv)
        ref_u, ref_m = eq.routing_mask(train, rollout, mask, min_layers=min_layers, alpha=alpha,
                                       only_negative=only_negative, advantages=adv)
        torch.testing.assert_close(u.double(), ref_u, rtol=0, atol=0)
        _assert_metrics(m, ref_m)
        if not only_negative:  # without advantages: the overall fraction only
            u2, m2 = routing_mask_weights(train, rollout, mask, min_layers=min_layers, alpha=alpha)
            assert torch.equal(u, u2) and m2 == {"routing_mask/masked_frac": m["routing_mask/masked_frac"]}


def test_routing_mask_compares_sets_and_never_masks_uncaptured_tokens():
    train = torch.tensor([[[[1, 2], [3, 4]], [[1, 2], [3, 4]], [[1, 2], [3, 4]], [[1, 2], [3, 4]]]])  # [1, 4, 2, 2]
    rollout = torch.tensor([[[[2, 1], [4, 3]],      # same sets, other order: kept
                             [[1, 5], [3, 4]],      # one layer differs: hit
                             [[-1, -1], [-1, -1]],  # not captured: never masked
                             [[1, 5], [-1, -1]]]])  # differs in layer 0; layer 1 not captured: 1 differing layer
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert mismatched_layers(train, rollout).tolist() == [[0, 1, 0, 1]]
    u, m = routing_mask_weights(train, rollout, mask)
    assert u.tolist() == [[1.0, 0.0, 1.0, 0.0]] and m["routing_mask/masked_frac"] == 0.5
    u2, _ = routing_mask_weights(train, rollout, mask, min_layers=2)
    assert u2.tolist() == [[1.0] * 4]
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    u3, m3 = routing_mask_weights(train, rollout, mask, alpha=0.5, only_negative=True, advantages=adv)
    assert u3.tolist() == [[1.0, 1.0, 1.0, 0.5]]
    assert m3 == {"routing_mask/masked_frac": 0.25, "routing_mask/masked_pos_frac": 0.0,
                  "routing_mask/masked_neg_frac": 0.5}


# --- common contract -----------------------------------------------------------------------------------------------
def test_weights_are_detached_zero_on_padding_and_at_least_float32():
    tr, ro, mask = _log_probs(seed=3)
    tr, ro = tr.float().requires_grad_(), ro.float()  # NaN-free padding: -inf in both
    for name in ("tis", "icepop", "seq_mask_is"):
        u, _ = apply_correction(name, mask, trainer_log_prob=tr, rollout_log_prob=ro)
        assert not u.requires_grad and u.dtype == torch.float32 and torch.all(u[~mask] == 0), name
        assert torch.all(torch.isfinite(u))
        ub, _ = apply_correction(name, mask, trainer_log_prob=tr.detach().bfloat16(), rollout_log_prob=ro.bfloat16())
        assert ub.dtype == torch.float32
    train, rollout, rmask, _ = _routing()
    u, _ = apply_correction("routing_mask", rmask, train_routing=train, rollout_routing=rollout)
    assert u.dtype == torch.float32 and torch.all(u[~rmask] == 0)


def test_the_dispatcher_runs_each_arm_with_its_options():
    assert CORRECTIONS == ("none", "tis", "icepop", "seq_mask_is", "routing_mask")
    tr, ro, mask = _log_probs(seed=4)
    for name, fn, opts in (("tis", tis_weights, {"cap": 1.5}), ("icepop", icepop_weights, {"low": 0.6, "high": 2.0}),
                           ("seq_mask_is", seq_mask_is_weights, {"low": 0.8, "high": 1.2})):
        u, m = apply_correction(name, mask, trainer_log_prob=tr, rollout_log_prob=ro, **opts)
        u_ref, m_ref = fn(tr, ro, mask, **opts)
        assert torch.equal(u, u_ref) and m == m_ref
    train, rollout, rmask, adv = _routing()
    u, m = apply_correction("routing_mask", rmask, train_routing=train, rollout_routing=rollout, advantages=adv,
                            min_layers=2)
    u_ref, m_ref = routing_mask_weights(train, rollout, rmask, advantages=adv, min_layers=2)
    assert torch.equal(u, u_ref) and m == m_ref
    assert apply_correction("none", mask) == (None, {})


def test_bad_arms_and_options_are_named():
    tr, ro, mask = _log_probs()
    train, rollout, rmask, _ = _routing()
    lp = {"trainer_log_prob": tr, "rollout_log_prob": ro}
    cases = [
        (lambda: apply_correction("tis2", mask, **lp), "tis2"),
        (lambda: apply_correction("tis", mask), "trainer_log_prob"),
        (lambda: apply_correction("routing_mask", rmask), "train_routing"),
        (lambda: apply_correction("none", mask, cap=2.0), "none"),
        (lambda: tis_weights(tr, ro[:, :3], mask), "rollout_log_prob"),
        (lambda: tis_weights(tr, ro, mask, cap=0.0), "cap"),
        (lambda: icepop_weights(tr, ro, mask, low=2.0, high=5.0), "icepop"),
        (lambda: seq_mask_is_weights(tr, ro, mask[:, :2]), "response_mask"),
        (lambda: routing_mask_weights(train, rollout, rmask, alpha=1.5), "alpha"),
        (lambda: routing_mask_weights(train, rollout, rmask, min_layers=0), "min_layers"),
        (lambda: routing_mask_weights(train, rollout, rmask, only_negative=True), "advantages"),
        (lambda: routing_mask_weights(train.float(), rollout, rmask), "train_routing"),
        (lambda: routing_mask_weights(train, rollout[..., :1], rmask), "rollout_routing"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


# --- inside the loss -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arm", ["tis", "icepop", "seq_mask_is", "routing_mask"])
@pytest.mark.parametrize("mode", ["vanilla", "up_grpo", "topr", "cispo"])
def test_correction_weights_scale_each_tokens_loss_and_gradient(arm, mode):
    tr, ro, mask = _log_probs(seed=5, spread=0.6, pad=0.0)
    old = tr + 0.3 * torch.randn(tr.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adv = torch.randn(tr.shape[0], 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64).expand_as(tr)
    if arm == "routing_mask":
        train, rollout, _, _ = _routing(b=tr.shape[0], t=tr.shape[1], seed=3)
        u, _ = apply_correction(arm, mask, train_routing=train, rollout_routing=rollout, advantages=adv, alpha=0.5,
                                only_negative=True)
        u = u.double()
    else:
        opts = {"low": 0.8, "high": 1.1} if arm == "seq_mask_is" else {}  # keeps 1 of 5 sequences
        u, _ = apply_correction(arm, mask, trainer_log_prob=old, rollout_log_prob=ro, **opts)
    assert torch.any((u != 1) & mask) and torch.any((u != 0) & mask)  # the arm changed some weights, not all
    x = tr.clone().requires_grad_()
    loss, _ = compute_policy_loss(old, x, adv.contiguous(), mask, loss_mode=mode, token_weights=u)
    loss.backward()
    ref_loss, ref_grad = eq.value_and_grad(mode, old, tr, adv, mask.double(), weights=u)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-12, atol=1e-13)
    # a zero weight keeps the token in the token-mean denominator (verl's IS-weight semantics)
    mat = compute_policy_loss(old, tr, adv.contiguous(), mask, loss_mode=mode, token_weights=u,
                              return_loss_mat=True)[2]
    assert loss.item() == pytest.approx(float((mat * mask).nansum() / mask.sum()), rel=1e-12)
    assert math.isfinite(loss.item())
