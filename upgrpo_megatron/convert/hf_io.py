"""Hugging Face directories: config.json <-> the recipe's model section, and streamed safetensors I/O.

Reading is lazy (one tensor at a time through `safe_open`); writing streams tensors into shards of at most
`max_shard_bytes` (an index file when there is more than one), into a temporary directory that is renamed
into place at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch


class ConversionError(ValueError):
    """A checkpoint or HF directory cannot be converted; the message names the file or tensor."""


SUPPORTED = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def hf_config_to_model_cfg(hf: Dict[str, Any], source: str = "config.json") -> Dict[str, Any]:
    """HF config.json -> the recipe's `model:` section. Unsupported features are refused by name."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ConversionError(f"{source}: unsupported architecture model_type='{mt}' (supported: {', '.join(SUPPORTED)})")
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not supported")
    rs = hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if rs not in (None, "default") and rs != {}:
        raise ConversionError(f"{source}: rope_scaling={rs!r} is not supported")
    if int(hf.get("decoder_sparse_step", 1)) != 1:
        raise ConversionError(f"{source}: decoder_sparse_step={hf['decoder_sparse_step']} is not supported (only 1)")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ConversionError(f"{source}: mlp_only_layers={dense} is not supported (only a prefix 0..k-1)")
    heads = int(hf["num_attention_heads"])
    cfg = {
        "architecture": mt,
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": int(hf["hidden_size"]),
        "num_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads", heads)),
        "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // heads),
        "ffn_hidden_size": int(hf.get("intermediate_size", hf.get("moe_intermediate_size"))),
        "moe_ffn_hidden_size": int(hf["moe_intermediate_size"]),
        "num_experts": int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]),
        "moe_router_topk": int(hf["num_experts_per_tok"]),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", mt == "qwen3_moe")),
        "first_k_dense_layers": len(dense),
        "shared_expert_ffn_hidden_size": int(hf.get("shared_expert_intermediate_size", 0) or 0) if mt == "qwen2_moe" else 0,
        "rope_theta": _rope_theta(hf),
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(hf.get("max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "moe_aux_loss_coeff": 0.0,
        "dtype": "bf16" if str(hf.get("torch_dtype") or hf.get("dtype") or "float32") in ("bfloat16", "torch.bfloat16") else "fp32",
    }
    if mt == "qwen2_moe" and cfg["head_dim"] * heads != cfg["hidden_size"]:
        raise ConversionError(f"{source}: qwen2_moe needs head_dim * num_attention_heads == hidden_size")
    return cfg


def _g(cfg, k, d=None):
    return cfg.get(k, d) if isinstance(cfg, dict) else getattr(cfg, k, d)


def model_cfg_to_hf_config(cfg, tokenizer=None) -> Dict[str, Any]:
    arch = _g(cfg, "architecture", "qwen3_moe")
    n_dense = int(_g(cfg, "first_k_dense_layers", 0) or 0)
    hf = {
        "architectures": [SUPPORTED[arch]],
        "model_type": arch,
        "vocab_size": int(_g(cfg, "vocab_size")),
        "hidden_size": int(_g(cfg, "hidden_size")),
        "num_hidden_layers": int(_g(cfg, "num_layers")),
        "num_attention_heads": int(_g(cfg, "num_attention_heads")),
        "num_key_value_heads": int(_g(cfg, "num_query_groups")),
        "head_dim": int(_g(cfg, "head_dim")),
        "intermediate_size": int(_g(cfg, "ffn_hidden_size")),
        "moe_intermediate_size": int(_g(cfg, "moe_ffn_hidden_size")),
        "num_experts": int(_g(cfg, "num_experts")),
        "num_experts_per_tok": int(_g(cfg, "moe_router_topk")),
        "norm_topk_prob": bool(_g(cfg, "norm_topk_prob", True)),
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(n_dense)),
        "rope_theta": float(_g(cfg, "rope_theta", 1e6)),
        "rms_norm_eps": float(_g(cfg, "norm_epsilon", 1e-6)),
        "max_position_embeddings": int(_g(cfg, "max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(_g(cfg, "tie_word_embeddings", False)),
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2_moe",
        "use_sliding_window": False,
        "output_router_logits": False,
        "router_aux_loss_coef": float(_g(cfg, "moe_aux_loss_coeff", 0.0) or 0.0),
        "torch_dtype": "bfloat16" if _g(cfg, "dtype", "fp32") == "bf16" else "float32",
        "initializer_range": float(_g(cfg, "init_std", 0.02)),
    }
    if arch == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = int(_g(cfg, "shared_expert_ffn_hidden_size", 0) or 0)
        hf["qkv_bias"] = True
    if tokenizer is not None:
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, k, None) is not None:
                hf[k] = int(getattr(tokenizer, k))
    return hf


class HFReader:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index)."""

    def __init__(self, hf_dir):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            raise ConversionError(f"{self.dir}: no config.json (is this a Hugging Face model directory?)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{cfg_path}: invalid JSON ({e.msg})") from None
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").exists():
            weight_map = None
        else:
            raise ConversionError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.where: Dict[str, str] = {}
        for f in files:
            path = self.dir / f
            if not path.exists():
                raise ConversionError(f"{path}: listed in the index but missing")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:
                raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
            self._handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def keys(self):
        return self.where.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor '{name}' is missing")
        try:
            return self._handles[self.where[name]].get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{self.dir / self.where[name]}: cannot read tensor '{name}' ({e})") from None


def _dtype_of(cfg) -> torch.dtype:
    return torch.bfloat16 if _g(cfg, "dtype", "fp32") == "bf16" else torch.float32


def write_hf_dir(cfg, tensors: Iterator[Tuple[str, torch.Tensor]], out_dir, *, tokenizer=None,
                 overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3, progress=None) -> Path:
    """Stream HF-named tensors into `out_dir` (config.json, generation_config.json, safetensors, tokenizer).

    Refuses a non-empty `out_dir` unless `overwrite`; writes into a temporary sibling and renames it.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dtype = _dtype_of(cfg)
        shards, current, size, weight_map = [], {}, 0, {}

        def flush():
            nonlocal current, size
            if current:
                name = f"shard-{len(shards):05d}.safetensors"
                save_file(current, str(tmp / name), metadata={"format": "pt"})
                shards.append((name, list(current)))
                current, size = {}, 0

        for name, t in tensors:
            t = t.detach().to(dtype).contiguous().cpu()
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t.clone() if t.storage_offset() or not t.is_contiguous() else t
            size += nbytes
            if progress is not None:
                progress.update(1)
        flush()
        if len(shards) == 1:
            os.rename(tmp / shards[0][0], tmp / "model.safetensors")
        else:
            total = 0
            for i, (name, keys) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(tmp / name, tmp / final)
                total += (tmp / final).stat().st_size
                weight_map.update({k: final for k in keys})
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf_cfg = model_cfg_to_hf_config(cfg, tokenizer)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
        (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
