"""GRPO group advantages, DAPO dynamic sampling and overlong shaping, KL estimators, entropy, masked helpers."""
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upgrpo_megatron.losses import (
    compute_grpo_advantages,
    dynamic_sampling_filter,
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_var,
    overlong_reward_penalty,
)


def grpo_advantage_oracle(rewards, group, epsilon=1e-6, norm_by_std=True):
    """From GRPO's definition, one response at a time: A_i = (r_i - mean_g) / (std_g + eps), std_g the unbiased
    standard deviation of the rewards of i's group g. compute_grpo_advantages' documented conventions: a group of
    one has mean 0 and std 1; an all-equal group with eps = 0 has no signal (0, not 0/0)."""
    rs, gs = [float(r) for r in rewards], [int(x) for x in group]
    out = []
    for r, g in zip(rs, gs):
        members = [x for x, h in zip(rs, gs) if h == g]
        mean, std = (0.0, 1.0) if len(members) == 1 else (statistics.fmean(members), statistics.stdev(members))
        if not norm_by_std:
            out.append(r - mean)
        else:
            out.append((r - mean) / (std + epsilon) if std + epsilon > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_grpo_advantage_is_group_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group = torch.tensor([7, 7, 7, 3, 3, 3])
    adv = compute_grpo_advantages(rewards, group, norm_by_std=True, epsilon=0.0)
    # group 7: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[:3], torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]))
    torch.testing.assert_close(adv[3:], torch.zeros(3))  # all-equal group: no signal, never NaN
    centred = compute_grpo_advantages(rewards, group, norm_by_std=False)
    torch.testing.assert_close(centred[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_single_response_group_keeps_its_reward():
    adv = compute_grpo_advantages(torch.tensor([0.5]), torch.tensor([0]), epsilon=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.5]))


@settings(max_examples=25, deadline=None)
@given(n_groups=st.integers(1, 5), group_size=st.integers(1, 6), seed=st.integers(0, 10_000),
       norm=st.booleans(), eps=st.sampled_from([0.0, 1e-6]))
def test_property_grpo_advantages_match_the_definition(n_groups, group_size, seed, norm, eps):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 3, (n_groups * group_size,), generator=g).double() / 2
    group = torch.arange(n_groups).repeat_interleave(group_size)[torch.randperm(n_groups * group_size, generator=g)]
    ours = compute_grpo_advantages(rewards, group, norm_by_std=norm, epsilon=eps)
    ref = grpo_advantage_oracle(rewards, group, epsilon=eps, norm_by_std=norm)
    assert ours.dtype == torch.float64  # float64 rewards stay float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 9])
    keep, dropped = dynamic_sampling_filter(rewards, group)
    assert keep.tolist() == [2, 3] and dropped == 3  # group 9 has one response: nothing to compare, dropped


def test_overlong_penalty_is_linear_inside_the_buffer():
    pen = overlong_reward_penalty(torch.tensor([10, 12, 14, 16]), max_response_length=16, buffer_len=4,
                                  penalty_factor=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0]))
    pen2 = overlong_reward_penalty(torch.tensor([13, 16]), max_response_length=16, buffer_len=4, penalty_factor=0.5)
    torch.testing.assert_close(pen2, torch.tensor([-0.125, -0.5]))
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_reward_penalty(torch.tensor([3]), max_response_length=16, buffer_len=0)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_reward_penalty(torch.tensor([3]), max_response_length=16, buffer_len=17)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), k3)
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    with pytest.raises(ValueError, match="kl_loss_type"):
        kl_penalty(lp, ref, "k9")
    with pytest.raises(ValueError, match="ref_log_prob"):
        kl_penalty(lp, ref[:1], "k1")


def test_k3_is_clamped_like_verl_and_its_gradient_stays_finite():
    lp = torch.tensor([-80.0, -1.0, -30.0], requires_grad=True)
    ref = torch.tensor([-1.0, -80.0, -1.0])
    k = kl_penalty(lp, ref, "k3")
    # d = ref - lp clamped to [-20, 20]: e^20 - 20 - 1 -> clamped to 10;  e^-20 + 20 - 1 -> clamped to 10
    torch.testing.assert_close(k, torch.tensor([10.0, 10.0, 10.0]))
    k.sum().backward()
    assert torch.all(torch.isfinite(lp.grad))


def test_k3_is_an_unbiased_kl_estimate():
    """E_{a ~ pi}[k3] = KL(pi || pi_ref) (Schulman): check by exact expectation over a small vocabulary."""
    logits, ref_logits = torch.tensor([0.3, -1.0, 2.0, 0.0]), torch.tensor([1.0, 0.5, -0.5, 0.0])
    lp, ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    p = lp.exp()
    kl = (p * (lp - ref)).sum()
    torch.testing.assert_close((p * kl_penalty(lp, ref, "k3")).sum(), kl)
    torch.testing.assert_close((p * kl_penalty(lp, ref, "k1")).sum(), kl)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    p = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(2), -(p * p.log()).sum().item()]))
    big = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ent = entropy_from_logits(big)
    assert ent.dtype == torch.float32 and ent.shape == (3, 5)
    torch.testing.assert_close(ent, torch.distributions.Categorical(logits=big.float()).entropy())


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 4.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert float(masked_mean(x, m)) == pytest.approx(2.5)  # NaN and 100 are under the mask's zeros
    torch.testing.assert_close(masked_mean(x, m, dim=-1), torch.tensor([1.5, 3.5]))
    assert float(masked_mean(x, torch.zeros_like(m))) == 0.0
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(masked_var(x, m)) == pytest.approx(float(vals.var()))  # unbiased, as verl
    assert float(masked_var(x, m, unbiased=False)) == pytest.approx(float(vals.var(unbiased=False)))
    with pytest.raises(ValueError, match="masked_var"):
        masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_per_response_inputs_are_checked():
    with pytest.raises(ValueError, match="group"):
        compute_grpo_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rewards"):
        dynamic_sampling_filter(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
