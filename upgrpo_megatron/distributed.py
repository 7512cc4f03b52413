"""Small distributed helpers every part of the trainer uses: rank, broadcast, seeding, timing, and the
data-parallel row split.

Row split: a batch of `n` rows is split over `size` data-parallel ranks by striding (rank r takes rows
r, r + size, ...). The rollout tier shards prompts the same way (`strided_indices`), and the trainer pads
each rank's share to the same length with a masked dummy row (`dp_rows`), so all ranks run the same number
of equally shaped micro-batches (MoE dispatch and TP/SP are collectives inside the forward pass).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0, group=None):
    """`obj` from global rank `src` on every rank of `group` (the identity in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def collective_device() -> torch.device:
    """Where a small tensor for a collective must live: NCCL reduces CUDA tensors only (gloo: CPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(value: float, group=None) -> float:
    t = torch.tensor([float(value)], device=collective_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def global_sum(value: float, group=None) -> float:
    """Sum of a number over the ranks of `group` (float64: exact for token counts)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=collective_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return float(t.item())


# ------------------------------------------------------------------------------------------------ seeding
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain numbers only, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------------------------------------ timing
@contextmanager
def timer(metrics: Dict[str, float], name: str):
    """Adds the block's wall time to `metrics["timing_s/<name>"]`."""
    t0 = time.perf_counter()
    yield
    metrics[f"timing_s/{name}"] = metrics.get(f"timing_s/{name}", 0.0) + time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ row split
@dataclass(frozen=True)
class DataParallel:
    """This rank's place in the data-parallel group (rank, size) and the group itself (None: the default)."""

    rank: int = 0
    size: int = 1
    group: Any = None


def strided_indices(n: int, rank: int, size: int) -> List[int]:
    """The rows (or prompts) of `n` that rank `rank` of `size` owns: rank, rank + size, ..."""
    return list(range(rank, n, size))


def dp_rows(n: int, rank: int, size: int) -> torch.Tensor:
    """This rank's rows of n, padded to ceil(n / size) with -1 (a masked dummy row)."""
    per = math.ceil(n / size) if n else 0
    rows = strided_indices(n, rank, size)
    return torch.tensor(rows + [-1] * (per - len(rows)), dtype=torch.long)


def take_rows(batch: Dict[str, torch.Tensor], rows: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Rows of the batch; row -1 becomes a copy of row 0 with its response mask zeroed."""
    safe = rows.clamp(min=0)
    out = {k: v[safe] for k, v in batch.items()}
    dummy = rows < 0
    if dummy.any():
        out["response_mask"] = out["response_mask"].clone()
        out["response_mask"][dummy] = 0
    return out


def gather_rows(t: torch.Tensor, n: int, size: int, group=None) -> torch.Tensor:
    """Inverse of the row split (`dp_rows`): every rank gets the full `[n, ...]` tensor."""
    if size == 1:
        return t[:n]
    # gloo and NCCL have no 16-bit integers (the expert ids): such tensors travel as their bytes
    wire = t.contiguous().view(torch.uint8) if t.dtype in (torch.int16, torch.uint16) else t.contiguous()
    parts = [torch.empty_like(wire) for _ in range(size)]
    dist.all_gather(parts, wire, group=group)
    out = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
    for r, p in enumerate(parts):
        rws = dp_rows(n, r, size)
        keep = rws >= 0
        # the parts sit on the collective's device (the GPU under NCCL)
        out[rws[keep]] = p[keep].to(out.device).view(t.dtype)
    return out
