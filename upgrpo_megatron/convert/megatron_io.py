"""Megatron `dist_checkpointing` checkpoints <-> Hugging Face directories (what the two tools run).

Reading a checkpoint needs no model: the checkpoint's own metadata gives every tensor's global shape, and
`dist_checkpointing.load` is asked for a few canonical tensors at a time (an expert is a slice of its layer's
stacked expert tensor), whatever TP/EP layout wrote it. So an export holds one batch of tensors (at most
`batch_bytes`, or one tensor if larger), never the model.

Checkpoint keys vs canonical names (megatron-core 0.16 local spec, kept TE-compatible by megatron):
    decoder.layers.L.input_layernorm.weight          -> decoder.layers.L.self_attention.linear_qkv.layer_norm_weight
    decoder.layers.L.pre_mlp_layernorm.weight        -> decoder.layers.L.mlp.linear_fc1.layer_norm_weight
    decoder.layers.L.mlp.experts.local_experts.E.X   -> decoder.layers.L.mlp.experts.experts.X [E]  (stacked)
    everything else                                  -> the same name
Each lookup falls back to the canonical name itself, so a checkpoint written with another spec still reads.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import yaml

from upgrpo_megatron.convert.hf_io import ConversionError, HFReader, TokenizerFiles, check_output_dir, \
    hf_config_to_model_cfg, write_hf_dir
from upgrpo_megatron.convert.qwen_moe import canonical_names, hf_shapes, megatron_to_hf

_LAYER = re.compile(r"^(decoder\.layers\.\d+\.)(.+)$")
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)local_experts\.(\d+)\.(.+)$")
_KEY_MAP = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
HF_CONFIG_FILE = "hf_config.json"          # the source config.json, kept for token ids on export
HF_GENERATION_FILE = "generation_config.json"


def ckpt_location(name: str, keys) -> Tuple[str, Optional[int]]:
    """Canonical Megatron name -> (checkpoint key, expert index into the stacked tensor or None)."""
    e = _EXPERT.match(name)
    if e:
        stacked = f"{e.group(1)}experts.{e.group(3)}"
        if stacked in keys:
            return stacked, int(e.group(2))
    m = _LAYER.match(name)
    if m and m.group(2) in _KEY_MAP and m.group(1) + _KEY_MAP[m.group(2)] in keys:
        return m.group(1) + _KEY_MAP[m.group(2)], None
    if name in keys:
        return name, None
    raise ConversionError(f"checkpoint has no tensor for '{name}'")


def resolve_checkpoint_dir(path) -> Path:
    """A checkpoint directory, or a run's `checkpoints/` directory (its newest complete checkpoint)."""
    from upgrpo_megatron.megatron.checkpoint import latest_complete_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"checkpoint {p} does not exist")
    if (p / "model").is_dir() or (p / "COMPLETE").exists() or (p / "metadata.json").exists():
        return p
    latest = latest_complete_checkpoint(p, report=None)
    if latest is None:
        raise ConversionError(f"{p} is neither a checkpoint (no model/ directory) nor holds a complete one")
    return latest


def _CachedMetadataLoadStrategy():
    """megatron's torch_dist load strategy, reading the checkpoint's `.metadata` once instead of per load.

    Every `dist_checkpointing.load` builds a new file reader, which unpickles `.metadata` again (0.4 s for
    a 170 MB model here, more for big ones; it was half of an export's time). During one of *our* loads the
    module's reader factory hands out a single cached reader; megatron's code is otherwise unchanged."""
    import megatron.core.dist_checkpointing.strategies.torch as mtorch

    class Strategy(mtorch.TorchDistLoadShardedStrategy):
        _reader = None

        def load(self, sharded_state_dict, checkpoint_dir):
            if self._reader is None:
                self._reader = mtorch.CachedMetadataFileSystemReader(checkpoint_dir)
            factory = mtorch._get_filesystem_reader
            mtorch._get_filesystem_reader = lambda *a, **k: self._reader
            try:
                return super().load(sharded_state_dict, checkpoint_dir)
            finally:
                mtorch._get_filesystem_reader = factory

    return Strategy()


class MegatronCheckpointReader:
    """Canonical tensors from a checkpoint written by `save_checkpoint` (training or conversion), at any
    layout. Needs a torch.distributed process group (a world of one is enough): `dist_checkpointing.load`
    runs the torch DCP load planner, which is collective."""

    def __init__(self, ckpt_dir, *, verify: bool = True):
        from upgrpo_megatron.megatron.checkpoint import verify_checkpoint

        self.dir = resolve_checkpoint_dir(ckpt_dir)
        if verify:
            problem = verify_checkpoint(self.dir)
            if problem is not None:
                raise ConversionError(f"checkpoint {self.dir} cannot be used: {problem}")
        cfg_path = self.dir / "model_config.yaml"
        if not cfg_path.exists():
            raise ConversionError(f"checkpoint {self.dir}: no model_config.yaml (the model section it was saved with)")
        self.model_cfg = yaml.safe_load(cfg_path.read_text()) or {}
        meta = self.dir / "metadata.json"
        self.metadata = json.loads(meta.read_text()) if meta.exists() else {}
        from megatron.core import dist_checkpointing

        from upgrpo_megatron.megatron.parallel import init_distributed

        init_distributed()  # a world of one unless already inside torchrun; after the cheap checks above

        self._strategy = _CachedMetadataLoadStrategy()
        try:
            self._meta = dist_checkpointing.load_tensors_metadata(str(self.dir / "model"))
        except Exception as e:  # unreadable .metadata, missing files
            raise ConversionError(f"checkpoint {self.dir / 'model'}: not a readable dist_checkpointing "
                                  f"directory ({type(e).__name__}: {e})") from None

    def _sharded(self, name: str):
        from megatron.core.dist_checkpointing import ShardedTensor

        key, expert = ckpt_location(name, self._meta)
        full = self._meta[key]
        gshape = tuple(full.global_shape)
        if expert is None:
            return ShardedTensor.from_rank_offsets(key, torch.empty(gshape, dtype=full.dtype), replica_id=0)
        return ShardedTensor.from_rank_offsets(key, torch.empty((1,) + gshape[1:], dtype=full.dtype),
                                               (0, expert, gshape[0]), replica_id=0)

    def nbytes(self, name: str) -> int:
        key, expert = ckpt_location(name, self._meta)
        t = self._meta[key]
        n = t.dtype.itemsize * int(torch.Size(t.global_shape).numel())
        return n // t.global_shape[0] if expert is not None else n

    def load(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Full canonical tensors for `names`, in one checkpoint read."""
        from megatron.core import dist_checkpointing

        request = {n: self._sharded(n) for n in names}
        sliced = {n for n in names if ckpt_location(n, self._meta)[1] is not None}
        try:
            with warnings.catch_warnings():  # megatron 0.16 calls torch DCP's deprecated load_state_dict
                warnings.filterwarnings("ignore", message=".*load_state_dict.*deprecated", category=FutureWarning)
                got = dist_checkpointing.load(request, str(self.dir / "model"), sharded_strategy=self._strategy,
                                              validate_access_integrity=False)
        except Exception as e:
            raise ConversionError(f"checkpoint {self.dir / 'model'}: cannot read {names[0]}"
                                  f"{f' (+{len(names) - 1} more)' if len(names) > 1 else ''} "
                                  f"({type(e).__name__}: {e})") from None
        return {n: got[n][0] if n in sliced else got[n] for n in names}

    def iter_canonical(self, batch_bytes: int = 512 * 1024**2) -> Iterator[Tuple[str, torch.Tensor]]:
        """(canonical name, full tensor) in model order, reading about `batch_bytes` per checkpoint read."""
        batch, size = [], 0
        for name in canonical_names(self.model_cfg):
            n = self.nbytes(name)
            if batch and size + n > batch_bytes:
                yield from self.load(batch).items()
                batch, size = [], 0
            batch.append(name)
            size += n
        if batch:
            yield from self.load(batch).items()

    def tokenizer(self) -> Optional[TokenizerFiles]:
        tok = TokenizerFiles.from_dir(self.dir / "tokenizer")
        return tok if tok else None


def _token_ids(hf_cfg: Dict) -> Dict:
    return {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}


def convert_megatron_to_hf(ckpt_dir, out_dir, *, force: bool = False, max_shard_bytes: int = 2 * 1024**3,
                           batch_bytes: int = 512 * 1024**2, show_progress: bool = True) -> Path:
    """Export a checkpoint (any layout; a training checkpoint's optimizer state is ignored) as an HF dir.
    Single process. Checks the output directory first; writes atomically."""
    from upgrpo_megatron.progress import progress

    check_output_dir(out_dir, force)
    reader = MegatronCheckpointReader(ckpt_dir)
    cfg = reader.model_cfg
    src_cfg = reader.dir / HF_CONFIG_FILE
    extra = _token_ids(json.loads(src_cfg.read_text())) if src_cfg.exists() else {}
    gen_file = reader.dir / HF_GENERATION_FILE
    generation = json.loads(gen_file.read_text()) if gen_file.exists() else None

    def hf_tensors():
        for name, t in reader.iter_canonical(batch_bytes):
            yield from megatron_to_hf(name, t, cfg)

    bar = progress(range(len(hf_shapes(cfg))), desc="megatron -> hf", enabled=show_progress, unit="tensor")
    pbar = bar if hasattr(bar, "update") else None
    try:
        return write_hf_dir(cfg, hf_tensors(), out_dir, tokenizer=reader.tokenizer(), overwrite=force,
                            max_shard_bytes=max_shard_bytes, progress=pbar, hf_config_extra=extra,
                            generation_config=generation)
    finally:
        if pbar is not None:
            pbar.close()


def validate_layout(model_cfg: Dict, tp: int, ep: int, source: str) -> None:
    """The checkpoint must be loadable at the layout asked for: refuse sizes that do not divide."""
    checks = [("num_attention_heads", tp, "tp"), ("num_query_groups", tp, "tp"), ("vocab_size", tp, "tp"),
              ("ffn_hidden_size", tp, "tp"), ("num_experts", ep, "ep")]
    for key, size, flag in checks:
        if int(model_cfg[key]) % size:
            raise ConversionError(f"{source}: {key}={model_cfg[key]} is not divisible by --{flag} {size}")


def convert_hf_to_megatron(hf_dir, out_dir, *, tp: int = 1, ep: int = 1, force: bool = False,
                           show_progress: bool = True) -> Path:
    """HF directory -> `dist_checkpointing` checkpoint (with model_config.yaml, metadata.json, the source
    config and tokenizer files). Everything about the input is checked (config fields, every tensor's name
    and shape, from the safetensors headers) before anything is written.

    As a single process the model is built at TP=EP=1 and saved; the format is layout-free, so the result
    loads at the (validated) --tp/--ep. Under torchrun with world size divisible by tp*ep it is built at
    that layout and each rank writes its shard (memory per rank: its shard of the model)."""
    import torch.distributed as dist

    from upgrpo_megatron.convert import load_hf_into_model
    from upgrpo_megatron.megatron.checkpoint import save_checkpoint
    from upgrpo_megatron.megatron.model import build_gpt_model, build_transformer_config
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel

    out = check_output_dir(out_dir, force)
    reader = HFReader(hf_dir)
    src = str(Path(hf_dir) / "config.json")
    cfg = hf_config_to_model_cfg(reader.config, src)
    validate_layout(cfg, tp, ep, src)
    reader.validate(hf_shapes(cfg))

    _, world = init_distributed()
    if world % (tp * ep) and world > 1:
        raise ConversionError(f"world size {world} is not divisible by --tp {tp} x --ep {ep}")
    btp, bep = (tp, ep) if world > 1 else (1, 1)
    sp = btp > 1
    init_model_parallel(ParallelSizes(tp=btp, ep=bep, sequence_parallel=sp))
    config = build_transformer_config(cfg, tp=btp, ep=bep, sequence_parallel=sp, dtype=cfg["dtype"])
    config.perform_initialization = False  # every weight is overwritten from the HF files
    model = build_gpt_model(cfg, config=config)
    load_hf_into_model(hf_dir, model, cfg, show_progress=show_progress and dist.get_rank() == 0)
    extra_files = {HF_CONFIG_FILE: Path(hf_dir) / "config.json"}
    if (Path(hf_dir) / HF_GENERATION_FILE).exists():
        extra_files[HF_GENERATION_FILE] = Path(hf_dir) / HF_GENERATION_FILE
    tok = TokenizerFiles.from_dir(hf_dir)
    return save_checkpoint(out, model, model_cfg=cfg, tokenizer=tok if tok else None, extra_files=extra_files,
                           extra_state={"source": str(Path(hf_dir).resolve())})
