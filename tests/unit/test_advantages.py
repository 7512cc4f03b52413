"""GRPO group advantages, DAPO dynamic sampling and overlong shaping, KL estimators, entropy."""
import math

import pytest
import torch

from upgrpo_megatron.losses import (
    compute_grpo_advantages,
    dynamic_sampling_filter,
    entropy_from_logits,
    kl_penalty,
    overlong_reward_penalty,
)


def test_grpo_advantage_is_group_normalised():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group = torch.tensor([7, 7, 7, 3, 3, 3])
    adv = compute_grpo_advantages(rewards, group, norm_by_std=True, epsilon=0.0)
    # group 7: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv[:3], torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]))
    torch.testing.assert_close(adv[3:], torch.zeros(3))  # all-equal group: no signal
    centred = compute_grpo_advantages(rewards, group, norm_by_std=False)
    torch.testing.assert_close(centred[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_single_response_group_keeps_its_reward():
    adv = compute_grpo_advantages(torch.tensor([0.5]), torch.tensor([0]), epsilon=0.0)
    torch.testing.assert_close(adv, torch.tensor([0.5]))


def test_dynamic_sampling_drops_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 1, 1, 2, 2])
    keep, dropped = dynamic_sampling_filter(rewards, group)
    assert keep.tolist() == [2, 3] and dropped == 2


def test_overlong_penalty_is_linear_inside_the_buffer():
    pen = overlong_reward_penalty(torch.tensor([10, 12, 14, 16]), max_response_length=16, buffer_len=4,
                                  penalty_factor=1.0)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0]))


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    torch.testing.assert_close(kl_penalty(lp, ref, "low_var_kl"), k3)
    assert torch.all(kl_penalty(lp, ref, "k3") >= 0)
    with pytest.raises(ValueError, match="kl_loss_type"):
        kl_penalty(lp, ref, "k9")


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    p = torch.tensor([0.25, 0.75])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(2), -(p * p.log()).sum().item()]))
