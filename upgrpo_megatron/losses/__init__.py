"""Policy losses (UP-GRPO and baselines), aggregation, advantages, KL and entropy: pure torch.

No Megatron and no vLLM import here: everything is a function of tensors, testable in milliseconds.
"""

from upgrpo_megatron.losses.advantages import (
    KL_ESTIMATORS,
    compute_grpo_advantages,
    dynamic_sampling_filter,
    entropy_from_logits,
    kl_penalty,
    overlong_reward_penalty,
)
from upgrpo_megatron.losses.aggregation import AGG_MODES, agg_loss, masked_mean, masked_sum, masked_var
from upgrpo_megatron.losses.policy import (
    POLICY_LOSSES,
    compute_policy_loss,
    gspo_token_log_ratio,
    policy_loss_per_token,
    register_policy_loss,
)

__all__ = [
    "AGG_MODES", "KL_ESTIMATORS", "POLICY_LOSSES", "agg_loss", "compute_grpo_advantages", "compute_policy_loss",
    "dynamic_sampling_filter", "entropy_from_logits", "gspo_token_log_ratio", "kl_penalty", "masked_mean",
    "masked_sum", "masked_var", "overlong_reward_penalty", "policy_loss_per_token", "register_policy_loss",
]
