"""Policy losses (UP-GRPO and baselines), train-inference corrections, aggregation, advantages, KL and entropy:
pure torch.

No Megatron and no vLLM import here: everything is a function of tensors, testable in milliseconds.

Names a config schema can read: POLICY_LOSSES (loss modes), CORRECTIONS (correction arms), AGG_MODES
(aggregations), KL_ESTIMATORS.

Loss modes (`compute_policy_loss(loss_mode=...)`, policy.py; r = pi_theta / pi_old per token, A the advantage,
sg the stop-gradient, s_i the length-normalised sequence ratio):
    vanilla   -A min(r, 1+eps_high) (A > 0), -A clamp(r, 1-eps_low, c) (A < 0): the PPO clip (Schulman et al. 2017)
              with DAPO's clip-higher (Yu et al. 2025) and the dual clip (Ye et al. 2020)
    up_grpo   -A log pi (A > 0, no ratio, no clip); vanilla's loss (A <= 0)                      the UP-GRPO post
    gspo      max(-A s, -A clip(s, 1-eps_low, 1+eps_high)), s the GSPO-token ratio      GSPO (arXiv 2507.18071)
    up_gspo   -A log pi (A > 0); gspo's loss (A <= 0)                                            the UP-GRPO post
    topr      -A log pi (A > 0); -sg(clamp(r, 0, 1)) A log pi with the token ratio (A <= 0)
              TOPR (Le Roux et al., arXiv 2503.14286), token-level as alibaba/ROLL's pg_variant='topr'
    cispo     -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi on every token         CISPO, MiniMax-M1 (arXiv 2506.13585)

Correction arms (`apply_correction(name, ...)` -> token_weights for compute_policy_loss, correction.py;
w = pi_trainer / pi_rollout per token):
    none          no weights
    tis           min(w, 2)                            truncated IS (Yao et al., Aug 2025; verl's token rollout_is)
    icepop        w inside [0.5, 5], 0 outside         IcePop (Ant Group, Ring-1T, arXiv 2510.18855)
    seq_mask_is   1 if exp(mean_t log w) in [0.999, 1.001] for the sequence, else 0   verl's geometric rejection
    routing_mask  alpha (0) where the top-k expert sets differ in >= m (1) MoE layers, else 1

Metric names are listed in policy.py's and correction.py's docstrings.
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
from upgrpo_megatron.losses.correction import (
    CORRECTIONS,
    apply_correction,
    icepop_weights,
    mismatched_layers,
    routing_mask_weights,
    seq_mask_is_weights,
    tis_weights,
)
from upgrpo_megatron.losses.policy import (
    POLICY_LOSSES,
    compute_policy_loss,
    gspo_token_log_ratio,
    policy_loss_per_token,
    register_policy_loss,
)

__all__ = [
    "AGG_MODES", "CORRECTIONS", "KL_ESTIMATORS", "POLICY_LOSSES", "agg_loss", "apply_correction",
    "compute_grpo_advantages", "compute_policy_loss", "dynamic_sampling_filter", "entropy_from_logits",
    "gspo_token_log_ratio", "icepop_weights", "kl_penalty", "masked_mean", "masked_sum", "masked_var",
    "mismatched_layers", "overlong_reward_penalty", "policy_loss_per_token", "register_policy_loss",
    "routing_mask_weights", "seq_mask_is_weights", "tis_weights",
]
