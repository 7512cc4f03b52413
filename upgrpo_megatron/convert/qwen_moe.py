"""Hugging Face <-> Megatron (canonical) names and tensors for Qwen3-MoE and Qwen2-MoE: the one mapping.

Canonical Megatron tensors are full (TP=EP=1) with experts numbered globally (see megatron/sharding.py).
Both directions stream: `megatron_to_hf` turns one Megatron tensor into its HF tensors (QKV and gate/up are
split); `hf_to_megatron` builds one Megatron tensor from the HF tensors it needs (QKV and gate/up are fused),
reading them through a getter, so conversion holds one tensor group at a time.

Fusions:
  linear_qkv rows = per query group g: [q heads of g (q_per_group * head_dim); k_g (head_dim); v_g (head_dim)]
  linear_fc1 rows = [gate_proj; up_proj]
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from upgrpo_megatron.config.schema import ModelConfig

Tensor = torch.Tensor

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")


def _qkv_dims(cfg: ModelConfig):
    return cfg.num_attention_heads // cfg.num_query_groups, cfg.num_query_groups, cfg.head_dim


def _split_qkv(t: Tensor, cfg: ModelConfig) -> Tuple[Tensor, Tensor, Tensor]:
    qpg, ng, hd = _qkv_dims(cfg)
    rest = t.shape[1:]
    g = t.reshape(ng, qpg + 2, hd, *rest)
    q = g[:, :qpg].reshape(ng * qpg * hd, *rest)
    k = g[:, qpg].reshape(ng * hd, *rest)
    v = g[:, qpg + 1].reshape(ng * hd, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    qpg, ng, hd = _qkv_dims(cfg)
    rest = q.shape[1:]
    parts = [q.reshape(ng, qpg, hd, *rest), k.reshape(ng, 1, hd, *rest), v.reshape(ng, 1, hd, *rest)]
    return torch.cat(parts, dim=1).reshape(ng * (qpg + 2) * hd, *rest).contiguous()


def _layer_map(rest: str, arch: str) -> Dict[str, str]:
    """Megatron per-layer suffix -> HF per-layer suffix, for the 1:1 tensors."""
    m = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        "mlp.router.weight": "mlp.gate.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
        "mlp.shared_experts.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
        "mlp.shared_experts.gate_weight": "mlp.shared_expert_gate.weight",
    }
    return m


_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def megatron_to_hf(name: str, tensor: Tensor, cfg: ModelConfig) -> List[Tuple[str, Tensor]]:
    """One canonical Megatron tensor -> its HF tensors."""
    arch = cfg.architecture
    if name in _GLOBAL:
        return [(_GLOBAL[name], tensor)]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"no HF name for Megatron tensor '{name}'")
    i, rest = m.group(1), m.group(2)
    p = f"model.layers.{i}."
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = _split_qkv(tensor, cfg)
        return [(f"{p}self_attn.q_proj.{kind}", q), (f"{p}self_attn.k_proj.{kind}", k),
                (f"{p}self_attn.v_proj.{kind}", v)]
    e = _EXPERT.match(rest)
    if e:
        base = f"{p}mlp.experts.{e.group(1)}."
        if e.group(2) == "linear_fc1":
            gate, up = torch.chunk(tensor, 2, dim=0)
            return [(base + "gate_proj.weight", gate.contiguous()), (base + "up_proj.weight", up.contiguous())]
        return [(base + "down_proj.weight", tensor)]
    if rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
        base = p + ("mlp." if rest.startswith("mlp.linear") else "mlp.shared_expert.")
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [(base + "gate_proj.weight", gate.contiguous()), (base + "up_proj.weight", up.contiguous())]
    lm = _layer_map(rest, arch)
    if rest in lm:
        return [(p + lm[rest], tensor)]
    raise KeyError(f"no HF name for Megatron tensor '{name}'")


def hf_sources(name: str, cfg: ModelConfig) -> List[str]:
    """The HF tensor names one canonical Megatron tensor is built from (in fusion order)."""
    dummy = {
        "self_attention.linear_qkv.weight": ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
        "self_attention.linear_qkv.bias": ["q_proj.bias", "k_proj.bias", "v_proj.bias"],
    }
    if name in _GLOBAL:
        return [_GLOBAL[name]]
    m = _LAYER.match(name)
    if not m:
        raise KeyError(name)
    i, rest = m.group(1), m.group(2)
    p = f"model.layers.{i}."
    if rest in dummy:
        return [f"{p}self_attn.{x}" for x in dummy[rest]]
    e = _EXPERT.match(rest)
    if e:
        base = f"{p}mlp.experts.{e.group(1)}."
        if e.group(2) == "linear_fc1":
            return [base + "gate_proj.weight", base + "up_proj.weight"]
        return [base + "down_proj.weight"]
    if rest in ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight"):
        base = p + ("mlp." if rest.startswith("mlp.linear") else "mlp.shared_expert.")
        return [base + "gate_proj.weight", base + "up_proj.weight"]
    lm = _layer_map(rest, cfg.architecture)
    if rest in lm:
        return [p + lm[rest]]
    raise KeyError(name)


def hf_to_megatron(name: str, get: Callable[[str], Tensor], cfg: ModelConfig) -> Tensor:
    """Build one canonical Megatron tensor from HF tensors read through `get(hf_name)`."""
    srcs = hf_sources(name, cfg)
    tensors = [get(s) for s in srcs]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return _fuse_qkv(*tensors, cfg)
    if len(tensors) == 2:  # gate/up -> linear_fc1
        return torch.cat(tensors, dim=0).contiguous()
    return tensors[0]


def megatron_to_hf_stream(cfg: ModelConfig,
                          named_tensors: Iterator[Tuple[str, Tensor]]) -> Iterator[Tuple[str, Tensor]]:
    for name, t in named_tensors:
        yield from megatron_to_hf(name, t, cfg)


def canonical_names(cfg: ModelConfig) -> List[str]:
    """Every canonical Megatron tensor name of the architecture, in model order."""
    qwen2 = cfg.architecture == "qwen2_moe"
    tied = bool(cfg.tie_word_embeddings)
    names = ["embedding.word_embeddings.weight"]
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_proj.weight",
                  p + "self_attention.linear_qkv.weight"]
        if qwen2:
            names.append(p + "self_attention.linear_qkv.bias")
        else:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        names.append(p + "pre_mlp_layernorm.weight")
        if i < cfg.first_k_dense_layers:
            names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
            continue
        names.append(p + "mlp.router.weight")
        for e in range(cfg.num_experts):
            names += [p + f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                      p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"]
        if qwen2 and cfg.shared_expert_ffn_hidden_size:
            names += [p + "mlp.shared_experts.linear_fc1.weight", p + "mlp.shared_experts.linear_fc2.weight",
                      p + "mlp.shared_experts.gate_weight"]
    names.append("decoder.final_layernorm.weight")
    if not tied:
        names.append("output_layer.weight")
    return names


def hf_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor the architecture has, with the shape the config implies (names as `save_pretrained`
    writes them). Used to check an HF directory before anything is converted or written."""
    h, hd, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    qwen2 = cfg.architecture == "qwen2_moe"
    tied = bool(cfg.tie_word_embeddings)
    out: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nq * hd, h), p + "self_attn.k_proj.weight": (nkv * hd, h),
            p + "self_attn.v_proj.weight": (nkv * hd, h), p + "self_attn.o_proj.weight": (h, nq * hd),
        })
        if qwen2:
            out.update({p + "self_attn.q_proj.bias": (nq * hd,), p + "self_attn.k_proj.bias": (nkv * hd,),
                        p + "self_attn.v_proj.bias": (nkv * hd,)})
        else:
            out.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if i < cfg.first_k_dense_layers:
            f = cfg.ffn_hidden_size
            out.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                        p + "mlp.down_proj.weight": (h, f)})
            continue
        out[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        f = cfg.moe_ffn_hidden_size
        for e in range(cfg.num_experts):
            b = f"{p}mlp.experts.{e}."
            out.update({b + "gate_proj.weight": (f, h), b + "up_proj.weight": (f, h), b + "down_proj.weight": (h, f)})
        if qwen2 and cfg.shared_expert_ffn_hidden_size:
            f = cfg.shared_expert_ffn_hidden_size
            b = f"{p}mlp.shared_expert."
            out.update({b + "gate_proj.weight": (f, h), b + "up_proj.weight": (f, h), b + "down_proj.weight": (h, f),
                        p + "mlp.shared_expert_gate.weight": (1, h)})
    out["model.norm.weight"] = (h,)
    if not tied:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out
