"""Hand-computed checks of every routing / ratio / probability-gap statistic.

One tiny batch is used throughout: 1 sequence, response_len 4 (the last token is padding), 2 MoE layers,
top-2 of 4 experts. Expected values are worked out by hand in the comments, never by the code under test.
"""

import math

import pytest
import torch

from upgrpo_megatron.diagnostics import (
    CaptureValidityError,
    check_capture_validity,
    compute_expert_load,
    compute_prob_gap,
    compute_ratio_stats,
    compute_routing_mismatch,
    log_ratio_histogram,
    require_valid_capture,
)

E = 4
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # token 3 is padding
# trainer routing (side a): [token][layer] = top-2 ids, slot 0 = top-1
TRAIN = torch.tensor([[[[0, 1], [2, 3]],
                       [[1, 0], [2, 0]],
                       [[0, 1], [3, 2]],
                       [[3, 2], [1, 0]]]])  # padding token holds ids: must be ignored
# rollout routing (side b)
ROLL = torch.tensor([[[[0, 1], [3, 2]],     # t0: l0 same (top-1 same), l1 same set, top-1 2 vs 3 differs
                      [[0, 2], [2, 0]],     # t1: l0 {0,1} vs {0,2} differs, l1 same
                      [[1, 2], [2, 1]],     # t2: l0 {0,1} vs {1,2} differs, l1 {3,2} vs {2,1} differs
                      [[-1, -1], [-1, -1]]]])
# mismatched (token, layer) pairs: (t1,l0), (t2,l0), (t2,l1)


def approx(x, rel=1e-6, abs=1e-9):
    return pytest.approx(x, rel=rel, abs=abs)


def test_mismatch_scalars_count_set_differences_over_real_pairs_only():
    mm = compute_routing_mismatch(TRAIN, ROLL, MASK, E)
    s = mm.scalars
    # 3 real tokens x 2 layers = 6 compared pairs, 3 mismatched
    assert s["pair_frac"] == approx(3 / 6)
    # Jaccard: t0l0 1, t0l1 1, t1l0 |{0}|/|{0,1,2}| = 1/3, t1l1 1, t2l0 1/3, t2l1 |{2}|/|{1,2,3}| = 1/3
    #   -> 3 ones + 3 thirds = 4, over 6 pairs
    assert s["jaccard"] == approx(4 / 6)
    # top-1 equal: t0l0 (0,0) yes, t0l1 (2,3) no, t1l0 (1,0) no, t1l1 (2,2) yes, t2l0 (0,1) no, t2l1 (3,2) no
    assert s["top1_agree"] == approx(2 / 6)
    # tokens with >= 1 mismatched layer: t1, t2 of 3
    assert s["token_any_frac"] == approx(2 / 3)
    # mismatched layers per token: (0 + 1 + 2) / 3
    assert s["layers_per_token"] == approx(1.0)
    assert s["invalid_pair_frac"] == approx(0.0)
    assert mm.mismatched.tolist() == [[[False, False], [True, False], [True, True], [False, False]]]


def test_mismatch_per_layer_arrays():
    mm = compute_routing_mismatch(TRAIN, ROLL, MASK, E)
    # layer 0: t1, t2 mismatched of 3; layer 1: t2 of 3
    assert mm.per_layer["pair_frac"].tolist() == approx([2 / 3, 1 / 3])
    # layer 0 Jaccard (1 + 1/3 + 1/3) / 3 = 5/9; layer 1 (1 + 1 + 1/3) / 3 = 7/9
    assert mm.per_layer["jaccard"].tolist() == approx([5 / 9, 7 / 9])
    # top-1 agree: layer 0 only t0; layer 1 only t1
    assert mm.per_layer["top1_agree"].tolist() == approx([1 / 3, 1 / 3])


def test_mismatch_per_expert_counts_and_rates_with_a_never_chosen_expert():
    pe = compute_routing_mismatch(TRAIN, ROLL, MASK, E).per_expert
    # layer 0: a = {0,1},{1,0},{0,1}; b = {0,1},{0,2},{1,2}  (padding t3 = {3,2} must not count)
    assert pe["chosen_a"][0].tolist() == [3, 3, 0, 0]
    assert pe["chosen_b"][0].tolist() == [2, 2, 2, 0]
    assert pe["a_only"][0].tolist() == [1, 1, 0, 0]   # t2 lost 0, t1 lost 1
    assert pe["b_only"][0].tolist() == [0, 0, 2, 0]   # 2 gained at t1 and t2
    # flip rate = (a_only + b_only) / tokens where either chose: e0 1/3, e1 1/3, e2 2/2, e3 never chosen -> 0
    assert pe["flip_rate"][0].tolist() == approx([1 / 3, 1 / 3, 1.0, 0.0])
    assert pe["a_miss_rate"][0].tolist() == approx([1 / 3, 1 / 3, 0.0, 0.0])
    assert pe["b_miss_rate"][0].tolist() == approx([0.0, 0.0, 1.0, 0.0])
    # layer 1: a = {2,3},{2,0},{3,2}; b = {3,2},{2,0},{2,1}: t2 swaps 3 for 1
    assert pe["chosen_a"][1].tolist() == [1, 0, 3, 2]
    assert pe["chosen_b"][1].tolist() == [1, 1, 3, 1]
    # e0: 0/1, e1: b_only 1 / either 1, e2: 0/3, e3: a_only 1 / either 2 (t0, t2)
    assert pe["flip_rate"][1].tolist() == approx([0.0, 1.0, 0.0, 0.5])


def test_flip_margin_is_gap_between_kth_and_next_router_score():
    scores = torch.zeros(1, 4, 2, E)
    scores[0, 0, 0] = torch.tensor([0.4, 0.3, 0.2, 0.1])    # stable: 0.3 - 0.2 = 0.1
    scores[0, 0, 1] = torch.tensor([0.1, 0.1, 0.5, 0.3])    # stable: 0.3 - 0.1 = 0.2
    scores[0, 1, 0] = torch.tensor([0.3, 0.4, 0.25, 0.05])  # flip:   0.3 - 0.25 = 0.05
    scores[0, 1, 1] = torch.tensor([0.3, 0.0, 0.6, 0.1])    # stable: 0.3 - 0.1 = 0.2
    scores[0, 2, 0] = torch.tensor([0.4, 0.3, 0.28, 0.02])  # flip:   0.3 - 0.28 = 0.02
    scores[0, 2, 1] = torch.tensor([0.0, 0.2, 0.3, 0.5])    # flip:   0.3 - 0.2 = 0.1
    scores[0, 3] = 9.0                                      # padding: ignored
    mm = compute_routing_mismatch(TRAIN, ROLL, MASK, E, scores_a=scores)
    assert mm.scalars["flip_margin_mean"] == approx((0.05 + 0.02 + 0.1) / 3, rel=1e-5)
    assert mm.scalars["stable_margin_mean"] == approx((0.1 + 0.2 + 0.2) / 3, rel=1e-5)
    # per layer: layer 0 flips (0.05 + 0.02) / 2, layer 1 flip 0.1
    assert mm.per_layer["flip_margin_mean"].tolist() == approx([0.035, 0.1], rel=1e-5)


def test_missing_rollout_route_is_invalid_not_a_mismatch():
    roll = ROLL.clone()
    roll[0, 0, 1] = -1  # t0 layer 1 not captured
    mm = compute_routing_mismatch(TRAIN, roll, MASK, E)
    # 5 compared pairs remain, still 3 mismatched; 1 of 6 real pairs invalid
    assert mm.scalars["pair_frac"] == approx(3 / 5)
    assert mm.scalars["invalid_pair_frac"] == approx(1 / 6)
    # top-1: of the 5 compared pairs, t0l0 and t1l1 agree
    assert mm.scalars["top1_agree"] == approx(2 / 5)


def test_all_masked_batch_gives_nan_not_a_crash():
    mm = compute_routing_mismatch(TRAIN, ROLL, torch.zeros(1, 4), E)
    assert math.isnan(mm.scalars["pair_frac"]) and math.isnan(mm.scalars["token_any_frac"])
    assert mm.per_expert["chosen_a"].sum() == 0
    gap = compute_prob_gap(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4))
    assert all(math.isnan(v) for v in gap.values())


def test_mismatch_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="experts_b"):
        compute_routing_mismatch(TRAIN, ROLL[:, :3], MASK, E)


# ---------------------------------------------------------------------------------------------- ratios
# r = 2, .5, 1, (masked 100)
LOG_RATIO = torch.tensor([[math.log(2.0), math.log(0.5), 0.0, math.log(100.0)]], dtype=torch.float64)
ADV = torch.tensor([[1.0, -1.0, 1.0, 5.0]])  # t0 A>0, t1 A<0, t2 A>0 (t3 masked)
MISMATCHED = torch.tensor([[[False, False], [True, False], [True, True], [False, False]]])


def _ratio():
    # clip [1 - 0.2, 1 + 0.28] = [0.8, 1.28]: r = 2 and 0.5 are outside, r = 1 inside
    return compute_ratio_stats(LOG_RATIO, TRAIN, MASK, ADV, MISMATCHED, E, 0.2, 0.28)


def test_ratio_buckets_split_by_advantage_sign_and_routing_match():
    st = _ratio()
    # layer 0, expert 0 is in the top-2 of t0 (A>0, l0 matched), t1 (A<=0, mismatched), t2 (A>0, mismatched)
    c = st.count[0, 0]  # [adv (pos, nonpos), match (matched, mismatched)]
    assert c.tolist() == [[1, 1], [0, 1]]
    d = st.reduce()
    assert d["mean"][0, 0].flatten().tolist() == approx([2.0, 1.0, 0.0, 0.5])
    assert d["outside_frac"][0, 0].flatten().tolist() == approx([1.0, 0.0, 0.0, 1.0])
    assert d["max_abs_log"][0, 0].flatten().tolist() == approx([math.log(2), 0.0, 0.0, math.log(2)])
    # expert 3 in layer 0 is chosen by no real token (only by the padding token): all zero
    assert st.count[0, 3].sum() == 0 and d["var"][0, 3].abs().sum() == 0


def test_ratio_pooled_over_groups_per_expert():
    st = _ratio()
    pooled = st.reduce(adv=True, match=True)
    # layer 0 expert 0: r = 2, 0.5, 1 -> mean 3.5/3; E[r^2] = (4 + 0.25 + 1)/3 = 1.75; var = 1.75 - (3.5/3)^2
    assert pooled["count"][0, 0] == 3
    assert pooled["mean"][0, 0] == approx(3.5 / 3)
    assert pooled["var"][0, 0] == approx(1.75 - (3.5 / 3) ** 2)
    assert pooled["outside_frac"][0, 0] == approx(2 / 3)
    # layer 1 expert 3: t0 (r=2) and t2 (r=1): mean 1.5, var (4 + 1)/2 - 2.25 = 0.25, outside 1/2
    assert pooled["mean"][1, 3] == approx(1.5) and pooled["var"][1, 3] == approx(0.25)
    assert pooled["outside_frac"][1, 3] == approx(0.5)
    # layer 1 expert 1: never chosen by a real token
    assert pooled["count"][1, 1] == 0
    # positive branch only (pool over match), layer 0 expert 0: t0 (2) and t2 (1): mean 1.5, var 0.25
    by_adv = st.reduce(match=True)
    assert by_adv["mean"][0, 0, 0] == approx(1.5) and by_adv["var"][0, 0, 0] == approx(0.25)


def test_ratio_token_level_scalars_per_split():
    s = _ratio().metrics("x")
    # all real tokens r = 2, 0.5, 1 (the masked r = 100 must not appear anywhere)
    assert s["x/all/count"] == 3
    assert s["x/all/mean"] == approx(3.5 / 3)
    assert s["x/all/var"] == approx(1.75 - (3.5 / 3) ** 2)
    assert s["x/all/max_abs_log"] == approx(math.log(2))
    assert s["x/all/outside_clip_frac"] == approx(2 / 3)
    # A>0: t0 (2), t2 (1): mean 1.5, var 0.25, outside 1/2; A<=0: t1 (0.5) only
    assert (s["x/adv_pos/mean"], s["x/adv_pos/var"], s["x/adv_pos/outside_clip_frac"]) == (
        approx(1.5), approx(0.25), approx(0.5))
    assert (s["x/adv_nonpos/mean"], s["x/adv_nonpos/var"], s["x/adv_nonpos/count"]) == (approx(0.5), approx(0.0), 1)
    # token mismatched when any layer mismatched: t1, t2 -> r = 0.5, 1: mean 0.75, var 0.625 - 0.5625 = 0.0625
    assert s["x/mismatched/mean"] == approx(0.75) and s["x/mismatched/var"] == approx(0.0625)
    assert s["x/matched/mean"] == approx(2.0) and s["x/matched/count"] == 1
    # largest pooled per-expert variance: experts seeing all three tokens (l0 e0, l0 e1, l1 e2)
    assert s["x/expert_var_max"] == approx(1.75 - (3.5 / 3) ** 2)


def test_log_ratio_histogram_counts_real_tokens_by_group():
    edges = torch.tensor([-1.0, -0.1, 0.1, 1.0], dtype=torch.float64)
    tok_mis = MISMATCHED.any(-1)  # t0 matched, t1 and t2 mismatched
    h = log_ratio_histogram(LOG_RATIO, MASK, ADV, tok_mis, edges)
    assert h.sum() == 3  # padding excluded
    assert h[0, 0].tolist() == [0, 0, 1]  # t0: A>0, matched, log 2 = 0.69 -> last bin
    assert h[1, 1].tolist() == [1, 0, 0]  # t1: A<=0, mismatched, -0.69 -> first bin
    assert h[0, 1].tolist() == [0, 1, 0]  # t2: A>0, mismatched, 0 -> middle bin
    # values beyond the outer edges land in the end bins instead of vanishing
    far = log_ratio_histogram(torch.tensor([[5.0, -5.0]]), torch.ones(1, 2), torch.ones(1, 2),
                              torch.zeros(1, 2, dtype=torch.bool), edges)
    assert far[0, 0].tolist() == [1, 0, 1]


# ------------------------------------------------------------------------------------------- prob gap
def _lp(*ps):
    return torch.tensor([[math.log(p) for p in ps]], dtype=torch.float64)


def test_prob_gap_metrics_by_hand():
    # real tokens: (p_train, p_rollout) = (0.5, 0.25) w=2, (0.1, 0.1) w=1, (0.2, 0.8) w=1/4; t3 masked and wild
    train, roll = _lp(0.5, 0.1, 0.2, 0.9), _lp(0.25, 0.1, 0.8, 1e-6)
    g = compute_prob_gap(train, roll, MASK, taus=(1.5, 3, 5), threshold=0.5)
    assert g["abs_prob_diff_mean"] == approx((0.25 + 0 + 0.6) / 3)
    assert g["abs_prob_diff_max"] == approx(0.6)
    # |d| = log2, 0, log4 -> mean log 2: geometric form exp(log 2) = 2; NeMo-RL mean of exps (2 + 1 + 4)/3
    assert g["exp_mean_abs_log_prob_diff"] == approx(2.0)
    assert g["token_mult_prob_error"] == approx(7 / 3)
    assert g["abs_log_prob_diff_max"] == approx(math.log(4))
    assert g["log_prob_diff_frac_above_threshold"] == approx(2 / 3)  # 0.69 and 1.39 > 0.5
    # k1 KL(rollout||train) = mean(-d) = (-log2 + 0 + log4)/3 = log2/3
    assert g["kl_k1"] == approx(math.log(2) / 3)
    # k3 w - 1 - d: (2 - 1 - log2) + 0 + (0.25 - 1 + log4)
    assert g["kl_k3_rollout_train"] == approx(((1 - math.log(2)) + (-0.75 + math.log(4))) / 3)
    # 1/w - 1 + d: (0.5 - 1 + log2) + 0 + (4 - 1 - log4)
    assert g["kl_k3_train_rollout"] == approx(((-0.5 + math.log(2)) + (3 - math.log(4))) / 3)
    # JS: t0 m = 0.375, ratios 4/3 and 2/3; t2 m = 0.5, ratios 0.4 and 1.6; k3(x) = x - 1 - log x
    k3 = lambda x: x - 1 - math.log(x)  # noqa: E731
    js = (0.5 * (k3(4 / 3) + k3(2 / 3)) + 0.5 * (k3(0.4) + k3(1.6))) / 3  # = (0.0588915 + 0.2231435) / 3
    assert g["js_divergence"] == approx(js)
    assert g["js_divergence"] == approx(0.0940117, rel=1e-5)
    # w = 2, 1, 0.25: mean 3.25/3; E[w^2] = 5.0625/3 = 1.6875; chi2 0.6875; ESS/N = (3.25/3)^2 / 1.6875
    assert g["is_ratio_mean"] == approx(3.25 / 3)
    assert g["is_ratio_chi2"] == approx(0.6875)
    assert g["is_ratio_ess_frac"] == approx((3.25 / 3) ** 2 / 1.6875)
    # F(tau): max(w, 1/w) = 2, 1, 4 -> tau 1.5: 2/3, tau 3: 1/3, tau 5: 0
    assert (g["extreme_token_frac_tau1.5"], g["extreme_token_frac_tau3"], g["extreme_token_frac_tau5"]) == (
        approx(2 / 3), approx(1 / 3), approx(0.0))


def test_prob_gap_default_taus_are_named_2_5_10():
    g = compute_prob_gap(_lp(0.5, 0.1, 0.2, 0.9), _lp(0.25, 0.1, 0.8, 0.9), MASK)
    assert {"extreme_token_frac_tau2", "extreme_token_frac_tau5", "extreme_token_frac_tau10"} <= set(g)
    assert g["extreme_token_frac_tau2"] == approx(1 / 3)  # only w = 1/4 is beyond 2x


def test_identical_policies_have_no_gap():
    lp = _lp(0.5, 0.1, 0.2, 0.9)
    g = compute_prob_gap(lp, lp.clone(), MASK)
    assert g["token_mult_prob_error"] == 1.0 and g["kl_k3_rollout_train"] == 0.0 and g["js_divergence"] == approx(0.0)
    assert g["is_ratio_ess_frac"] == 1.0 and g["is_ratio_chi2"] == approx(0.0)


# -------------------------------------------------------------------------------------- load, validity
def test_expert_load_and_imbalance():
    scal, load = compute_expert_load(TRAIN, MASK, E)
    # layer 0: 3,3,0,0 (the padding token's {3,2} excluded); layer 1: 1,0,3,2
    assert load.tolist() == [[3, 3, 0, 0], [1, 0, 3, 2]]
    # mean per layer 6/4 = 1.5; max/mean = 2 in both layers
    assert scal["max_over_mean"] == approx(2.0) and scal["max_over_mean_worst"] == approx(2.0)
    # cv: layer 0 std 1.5 -> 1.0; layer 1 deviations -.5,-1.5,1.5,.5 -> var 5/4 -> std sqrt(1.25) -> /1.5
    assert scal["cv"] == approx((1.0 + math.sqrt(1.25) / 1.5) / 2)
    rs, rload = compute_expert_load(ROLL, MASK, E)
    assert rload[0].tolist() == [2, 2, 2, 0]
    assert rs["max_over_mean"] == approx(((2 / 1.5) + (3 / 1.5)) / 2)  # layer 1 of rollout: 1,1,3,1


def test_capture_validity_counts_each_kind_of_bad_route():
    ex = torch.full((1, 4, 3, 2), -1)
    ex[0, 0, 0] = torch.tensor([0, 1])    # ok
    ex[0, 1, 0] = torch.tensor([-1, 2])   # missing
    ex[0, 2, 0] = torch.tensor([4, 1])    # out of range (E = 4)
    ex[0, 0, 1] = torch.tensor([2, 2])    # duplicate
    ex[0, 1, 1] = torch.tensor([1, 3])    # ok
    ex[0, 2, 1] = torch.tensor([-1, -1])  # missing (not a duplicate)
    ex[0, :3, 2] = 0                      # layer 2 all zero: a zero-filled capture (3 duplicates too)
    ex[0, 3, 0] = torch.tensor([1, 2])    # padding token holding a route
    v = check_capture_validity(ex, MASK, E)
    assert (v["tokens"], v["pairs"]) == (3, 9)
    assert v["missing_routes"] == 2 and v["out_of_range"] == 1 and v["duplicate_ids"] == 4
    assert v["all_zero_layers"] == 1 and v["padding_routes"] == 1
    assert v["invalid_pairs"] == 7 and v["valid"] == 0.0
    with pytest.raises(CaptureValidityError, match="2 missing routes"):
        require_valid_capture(v)
    good = check_capture_validity(TRAIN, MASK, E)
    assert good["valid"] == 1.0 and good["invalid_pairs"] == 0
    require_valid_capture(good)


def test_sets_of_more_than_64_experts_compare_across_bitmask_words():
    # E = 130 needs three 64-bit words; ids 1 (word 0), 65 (word 1), 129 (word 2)
    a = torch.tensor([[[[1, 129]], [[65, 1]]]])   # [1 seq, 2 tokens, 1 layer, top-2]
    b = torch.tensor([[[[129, 65]], [[1, 65]]]])  # t0: {1,129} vs {65,129} differ; t1: same set
    mm = compute_routing_mismatch(a, b.short(), torch.ones(1, 2), 130)  # int16 captures are accepted
    assert mm.scalars["pair_frac"] == approx(1 / 2)
    assert mm.scalars["jaccard"] == approx((1 / 3 + 1) / 2)  # t0: {129} / {1, 65, 129}
    assert mm.per_expert["a_only"][0, 1] == 1 and mm.per_expert["b_only"][0, 65] == 1
    assert mm.per_expert["chosen_a"][0].sum() == 4 and mm.per_expert["a_only"][0].sum() == 1


def test_pair_frac_by_rows_equals_the_full_comparison_of_each_group():
    from upgrpo_megatron.diagnostics.routing_stats import pair_frac_by_rows

    g = torch.Generator().manual_seed(5)
    B, R, L, K, E = 12, 6, 3, 2, 70  # E > 64: two bitmask words
    a = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * R * L)]).view(B, R, L, K)
    b = a.clone()
    flip = torch.rand(B, R, L, generator=g) < 0.3
    b[flip] = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(int(flip.sum()))])
    b[..., 0, :] = b[..., 0, :].flip(-1)  # the same set in another order is no mismatch
    a[2, 1, 1, 0] = -1   # not captured: not compared
    b[3, 0, 2, 1] = E    # out of range: not compared
    mask = (torch.rand(B, R, generator=g) < 0.8).float()
    mask[7] = 0          # a row with no tokens
    groups = [range(0, 4), [4, 5, 6], [7], range(8, 12), [0, 11, 5]]
    got = pair_frac_by_rows(a, b, mask, E, groups)
    for rows, frac in zip(groups, got):
        idx = torch.as_tensor(list(rows))
        want = compute_routing_mismatch(a[idx], b[idx], mask[idx], E).scalars["pair_frac"]
        if rows == [7]:
            assert math.isnan(frac) and math.isnan(want)
        else:
            assert frac == pytest.approx(want, abs=1e-12) and 0 < frac < 1
