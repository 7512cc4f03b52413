"""vLLM rollouts: generation with log-probs, rollout routing, in-memory weight sync.

`batch` (pure: samples, padding, data-parallel merge), `routing` (pure: captured rows -> per-sample routing),
`engine` (the vLLM wrapper), `data_parallel` (one engine per DP rank), `worker_ext` (runs inside the engine
process), `vllm_plugin` (keeps CPU weights syncable in place). vLLM is imported only when an engine starts.
"""

from upgrpo_megatron.rollout.batch import (
    RolloutBatch,
    RolloutError,
    RolloutSample,
    merge_rank_batches,
    pad_rollout_batch,
    shard_prompts,
)
from upgrpo_megatron.rollout.data_parallel import generate_data_parallel
from upgrpo_megatron.rollout.engine import RolloutEngine

__all__ = ["RolloutBatch", "RolloutEngine", "RolloutError", "RolloutSample", "generate_data_parallel",
           "merge_rank_batches", "pad_rollout_batch", "shard_prompts"]
