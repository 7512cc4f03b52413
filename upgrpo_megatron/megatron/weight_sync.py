"""Shard-local weight sync: each rollout engine gets its full tensors from the ranks that hold the shards,
gathered only inside the model-parallel group that splits them, and only to the ranks that feed an engine.

    stats = SyncStats()
    for name, full in engine_weights(module, receivers={0, 2}, stats=stats):   # collective: every rank iterates
        ...   # only ranks in `receivers` get items; the others take part in the gathers and yield nothing

Per parameter (canonical names and the TP split rules are those of `sharding.py`):
- a TP-split tensor is gathered over its TP (or expert-TP) group, to the group's receiver when it has exactly
  one (`gather`: the other members only send), to all members when all of them receive (`all_gather`);
- an expert tensor is then gathered over the EP group the same way, so a receiver gets every expert;
- a group with no receiver (and, for experts, no member that must forward to one) moves nothing.
Nothing goes through a rank that does not need it, and no rank handles more than the tensors its own engine
holds: with a full-copy engine per data-parallel replica (CPU), each receiver gets the whole model once, from
its own TP/EP group, at every world size.

`SyncStats` counts what this rank received from other ranks (the bytes that had to cross the network to
it, whatever the collective's algorithm), what it sent, and what it handed to its engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from upgrpo_megatron.megatron.sharding import (
    _EXPERT_RE,
    _groups,
    _num_local_experts,
    is_expert_param,
    join_shards,
    local_to_global_name,
    named_params,
)


@dataclass
class SyncStats:
    tensors: int = 0          # full tensors this rank yielded (handed to its engine)
    engine_bytes: int = 0     # their bytes (engine_link then puts what the engine received, in its dtype)
    recv_bytes: int = 0       # bytes received from other ranks in the gathers
    sent_bytes: int = 0       # bytes of own shards sent to other ranks
    collectives: int = 0      # gathers this rank took part in
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _collect(t: torch.Tensor, group, want: List[int], stats: SyncStats) -> Optional[List[torch.Tensor]]:
    """Every member's `t` (same shape), in group-rank order, on the members listed in `want`; None elsewhere.
    Every member of `group` calls this with the same `want`."""
    members = dist.get_process_group_ranks(group)
    me, size, b = dist.get_rank(), len(members), _nbytes(t)
    if not want:
        return None
    t = t.contiguous()
    stats.collectives += 1
    if len(want) == 1:  # one receiver: the others only send it their piece
        dst = want[0]
        parts = [torch.empty_like(t) for _ in range(size)] if me == dst else None
        dist.gather(t, parts, dst=dst, group=group)
        if me == dst:
            stats.recv_bytes += (size - 1) * b
            return parts
        stats.sent_bytes += b
        return None
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t, group=group)
    stats.recv_bytes += (size - 1) * b
    stats.sent_bytes += (len(want) - (me in want)) * b
    return parts if me in want else None


@torch.no_grad()
def engine_weights(model, receivers: Set[int], stats: Optional[SyncStats] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (canonical name, full tensor) on the ranks in `receivers`, in model order (experts of one local
    index in global order). Collective: every rank of the world iterates it to the end."""
    stats = stats if stats is not None else SyncStats()
    ep = ps.get_expert_model_parallel_world_size()
    n_local = _num_local_experts(model)
    me = dist.get_rank()
    for name, p in named_params(model):
        t = p.data
        expert = is_expert_param(name)
        forward_to_ep = expert and ep > 1
        group, size, _ = _groups(name)
        if getattr(p, "tensor_model_parallel", False) and size > 1:
            members = dist.get_process_group_ranks(group)
            # an expert shard must reach every EP peer's gather, so all ETP members need the joined tensor
            want = members if forward_to_ep else [r for r in members if r in receivers]
            parts = _collect(t, group, want, stats)
            if parts is None:
                continue
            t = join_shards(parts, p, name, model)
        if not forward_to_ep:
            if me in receivers:
                stats.tensors += 1
                stats.engine_bytes += _nbytes(t)
                yield local_to_global_name(name, model), t
            continue
        ep_group = ps.get_expert_model_parallel_group()
        want = [r for r in dist.get_process_group_ranks(ep_group) if r in receivers]
        parts = _collect(t, ep_group, want, stats)
        if parts is None:
            continue
        m = _EXPERT_RE.match(name)
        j = int(m.group(2))
        for r, part in enumerate(parts):
            stats.tensors += 1
            stats.engine_bytes += _nbytes(part)
            yield f"{m.group(1)}{r * n_local + j}{m.group(3)}", part
