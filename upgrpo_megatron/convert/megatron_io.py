"""Megatron `dist_checkpointing` checkpoints <-> Hugging Face directories (what the two tools run).

Neither direction builds a model or goes through megatron's `dist_checkpointing` machinery when it runs as
one process: `torch_dist/` streams tensors between the safetensors and the checkpoint's `.distcp` files (the
format megatron reads and writes, tested against megatron's own save), so a conversion moves bytes at close to
the speed of a plain copy. Reading works at whatever TP/EP layout wrote the checkpoint (an expert is a slice of
its layer's stacked expert tensor) and holds one batch of tensors (at most `batch_bytes`, or one tensor if
larger), never the model. A checkpoint the direct reader cannot decode is read through
`dist_checkpointing.load` instead; HF -> Megatron under torchrun (world size > 1) builds the model at the
asked layout and saves it with `dist_checkpointing` (each rank writes its shard).

Checkpoint keys vs canonical names (megatron-core 0.16 local spec, kept TE-compatible by megatron):
    decoder.layers.L.input_layernorm.weight          -> decoder.layers.L.self_attention.linear_qkv.layer_norm_weight
    decoder.layers.L.pre_mlp_layernorm.weight        -> decoder.layers.L.mlp.linear_fc1.layer_norm_weight
    decoder.layers.L.mlp.experts.local_experts.E.X   -> decoder.layers.L.mlp.experts.experts.X [E]  (stacked)
    everything else                                  -> the same name
Each lookup falls back to the canonical name itself, so a checkpoint written with another spec still reads.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from upgrpo_megatron.config import ModelConfig, read_model_config
from upgrpo_megatron.convert import torch_dist
from upgrpo_megatron.convert.hf_io import (
    ConversionError,
    HFReader,
    TokenizerFiles,
    check_output_dir,
    hf_config_to_model_cfg,
    write_hf_dir,
)
from upgrpo_megatron.convert.qwen_moe import canonical_names, hf_shapes, hf_sources, hf_to_megatron, megatron_to_hf

HF_CONFIG_FILE = "hf_config.json"          # the source config.json, kept for token ids on export
HF_GENERATION_FILE = "generation_config.json"


def ckpt_location(name: str, keys) -> Tuple[str, Optional[int]]:
    """Canonical Megatron name -> (checkpoint key, expert index into the stacked tensor or None); a name the
    checkpoint holds as itself (another spec's naming) is found too."""
    key, expert = torch_dist.checkpoint_key(name)
    if key in keys:
        return key, expert
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


class _DirectSource:
    """Canonical tensors read straight from the `.distcp` files (views of their memory maps). A SwiGLU
    `linear_fc1` comes as its [gate, up] row blocks: the checkpoint stores them as two chunks, so each is a
    view, and the export writes them as two HF tensors anyway (no concatenated copy is made)."""

    def __init__(self, model_dir: Path):
        self.reader = torch_dist.TorchDistReader(model_dir)
        self.keys = self.reader.tensors

    def load(self, names: List[str]) -> Dict[str, object]:
        out = {}
        for n in names:
            key, expert = ckpt_location(n, self.keys)
            gshape = self.reader.global_shape(key)
            lead = () if expert is None else (expert,)
            shape = gshape if expert is None else gshape[1:]
            rest = (0,) * (len(shape) - 1)
            if n.endswith("linear_fc1.weight") and shape[0] % 2 == 0:
                half = shape[0] // 2
                size = (1,) * len(lead) + (half, *shape[1:])
                out[n] = [self.reader.read(key, lead + (r,) + rest, size).reshape(half, *shape[1:])
                          for r in (0, half)]
            else:
                size = (1,) * len(lead) + tuple(shape)
                out[n] = self.reader.read(key, lead + (0,) + rest, size).reshape(shape)
        return out


class _DcpSource:
    """Canonical tensors through megatron's `dist_checkpointing.load` (needs a process group; a world of one
    is enough): the fallback for checkpoints `TorchDistReader` does not decode."""

    def __init__(self, model_dir: Path):
        from megatron.core import dist_checkpointing

        from upgrpo_megatron.megatron.parallel import init_distributed

        init_distributed()
        self.dir = model_dir
        self._strategy = _CachedMetadataLoadStrategy()
        try:
            self.keys = dist_checkpointing.load_tensors_metadata(str(model_dir))
        except Exception as e:  # unreadable .metadata, missing files
            raise ConversionError(f"checkpoint {model_dir}: not a readable dist_checkpointing "
                                  f"directory ({type(e).__name__}: {e})") from None

    def _sharded(self, name: str):
        from megatron.core.dist_checkpointing import ShardedTensor

        key, expert = ckpt_location(name, self.keys)
        full = self.keys[key]
        gshape = tuple(full.global_shape)
        if expert is None:
            return ShardedTensor.from_rank_offsets(key, torch.empty(gshape, dtype=full.dtype), replica_id=0)
        return ShardedTensor.from_rank_offsets(key, torch.empty((1,) + gshape[1:], dtype=full.dtype),
                                               (0, expert, gshape[0]), replica_id=0)

    def load(self, names: List[str]) -> Dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        request = {n: self._sharded(n) for n in names}
        sliced = {n for n in names if ckpt_location(n, self.keys)[1] is not None}
        with warnings.catch_warnings():  # megatron 0.16 calls torch DCP's deprecated load_state_dict
            warnings.filterwarnings("ignore", message=".*load_state_dict.*deprecated", category=FutureWarning)
            got = dist_checkpointing.load(request, str(self.dir), sharded_strategy=self._strategy,
                                          validate_access_integrity=False)
        return {n: got[n][0] if n in sliced else got[n] for n in names}


class _Verification:
    """The checkpoint's checksums (COMPLETE: the sha256 of every file) checked in background threads, one per
    large file, so that hashing overlaps with reading and converting (and large files hash in parallel).
    A missing or unreadable COMPLETE, or a missing file, is refused at once."""

    def __init__(self, path: Path, threads: int = 2):
        self.path = path
        self.problem: Optional[str] = None
        marker = path / "COMPLETE"
        if not marker.exists():
            self._refuse("no COMPLETE marker (the write did not finish)")
        try:
            sums = json.loads(marker.read_text())
        except json.JSONDecodeError:
            self._refuse("COMPLETE marker is unreadable")
        for rel in sums:
            if not (path / rel).exists():
                self._refuse(f"{rel} is missing")
        # largest first, spread over the threads
        order = sorted(sums, key=lambda rel: -(path / rel).stat().st_size)
        self._threads = [threading.Thread(target=self._check, args=(order[i::threads], sums),
                                          name="checkpoint-verify", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def _check(self, rels: List[str], sums: Dict[str, str]) -> None:
        from upgrpo_megatron.megatron.checkpoint import sha256_file

        for rel in rels:
            if self.problem is not None:
                return
            if sha256_file(self.path / rel) != sums[rel]:
                self.problem = f"{rel} does not match its checksum"

    def _refuse(self, problem: str) -> None:
        raise ConversionError(f"checkpoint {self.path} cannot be used: {problem}")

    def check(self) -> None:
        """Wait for the hashes; a mismatch raises ConversionError."""
        for t in self._threads:
            t.join()
        if self.problem is not None:
            self._refuse(self.problem)


class MegatronCheckpointReader:
    """Canonical tensors from a checkpoint written by `save_checkpoint` (training or conversion), at any
    layout. Reads the `.distcp` files directly (`direct=True`) or through `dist_checkpointing.load`.

    With `verify`, the checksums are checked while the tensors are read: `verified()` waits for the result
    and raises if any file does not match (an export calls it before its output is moved into place)."""

    def __init__(self, ckpt_dir, *, verify: bool = True, direct: bool = True):
        self.dir = resolve_checkpoint_dir(ckpt_dir)
        self._verification = _Verification(self.dir) if verify else None
        try:
            self._open(direct)
        except Exception:
            self.verified()  # a corrupt checkpoint is reported as such, not by the error it caused
            raise

    def verified(self) -> None:
        if self._verification is not None:
            self._verification.check()

    def _open(self, direct: bool) -> None:
        cfg_path = self.dir / "model_config.yaml"
        if not cfg_path.exists():
            raise ConversionError(f"checkpoint {self.dir}: no model_config.yaml (the model section it was saved with)")
        self.model_cfg = read_model_config(cfg_path)
        meta = self.dir / "metadata.json"
        self.metadata = json.loads(meta.read_text()) if meta.exists() else {}
        self._source = _DirectSource(self.dir / "model") if direct else _DcpSource(self.dir / "model")
        self._meta = self._source.keys

    def nbytes(self, name: str) -> int:
        key, expert = ckpt_location(name, self._meta)
        t = self._meta[key]
        gshape = tuple(getattr(t, "global_shape", None) or t.size)
        dtype = t.dtype if hasattr(t, "dtype") else t.properties.dtype
        n = dtype.itemsize * int(torch.Size(gshape).numel())
        return n // gshape[0] if expert is not None else n

    def load(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """Full canonical tensors for `names`, in one checkpoint read."""
        try:
            return self._source.load(names)
        except torch_dist.UnsupportedCheckpoint:
            raise
        except ConversionError:
            self.verified()
            raise
        except Exception as e:
            self.verified()
            raise ConversionError(f"checkpoint {self.dir / 'model'}: cannot read {names[0]}"
                                  f"{f' (+{len(names) - 1} more)' if len(names) > 1 else ''} "
                                  f"({type(e).__name__}: {e})") from None

    def iter_canonical(self, batch_bytes: int = 512 * 1024**2) -> Iterator[Tuple[str, object]]:
        """(canonical name, full tensor) in model order, reading about `batch_bytes` per checkpoint read; the
        direct reader gives a SwiGLU `linear_fc1` as the list of its [gate, up] row blocks instead."""
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
    check_output_dir(out_dir, force)
    try:
        with torch_dist.no_cyclic_gc():
            reader = MegatronCheckpointReader(ckpt_dir)
            return _export(reader, out_dir, force, max_shard_bytes, batch_bytes, show_progress)
    except torch_dist.UnsupportedCheckpoint as e:  # written by something newer/other than we decode: megatron reads it
        path = resolve_checkpoint_dir(ckpt_dir)
        if show_progress:
            print(f"note: {e}; reading {path} through dist_checkpointing instead")
        reader = MegatronCheckpointReader(path, direct=False)
        return _export(reader, out_dir, force, max_shard_bytes, batch_bytes, show_progress)


def _export(reader: MegatronCheckpointReader, out_dir, force: bool, max_shard_bytes: int, batch_bytes: int,
            show_progress: bool) -> Path:
    from upgrpo_megatron.progress import progress

    cfg = reader.model_cfg
    src_cfg = reader.dir / HF_CONFIG_FILE
    extra = _token_ids(json.loads(src_cfg.read_text())) if src_cfg.exists() else {}
    gen_file = reader.dir / HF_GENERATION_FILE
    generation = json.loads(gen_file.read_text()) if gen_file.exists() else None

    def hf_tensors():
        for name, t in reader.iter_canonical(batch_bytes):
            if isinstance(t, list):  # row blocks of a fusion by concatenation: the HF sources, in order
                yield from zip(hf_sources(name, cfg), t)
            else:
                yield from megatron_to_hf(name, t, cfg)
        reader.verified()  # before write_hf_dir moves the export into place

    bar = progress(range(len(hf_shapes(cfg))), desc="megatron -> hf", enabled=show_progress, unit="tensor")
    pbar = bar if hasattr(bar, "update") else None
    try:
        return write_hf_dir(cfg, hf_tensors(), out_dir, tokenizer=reader.tokenizer(), overwrite=force,
                            max_shard_bytes=max_shard_bytes, progress=pbar, hf_config_extra=extra,
                            generation_config=generation)
    finally:
        if pbar is not None:
            pbar.close()


def validate_layout(model_cfg: ModelConfig, tp: int, ep: int, source: str) -> None:
    """The checkpoint must be loadable at the layout asked for: refuse sizes that do not divide."""
    checks = [("num_attention_heads", tp, "tp"), ("num_query_groups", tp, "tp"), ("vocab_size", tp, "tp"),
              ("ffn_hidden_size", tp, "tp"), ("num_experts", ep, "ep")]
    for key, size, flag in checks:
        if int(getattr(model_cfg, key)) % size:
            raise ConversionError(f"{source}: {key}={getattr(model_cfg, key)} is not divisible by --{flag} {size}")


def convert_hf_to_megatron(hf_dir, out_dir, *, tp: int = 1, ep: int = 1, force: bool = False,
                           show_progress: bool = True) -> Path:
    """HF directory -> `dist_checkpointing` checkpoint (with model_config.yaml, metadata.json, the source
    config and tokenizer files). Everything about the input is checked (config fields, every tensor's name
    and shape, from the safetensors headers) before anything is written.

    As a single process the tensors stream from the safetensors into the checkpoint's files (no model is
    built; memory holds one tensor group); the format is layout-free, so the result loads at the (validated)
    --tp/--ep. Under torchrun with world size divisible by tp*ep the model is built at that layout and each
    rank writes its shard (memory per rank: its shard of the model)."""
    out = check_output_dir(out_dir, force)
    reader = HFReader(hf_dir)
    src = str(Path(hf_dir) / "config.json")
    cfg = hf_config_to_model_cfg(reader.config, src)
    validate_layout(cfg, tp, ep, src)
    reader.validate(hf_shapes(cfg))
    extra_files = {HF_CONFIG_FILE: Path(hf_dir) / "config.json"}
    if (Path(hf_dir) / HF_GENERATION_FILE).exists():
        extra_files[HF_GENERATION_FILE] = Path(hf_dir) / HF_GENERATION_FILE
    tok = TokenizerFiles.from_dir(hf_dir)
    extra_state = {"source": str(Path(hf_dir).resolve())}
    if _world_size() > 1:
        return _convert_in_parallel(hf_dir, out, cfg, tp, ep, extra_files, tok, extra_state, show_progress)
    with torch_dist.no_cyclic_gc():
        return _convert_streaming(reader, out, cfg, extra_files, tok, extra_state, show_progress)


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _convert_streaming(reader: HFReader, out: Path, cfg: ModelConfig, extra_files: Dict, tok, extra_state: Dict,
                       show_progress: bool) -> Path:
    """One process: canonical tensors go from the HF files straight into the checkpoint's `.distcp` file
    (hashed as it is written), then the checkpoint directory is completed and renamed into place."""
    from upgrpo_megatron.megatron.checkpoint import begin_checkpoint, finish_checkpoint
    from upgrpo_megatron.progress import progress

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    tmp = begin_checkpoint(out)
    try:
        bar = progress(_hf_as_megatron_rows(reader, cfg), desc="hf -> megatron", enabled=show_progress,
                       unit="tensor", total=len(canonical_names(cfg)))
        sums = torch_dist.write_model(tmp / "model", cfg, dtype, bar)
        return finish_checkpoint(tmp, out, layout={"world_size": 1, "tp": 1, "ep": 1, "etp": 1},
                                 extra_state=extra_state, model_cfg=cfg, tokenizer=tok if tok else None,
                                 extra_files=extra_files, known_sums=sums)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hf_as_megatron_rows(reader: HFReader, cfg: ModelConfig):
    """(canonical name, tensor) from the HF files; a SwiGLU `linear_fc1` as its [gate, up] row blocks (the
    mapping's fusion is their concatenation, and the checkpoint stores them as two chunks anyway)."""
    for name in canonical_names(cfg):
        srcs = hf_sources(name, cfg)
        if name.endswith("linear_fc1.weight") and len(srcs) == 2:
            yield name, [reader.get(s) for s in srcs]
        else:
            yield name, hf_to_megatron(name, reader.get, cfg)


def _convert_in_parallel(hf_dir, out: Path, cfg: ModelConfig, tp: int, ep: int, extra_files: Dict, tok,
                         extra_state: Dict, show_progress: bool) -> Path:
    """Under torchrun: the model built at TP x EP, every rank loading and saving its shard."""
    import torch.distributed as dist

    from upgrpo_megatron.convert import load_hf_into_model
    from upgrpo_megatron.megatron.checkpoint import save_checkpoint
    from upgrpo_megatron.megatron.model import build_gpt_model, build_transformer_config
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel

    _, world = init_distributed()
    if world % (tp * ep):
        raise ConversionError(f"world size {world} is not divisible by --tp {tp} x --ep {ep}")
    sp = tp > 1
    init_model_parallel(ParallelSizes(tp=tp, ep=ep, sequence_parallel=sp))
    config = build_transformer_config(cfg, tp=tp, ep=ep, sequence_parallel=sp, dtype=cfg.dtype)
    config.perform_initialization = False  # every weight is overwritten from the HF files
    model = build_gpt_model(cfg, config=config)
    load_hf_into_model(hf_dir, model, cfg, show_progress=show_progress and dist.get_rank() == 0)
    return save_checkpoint(out, model, model_cfg=cfg, tokenizer=tok if tok else None, extra_files=extra_files,
                           extra_state=extra_state)
