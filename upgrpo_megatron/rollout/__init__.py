"""vLLM rollouts: generation with log-probs, rollout routing, in-memory weight sync."""

from upgrpo_megatron.rollout.engine import RolloutBatch, RolloutEngine, RolloutError, RolloutSample

__all__ = ["RolloutBatch", "RolloutEngine", "RolloutError", "RolloutSample"]
