"""The torch_dist checkpoint layout megatron writes at TP = EP = 1: keys, chunks, placements (see __init__)."""

from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.convert.qwen_moe import canonical_names, hf_shapes, hf_sources

DISTCP_FILES = ("__0_0.distcp", "__0_1.distcp")  # as megatron names them: rank 0, writer thread 0 and 1
BACKEND_MARKER = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                  "common_backend_version": 1}
_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.+)$")
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")
# layer norms megatron saves under Transformer Engine's fused names (kept TE-compatible by megatron)
_KEY_MAP = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@contextlib.contextmanager
def no_cyclic_gc():
    """Python's cyclic garbage collector off for a conversion: it allocates many small objects (metadata,
    sizes) and nothing cyclic, and a full collection over everything torch and megatron imported costs
    ~0.5 s, triggered by those allocations (tensors are freed by reference counting either way)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# ----------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Placement:
    """Where one canonical tensor lives in the checkpoint: key `key` (global shape `global_shape`), at
    `offset` (all zeros, or the expert index first for a stacked expert tensor), stored as `chunks`
    ((offsets, sizes) in the global tensor)."""

    name: str
    key: str
    global_shape: Tuple[int, ...]
    offset: Tuple[int, ...]
    shape: Tuple[int, ...]
    chunks: Tuple[Tuple[Tuple[int, ...], Tuple[int, ...]], ...]


def checkpoint_key(name: str) -> Tuple[str, Optional[int]]:
    """Canonical Megatron name -> (checkpoint key, expert index into the stacked tensor or None)."""
    e = _EXPERT.match(name)
    if e:
        return f"{e.group(1)}experts.{e.group(3)}", int(e.group(2))
    m = _LAYER.match(name)
    if m and m.group(2) in _KEY_MAP:
        return m.group(1) + _KEY_MAP[m.group(2)], None
    return name, None


def canonical_shape(name: str, cfg: ModelConfig,
                    shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Tuple[int, ...]:
    """Shape of a canonical tensor: its HF sources fused along the first dim (QKV, gate/up) or the one source.
    `shapes`: `hf_shapes(cfg)`, when the caller has it."""
    shapes = shapes if shapes is not None else hf_shapes(cfg)
    srcs = [shapes[s] for s in hf_sources(name, cfg)]
    return (sum(s[0] for s in srcs), *srcs[0][1:])


def plan(cfg: ModelConfig) -> Tuple[List[Placement], List[str]]:
    """The checkpoint megatron writes for this model at TP = EP = 1: every canonical tensor's placement (in
    model order) and the unique keys of the `_extra_state` byte objects."""
    n_exp = cfg.num_experts
    shapes = hf_shapes(cfg)
    tensors, objects = [], []
    for name in canonical_names(cfg):
        key, expert = checkpoint_key(name)
        shape = canonical_shape(name, cfg, shapes)
        lead = () if expert is None else (expert,)
        gshape = shape if expert is None else (n_exp, *shape)
        offset = (0,) * len(gshape) if expert is None else (expert,) + (0,) * len(shape)
        size = shape if expert is None else (1, *shape)
        if name.endswith("linear_fc1.weight"):  # SwiGLU: megatron stores [gate; up] as two chunks
            half = shape[0] // 2
            rest = (0,) * (len(shape) - 1)
            chunks = ((lead + (0,) + rest, size[:len(lead)] + (half, *shape[1:])),
                      (lead + (half,) + rest, size[:len(lead)] + (half, *shape[1:])))
        else:
            chunks = ((offset, size),)
        tensors.append(Placement(name, key, gshape, offset, shape, chunks))
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module and module.rsplit(".", 1)[-1] in _LINEARS:
            objects.append(f"{key[: -len('.weight')]}._extra_state/shard_{expert}_{n_exp}" if expert is not None
                           else f"{module}._extra_state/shard_0_1")
    return tensors, objects


# ----------------------------------------------------------------------------------------------- writing
