"""Hugging Face <-> Megatron conversion. One mapping per architecture (qwen_moe.py) serves checkpoint
conversion, loading HF weights into the actor, the final export and weight sync to the rollout engine."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.convert.hf_io import (
    ConversionError,
    HFReader,
    TokenizerFiles,
    check_output_dir,
    hf_config_to_model_cfg,
    model_cfg_to_hf_config,
    write_hf_dir,
)
from upgrpo_megatron.convert.qwen_moe import (
    canonical_names,
    hf_shapes,
    hf_sources,
    hf_to_megatron,
    megatron_to_hf,
    megatron_to_hf_stream,
)

_MODEL_KEYS = ("architecture", "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
               "head_dim", "moe_ffn_hidden_size", "num_experts", "moe_router_topk", "first_k_dense_layers",
               "shared_expert_ffn_hidden_size", "tie_word_embeddings",
               # same shapes, another function: these would load silently into a model that computes otherwise
               "norm_topk_prob", "rope_theta", "norm_epsilon")


def check_compatible(hf_cfg: ModelConfig, model_cfg: ModelConfig, source: str) -> None:
    """The HF model must have the architecture the recipe describes."""
    for k in _MODEL_KEYS:
        a, b = getattr(hf_cfg, k), getattr(model_cfg, k)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same and not (k == "first_k_dense_layers" and not a and not b):
            raise ConversionError(f"{source}: {k}={a!r} does not match the recipe's model.{k}={b!r}")


def iter_hf_as_megatron(reader: HFReader, model_cfg: ModelConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """Canonical Megatron tensors built from an HF directory, one fused group at a time."""
    for name in canonical_names(model_cfg):
        yield name, hf_to_megatron(name, reader.get, model_cfg)


def load_hf_into_model(hf_dir, module, model_cfg: Optional[ModelConfig] = None, *,
                       show_progress: bool = False) -> ModelConfig:
    """Load an HF checkpoint into this rank's shards of `module`, one fused tensor group at a time.

    The directory is checked first (config fields, every tensor's presence and shape, from the safetensors
    headers only), so a bad one is refused before any weight changes. Returns the model section."""
    from upgrpo_megatron.megatron.sharding import load_full_tensor
    from upgrpo_megatron.progress import progress

    reader = HFReader(hf_dir)
    hf_model_cfg = hf_config_to_model_cfg(reader.config, str(Path(hf_dir) / "config.json"))
    if model_cfg is not None:
        check_compatible(hf_model_cfg, model_cfg, str(Path(hf_dir) / "config.json"))
    reader.validate(hf_shapes(hf_model_cfg))
    params = dict(module.named_parameters())
    names = canonical_names(hf_model_cfg)
    for name in progress(names, desc="hf -> megatron", enabled=show_progress, unit="tensor"):
        srcs = hf_sources(name, hf_model_cfg)
        tensor = hf_to_megatron(name, reader.get, hf_model_cfg)
        try:
            load_full_tensor(module, name, tensor, params)
        except ValueError:
            raise ConversionError(f"{hf_dir}: tensor {' + '.join(srcs)} has a shape that does not fit the config "
                                  f"(built {tuple(tensor.shape)} for '{name}')") from None
    return hf_model_cfg


def save_hf_checkpoint(model_cfg: ModelConfig, hf_tensors: Iterator[Tuple[str, torch.Tensor]], out_dir, *,
                       tokenizer=None, overwrite: bool = False, **kw) -> Path:
    """Write HF-named tensors (e.g. `megatron_to_hf_stream(cfg, iter_full_params(model))`) as an HF dir."""
    return write_hf_dir(model_cfg, hf_tensors, out_dir, tokenizer=tokenizer, overwrite=overwrite, **kw)


__all__ = [
    "ConversionError", "HFReader", "TokenizerFiles", "canonical_names", "check_compatible", "check_output_dir",
    "hf_config_to_model_cfg", "hf_shapes", "hf_sources", "hf_to_megatron", "iter_hf_as_megatron", "load_hf_into_model",
    "megatron_to_hf", "megatron_to_hf_stream", "model_cfg_to_hf_config", "save_hf_checkpoint", "write_hf_dir",
]
