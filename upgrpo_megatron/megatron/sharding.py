"""Full (canonical) <-> local (TP/EP-sharded) Megatron parameters.

The *canonical* state dict is what the model's `named_parameters()` would be at TP=EP=ETP=1: same names,
full tensors, and experts numbered globally (`...mlp.experts.local_experts.{global_expert}...`). It is the
meeting point of three users: HF conversion (`convert/` maps HF names <-> canonical names), weight sync to
the rollout engine, and tests that compare layouts. How a canonical tensor is split on this rank is read
from the parameter's own megatron attributes (`tensor_model_parallel`, `partition_dim`), except for one
thing megatron does not record on the tensor: a SwiGLU `linear_fc1` holds [gate; up], and TP splits each
half separately (rank r holds [gate_r; up_r]), not the concatenation.

`iter_full_params` streams one canonical tensor at a time (a collective per tensor over the TP or
expert-TP/EP group), so memory stays bounded by the largest tensor group, not the model.

Canonical names are those of megatron-core's local layer spec (the CPU one). Transformer Engine's spec (GPU)
names three kinds of parameters differently, and `named_params` translates them (`local_spec_name`): the input
norm fused into `linear_qkv` (`linear_qkv.layer_norm_weight`), a dense MLP's norm fused into `linear_fc1`,
and grouped-GEMM experts stored as `experts.linear_fc1.weight{j}` (GPU path not yet run, see README).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, Mapping, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_TE_NAMES = (
    (re.compile(r"^(.*)\.self_attention\.linear_qkv\.layer_norm_weight$"), r"\1.input_layernorm.weight"),
    (re.compile(r"^(.*)\.mlp\.linear_fc1\.layer_norm_weight$"), r"\1.pre_mlp_layernorm.weight"),
    (re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$"), r"\1.local_experts.\3.\2.weight"),
)


def local_spec_name(name: str) -> str:
    """A parameter name of either layer spec -> the local spec's name (identity on the local spec)."""
    for pattern, repl in _TE_NAMES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def named_params(model):
    """`model.named_parameters()` under local-spec names (the same list on the CPU and the TE spec)."""
    for name, p in model.named_parameters():
        yield local_spec_name(name), p


def _params_by_name(model) -> Dict[str, torch.nn.Parameter]:
    cached = getattr(model, "_upgrpo_params_by_name", None)
    if cached is None:
        cached = dict(named_params(model))
        object.__setattr__(model, "_upgrpo_params_by_name", cached)
    return cached


def is_expert_param(name: str) -> bool:
    return ".mlp.experts." in name


def _is_glu_fc1(name: str, model) -> bool:
    return name.endswith("linear_fc1.weight") and model.config.gated_linear_unit


def _groups(name: str):
    """(tp_group, tp_size, tp_rank) that splits this parameter."""
    if is_expert_param(name):
        return (
            ps.get_expert_tensor_parallel_group(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_rank(),
        )
    return (
        ps.get_tensor_model_parallel_group(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
    )


def _num_local_experts(model) -> int:
    return model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()


def local_to_global_name(name: str, model) -> str:
    """`...local_experts.{j}...` on this EP rank -> `...local_experts.{global}...`."""
    m = _EXPERT_RE.match(name)
    if not m:
        return name
    g = ps.get_expert_model_parallel_rank() * _num_local_experts(model) + int(m.group(2))
    return f"{m.group(1)}{g}{m.group(3)}"


def global_to_local_name(name: str, model) -> str | None:
    """Canonical expert name -> this rank's local name, or None when another EP rank owns the expert."""
    m = _EXPERT_RE.match(name)
    if not m:
        return name
    n_local = _num_local_experts(model)
    g = int(m.group(2))
    if g // n_local != ps.get_expert_model_parallel_rank():
        return None
    return f"{m.group(1)}{g % n_local}{m.group(3)}"


def _shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, model) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    _, size, rank = _groups(name)
    if size == 1:
        return full
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, size, dim=dim)[rank], torch.chunk(up, size, dim=dim)[rank]], dim=dim)
    return torch.chunk(full, size, dim=dim)[rank]


def _unshard(local: torch.Tensor, param: torch.nn.Parameter, name: str, model) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return local
    group, size, _ = _groups(name)
    if size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return join_shards(parts, param, name, model)


def join_shards(parts, param: torch.nn.Parameter, name: str, model) -> torch.Tensor:
    """The full tensor from its TP (or expert-TP) shards in group-rank order."""
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        gates, ups = zip(*(torch.chunk(p, 2, dim=dim) for p in parts))
        return torch.cat([torch.cat(gates, dim=dim), torch.cat(ups, dim=dim)], dim=dim)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def load_full_tensor(model, gname: str, tensor: torch.Tensor,
                     params: Dict[str, torch.nn.Parameter] | None = None) -> str | None:
    """Copy one canonical tensor into this rank's shard; returns the local name, or None when another EP
    rank owns it. A shape that does not fit names the tensor."""
    params = params if params is not None else _params_by_name(model)
    lname = global_to_local_name(gname, model)
    if lname is None:
        return None
    if lname not in params:  # a caller's named_parameters() of the TE spec: look it up under local-spec names
        params = _params_by_name(model)
    if lname not in params:
        raise KeyError(f"checkpoint tensor '{gname}' has no parameter in the model")
    p = params[lname]
    shard = _shard(tensor, p, lname, model)
    if tuple(shard.shape) != tuple(p.shape):
        raise ValueError(
            f"tensor '{gname}': shape {tuple(tensor.shape)} does not fit the model "
            f"(this rank expects a shard of {tuple(p.shape)})"
        )
    p.copy_(shard.to(p.dtype))
    return lname


@torch.no_grad()
def load_full_state_dict(model, full: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Copy canonical full tensors into this rank's shards. Every rank passes the same `full` (or at least
    the entries it owns). Shapes are checked and a mismatch names the tensor."""
    params = _params_by_name(model)
    seen = set()
    for gname, tensor in full.items():
        try:
            lname = load_full_tensor(model, gname, tensor, params)
        except KeyError:
            if strict:
                raise
            continue
        if lname is not None:
            seen.add(lname)
    missing = [n for n in params if n not in seen]
    if strict and missing:
        raise KeyError(f"checkpoint lacks {len(missing)} model tensors, "
                       f"e.g. '{local_to_global_name(missing[0], model)}'")


@torch.no_grad()
def _iter_full(model, tensor_of) -> Iterator[Tuple[str, torch.Tensor]]:
    ep_size = ps.get_expert_model_parallel_world_size()
    n_local = _num_local_experts(model)
    for name, p in named_params(model):
        full = _unshard(tensor_of(p), p, name, model)
        m = _EXPERT_RE.match(name)
        if m is None or ep_size == 1:
            yield local_to_global_name(name, model), full
            continue
        parts = [torch.empty_like(full) for _ in range(ep_size)]
        dist.all_gather(parts, full.contiguous(), group=ps.get_expert_model_parallel_group())
        j = int(m.group(2))
        for r, t in enumerate(parts):
            yield f"{m.group(1)}{r * n_local + j}{m.group(3)}", t


def iter_full_params(model) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (canonical name, full tensor) for every parameter, on every rank. Collective: all ranks of the
    model-parallel group must iterate together. Experts are gathered over the EP group, one local index at
    a time, and yielded in global order within that index."""
    return _iter_full(model, lambda p: p.data)


def full_state_dict(model) -> Dict[str, torch.Tensor]:
    """All canonical tensors at once (tests, small models). Prefer `iter_full_params` for big ones."""
    return {k: v.clone() for k, v in iter_full_params(model)}


def grad_of(p: torch.nn.Parameter):
    """A parameter's gradient: `main_grad` under megatron DDP (the reduced fp32 buffer), else `.grad` (or None)."""
    g = getattr(p, "main_grad", None)
    return p.grad if g is None else g


def iter_full_grads(model) -> Iterator[Tuple[str, torch.Tensor]]:
    """Like `iter_full_params` for gradients (`main_grad` under megatron DDP, else `.grad`; zeros when none)."""
    def full_grad(p):
        g = grad_of(p)
        return (torch.zeros_like(p) if g is None else g).to(p.dtype)

    return _iter_full(model, full_grad)
