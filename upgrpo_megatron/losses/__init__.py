"""Policy losses (UP-GRPO and baselines), aggregation, advantages, KL and entropy: pure torch."""

from upgrpo_megatron.losses.advantages import (
    compute_grpo_advantages,
    dynamic_sampling_filter,
    entropy_from_logits,
    kl_penalty,
    overlong_reward_penalty,
)
from upgrpo_megatron.losses.aggregation import AGG_MODES, agg_loss, masked_mean, masked_var
from upgrpo_megatron.losses.policy import POLICY_LOSSES, compute_policy_loss, register_policy_loss

__all__ = [
    "AGG_MODES", "POLICY_LOSSES", "agg_loss", "compute_grpo_advantages", "compute_policy_loss",
    "dynamic_sampling_filter", "entropy_from_logits", "kl_penalty", "masked_mean", "masked_var",
    "overlong_reward_penalty", "register_policy_loss",
]
