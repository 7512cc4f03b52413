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

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.convert.errors import ConversionError  # noqa: F401 (re-exported)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")


class TokenizerFiles:
    """Tokenizer files on disk, carried from one directory to another. Has `save_pretrained(dir)` like a
    transformers tokenizer, so the HF and checkpoint writers accept either."""

    def __init__(self, files):
        self.files = [Path(f) for f in files]

    def __bool__(self):
        return bool(self.files)

    def save_pretrained(self, out_dir) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            shutil.copyfile(f, out / f.name)

    @classmethod
    def from_dir(cls, d) -> "TokenizerFiles":
        d = Path(d)
        return cls([d / f for f in TOKENIZER_FILES if (d / f).is_file()])


SUPPORTED = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    return float(hf.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def _refuse_unsupported(hf: Dict[str, Any], source: str) -> None:
    """Fields whose value would change the model's function in a way our Megatron model does not implement.
    Each is refused by name rather than silently converted into a different model."""
    mt = hf["model_type"]
    for key in ("rope_scaling", "rope_parameters"):
        rp = hf.get(key)
        if isinstance(rp, dict) and rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
            raise ConversionError(f"{source}: {key}={rp!r} is not supported (only default RoPE)")
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not supported")
    bad_layers = sorted({t for t in (hf.get("layer_types") or []) if t != "full_attention"})
    if bad_layers:
        raise ConversionError(f"{source}: layer_types={bad_layers} is not supported (only full_attention)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{source}: hidden_act='{act}' is not supported (only silu)")
    if mt == "qwen3_moe" and hf.get("attention_bias"):
        raise ConversionError(f"{source}: attention_bias=true is not supported for qwen3_moe")
    if mt == "qwen2_moe" and hf.get("qkv_bias") is False:
        raise ConversionError(f"{source}: qkv_bias=false is not supported for qwen2_moe")
    if int(hf.get("decoder_sparse_step", 1)) != 1:
        raise ConversionError(f"{source}: decoder_sparse_step={hf['decoder_sparse_step']} is not supported (only 1)")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ConversionError(f"{source}: mlp_only_layers={dense} is not supported (only a prefix 0..k-1)")
    if hf.get("num_hidden_layers") is not None and len(dense) >= int(hf["num_hidden_layers"]):
        raise ConversionError(f"{source}: mlp_only_layers={dense} leaves no MoE layer")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "moe_intermediate_size",
                "num_experts_per_tok"):
        if key not in hf:
            raise ConversionError(f"{source}: required field '{key}' is missing")
    if "num_experts" not in hf and "num_local_experts" not in hf:
        raise ConversionError(f"{source}: required field 'num_experts' is missing")


def _model_dtype(hf: Dict[str, Any], source: str) -> str:
    name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    if name not in ("float32", "bfloat16"):
        raise ConversionError(f"{source}: dtype='{name}' is not supported (float32 or bfloat16)")
    return "bf16" if name == "bfloat16" else "fp32"


def hf_config_to_model_cfg(hf: Dict[str, Any], source: str = "config.json") -> ModelConfig:
    """HF config.json -> the recipe's `model:` section (the fields the HF config fixes; the others keep their
    defaults). Unsupported features are refused by name."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        archs = hf.get("architectures")
        raise ConversionError(f"{source}: unsupported architecture model_type='{mt}'"
                              f"{f' ({archs[0]})' if archs else ''} (supported: {', '.join(SUPPORTED)})")
    _refuse_unsupported(hf, source)
    dense = sorted(hf.get("mlp_only_layers") or [])
    heads = int(hf["num_attention_heads"])
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0) if mt == "qwen2_moe" else 0
    cfg = ModelConfig(
        architecture=mt,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads", heads)),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        ffn_hidden_size=int(hf.get("intermediate_size", hf.get("moe_intermediate_size"))),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        num_experts=int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]),
        moe_router_topk=int(hf["num_experts_per_tok"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", mt == "qwen3_moe")),
        first_k_dense_layers=len(dense),
        shared_expert_ffn_hidden_size=shared,
        rope_theta=_rope_theta(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe_aux_loss_coeff=0.0,
        dtype=_model_dtype(hf, source),
    )
    if mt == "qwen2_moe" and cfg.head_dim * heads != cfg.hidden_size:
        raise ConversionError(f"{source}: qwen2_moe needs head_dim * num_attention_heads == hidden_size")
    return cfg


def _hf_dtype_name(cfg: ModelConfig) -> str:
    return "bfloat16" if cfg.dtype == "bf16" else "float32"


def model_cfg_to_hf_config(cfg: ModelConfig, tokenizer=None) -> Dict[str, Any]:
    arch = cfg.architecture
    hf = {
        "architectures": [SUPPORTED[arch]],
        "model_type": arch,
        "vocab_size": int(cfg.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "num_hidden_layers": int(cfg.num_layers),
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(cfg.num_query_groups),
        "head_dim": int(cfg.head_dim),
        "intermediate_size": int(cfg.ffn_hidden_size),
        "moe_intermediate_size": int(cfg.moe_ffn_hidden_size),
        "num_experts": int(cfg.num_experts),
        "num_experts_per_tok": int(cfg.moe_router_topk),
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(int(cfg.first_k_dense_layers))),
        "rope_theta": float(cfg.rope_theta),
        "rms_norm_eps": float(cfg.norm_epsilon),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2_moe",
        "use_sliding_window": False,
        "output_router_logits": False,
        "router_aux_loss_coef": float(cfg.moe_aux_loss_coeff),
        # transformers 5 reads "dtype" (4.x "torch_dtype"); RoPE as both the 5.x and the legacy field
        "dtype": _hf_dtype_name(cfg),
        "torch_dtype": _hf_dtype_name(cfg),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "initializer_range": float(cfg.init_std),
    }
    if arch == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = int(cfg.shared_expert_ffn_hidden_size)
        hf["qkv_bias"] = True
    from upgrpo_megatron.convert.token_ids import special_token_ids

    hf.update(special_token_ids(tokenizer))  # a live tokenizer or the files a checkpoint carries: same ids
    return hf


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class _MappedSafetensors:
    """A safetensors file mapped into memory: `view(name)` is the tensor over the file's bytes, no copy.

    The mapping is copy-on-write and private, so writing into a view never changes the file. The header was
    already validated by `safe_open`; this re-reads only the offsets it does not expose."""

    def __init__(self, path: Path):
        import mmap
        import struct

        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
            self.base = 8 + n
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None

    def view(self, name: str) -> Optional[torch.Tensor]:
        """The tensor, or None when this reader does not map it (an unknown dtype: safe_open reads it)."""
        meta = self.header.get(name)
        dtype = _SAFETENSORS_DTYPES.get(meta["dtype"]) if meta else None
        if dtype is None or self.mm is None:
            return None
        start, end = meta["data_offsets"]
        shape = tuple(meta["shape"])
        if end - start != dtype.itemsize * int(torch.Size(shape).numel()) or self.base + end > len(self.mm):
            return None
        if end == start:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - start, offset=self.base + start)
        return flat.view(dtype).reshape(shape)


class HFReader:
    """Lazy access to the tensors of an HF directory (single file or sharded with an index). Tensors are views
    of the memory-mapped files (read as they are used, never copied here)."""

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
        self._maps: Dict[str, _MappedSafetensors] = {}

    def keys(self):
        return self.where.keys()

    def shape(self, name: str) -> Tuple[int, ...]:
        """Shape from the safetensors header (no tensor bytes are read)."""
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor '{name}' is missing")
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def validate(self, expected: Dict[str, Tuple[int, ...]]) -> None:
        """Every expected tensor is present with the expected shape and nothing else is there. Reads only
        the safetensors headers, so a bad directory is refused before anything is converted or written."""
        for name, shape in expected.items():
            got = self.shape(name)
            if got != tuple(shape):
                raise ConversionError(f"{self.dir / self.where[name]}: tensor '{name}' has shape {list(got)}, "
                                      f"config.json implies {list(shape)}")
        extra = sorted(k for k in self.where if k not in expected and not k.endswith("rotary_emb.inv_freq"))
        if extra:
            raise ConversionError(f"{self.dir / self.where[extra[0]]}: tensor '{extra[0]}' is not part of the "
                                  f"{self.config.get('model_type')} architecture described by config.json"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    def tokenizer_files(self) -> list:
        """Tokenizer files of this directory (copied along by the converters)."""
        return [self.dir / f for f in TOKENIZER_FILES if (self.dir / f).is_file()]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConversionError(f"{self.dir}: tensor '{name}' is missing")
        f = self.where[name]
        try:
            if f not in self._maps:
                self._maps[f] = _MappedSafetensors(self.dir / f)
            t = self._maps[f].view(name)
            return t if t is not None else self._handles[f].get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{self.dir / self.where[name]}: cannot read tensor '{name}' ({e})") from None


def _dtype_of(cfg: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def check_output_dir(out_dir, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless `overwrite` (nothing is written either way)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty (use --force to replace it)")
    return out


def write_hf_dir(cfg: ModelConfig, tensors: Iterator[Tuple[str, torch.Tensor]], out_dir, *, tokenizer=None,
                 overwrite: bool = False, max_shard_bytes: int = 2 * 1024**3, progress=None,
                 hf_config_extra: Optional[Dict[str, Any]] = None,
                 generation_config: Optional[Dict[str, Any]] = None) -> Path:
    """Stream HF-named tensors into `out_dir` (config.json, generation_config.json, safetensors, tokenizer).

    The tensor set and shapes come from the architecture's mapping (`hf_shapes`), so the safetensors headers
    are written first and each tensor is written to disk as it arrives: memory holds one tensor group, not a
    shard. One `model.safetensors` up to `max_shard_bytes`, above that `model-0000i-of-0000n.safetensors`
    with `model.safetensors.index.json`. Refuses a non-empty `out_dir` unless `overwrite`; writes into a
    temporary sibling and renames it, so a failure leaves nothing behind. `hf_config_extra` (token ids)
    is merged into config.json; `generation_config` replaces the default generation_config.json.
    """
    from upgrpo_megatron.convert.qwen_moe import hf_shapes
    from upgrpo_megatron.convert.safetensors_stream import StreamedSafetensors, StreamedShardsError, plan_shards

    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    writer = None
    try:
        dtype = _dtype_of(cfg)
        planned = plan_shards(list(hf_shapes(cfg).items()), dtype, max_shard_bytes)
        n = len(planned)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        writer = StreamedSafetensors(tmp, list(zip(names, planned)), dtype)
        try:
            for name, t in tensors:
                writer.write(name, t)
                if progress is not None:
                    progress.update(1)
            writer.close()
        except StreamedShardsError as e:
            raise ConversionError(f"writing {out}: {e}") from None
        if n > 1:
            weight_map = {k: f for f, shard in zip(names, planned) for k, _ in shard}
            total = sum(dtype.itemsize * int(torch.Size(s).numel()) for shard in planned for _, s in shard)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf_cfg = model_cfg_to_hf_config(cfg, tokenizer)
        hf_cfg.update(hf_config_extra or {})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if generation_config is None:
            gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
            generation_config = {**gen, "do_sample": True}
        (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the export is an ordinary directory
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
