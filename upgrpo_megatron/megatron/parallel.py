"""Process groups: torch.distributed + megatron `parallel_state` from a validated parallel layout.

Works the same under `torchrun` (RANK/WORLD_SIZE/MASTER_ADDR in the environment) and as a plain single
process (a world of one on a private TCP store), so tools and tests need no launcher for one rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from upgrpo_megatron.distributed import DataParallel
from upgrpo_megatron.megatron import compat


@dataclass(frozen=True)
class ParallelSizes:
    tp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    sequence_parallel: bool = False


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend == "auto":
        backend = compat.default_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = None
    if "RANK" not in os.environ:  # a plain `python` process: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            # the store binds port 0 itself: picking a free port and binding it later races with any other process
            # that starts meanwhile (an engine, a benchmark's other framework: EADDRINUSE seen in CI)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
            os.environ["MASTER_PORT"] = str(store.port)
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("LOCAL_RANK", "0")
    if compat.cuda_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = store or _store_of_this_attempt(timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def _store_of_this_attempt(timeout):
    """torchrun's store, private to this restart attempt (None: not under a torchrun agent's store).

    Under `torchrun --max-restarts`, workers share the agent's TCPStore across restarts and torch 2.13 puts
    the process group's keys there without an attempt prefix, so the restarted ranks read the dead ranks'
    gloo addresses and fail ("Gloo connectFullMesh failed ... Connection refused"; reproduced with a
    two-rank script). Prefixing the keys with TORCHELASTIC_RESTART_COUNT keeps each attempt apart (the
    other way out, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, must be set where torchrun starts)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"upgrpo/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_model_parallel(sizes: ParallelSizes, seed: int = 1234, backend: str = "auto") -> None:
    """Create megatron's TP/EP/DP groups and seed the model-parallel RNG streams."""
    init_distributed(backend)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        create_gloo_process_groups=not compat.cuda_available(),
    )
    # megatron seeds the CUDA generator only (a no-op without CUDA): seed the CPU one too, identically on
    # every rank, so replicated parameters start equal; the tracker then forks per-TP/EP-rank streams.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def data_parallel() -> DataParallel:
    """This rank's data-parallel group, as the trainer's row split sees it: the step's batch lives in host
    memory, so its rows are gathered over gloo (megatron's NCCL group on GPU gets a gloo twin). Collective."""
    return DataParallel(parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                        host_twin(parallel_state.get_data_parallel_group()))


def host_twin(group):
    """`group` itself when it runs on gloo, else a gloo group of the same ranks. Collective over the world: every
    rank creates every twin, in one order (torch.distributed.new_group's rule)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or dist.get_backend(group) == "gloo":
        return group
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, dist.get_process_group_ranks(group))
    mine = None
    for ranks in sorted({tuple(r) for r in everyone}):
        g = dist.new_group(list(ranks), backend="gloo")
        if dist.get_rank() in ranks:
            mine = g
    return mine


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
