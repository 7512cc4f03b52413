"""megatron-core `torch_dist` checkpoints written and read directly, for the conversion tools.

`dist_checkpointing.save/load` go through a model, PyTorch's distributed-checkpoint planners and, for saving,
a helper process started with `spawn` (seconds per save) that forks writers; loading deserialises every chunk
with the weights-only unpickler. For a conversion none of that is needed: the tensors are known in advance and
arrive one at a time. This module streams them straight between safetensors and the checkpoint's files and
keeps the format byte-for-byte what megatron reads (tests compare it with megatron's own save):

    model/metadata.json   {"sharded_backend": "torch_dist", ...}      (megatron's format marker)
    model/common.pt       `torch.save({})`                             (the non-sharded state: none here)
    model/.metadata       pickled DCP `Metadata`: per key its global shape, dtype and chunks; per chunk and
                          per byte object the file, offset and length that hold it
    model/__0_{0,1}.distcp `torch.save` archives one after another: one per chunk or byte object (two files
                          written and hashed in parallel, as megatron's own writer uses two)

The chunks are the ones megatron writes for the model at TP = EP = 1, so loading at any other layout reads
only what it needs: one chunk per tensor, one per expert (experts are stacked under one key per layer), and a
SwiGLU `linear_fc1` in two chunks, gate and up. Every linear layer also has an `_extra_state` byte object
(`torch.save([None])`: no extra state without Transformer Engine).

Reading parses `.metadata` and each archive's `data.pkl` with unpicklers that accept only the classes these
files contain (never code), and maps the tensor bytes from the file without copying them.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import struct
import uuid
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
import torch.distributed.checkpoint.planner as dcp_planner

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.convert.hf_io import ConversionError
from upgrpo_megatron.convert.qwen_moe import canonical_names, hf_shapes, hf_sources
from upgrpo_megatron.convert.safetensors_stream import BackgroundWriter

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
class _HashingFile:
    """A write-only file that hashes what it writes (the checkpoint's COMPLETE needs every file's sha256), both
    in a background thread (see `BackgroundWriter`)."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.pos = 0
        self.writer = BackgroundWriter()

    def write(self, b) -> int:
        n = self.writer.submit(self.f, b, update=self.sha.update)
        self.pos += n
        return n

    def write_parts(self, parts, nbytes: int) -> int:
        """Write the buffers `parts()` returns (called in the writer thread; they total `nbytes`)."""
        self.writer.submit(self.f, parts, update=self.sha.update, nbytes=nbytes)
        self.pos += nbytes
        return nbytes

    def flush(self) -> None:
        pass

    def close(self, fsync: bool = True) -> str:
        try:
            self.writer.close()
            if fsync:
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
        return self.sha.hexdigest()

    def abort(self) -> None:
        self.writer.abort()
        self.f.close()


_CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # a zip central-directory file header (46 bytes)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


_MASK64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t (torch.save folds the records' CRC-32s with it into the archive's
    serialization id)."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _MASK64) + (seed >> 2)) & _MASK64)) & _MASK64


class _ArchiveTemplate:
    """What `torch.save` writes for a contiguous tensor of one dtype and shape, split around the tensor's bytes.

    `torch.save` costs ~1 ms per call (pickler, zip writer, checksums), as much as writing a megabyte. Its
    archive depends on the tensor only through the data record's bytes, their CRC-32 (in the record's data
    descriptor and in the central directory) and the serialization id (the records' CRC-32s folded together,
    stored as the last record, with its own CRC-32). So one `torch.save` of zeros per (dtype, shape) gives
    every other tensor of that kind: head + tensor bytes + tail with those fields recomputed. A probe tensor
    is checked to come out byte-identical to `torch.save`'s own archive; if torch's format ever stops fitting
    this scheme, `usable` is False and the writer calls `torch.save` itself."""

    def __init__(self, dtype: torch.dtype, shape: Tuple[int, ...]):
        self.usable = False
        try:
            self._split(_torch_save_bytes(torch.zeros(shape, dtype=dtype)))
            probe = torch.zeros(shape, dtype=dtype)
            if probe.numel():
                probe.view(-1)[-1] = 1  # other data, other CRCs and serialization id
            self.usable = b"".join(bytes(p) for p in self.parts(probe)) == _torch_save_bytes(probe)
        except (ValueError, KeyError, zipfile.BadZipFile, struct.error):
            self.usable = False

    def _split(self, raw: bytes) -> None:
        z = zipfile.ZipFile(io.BytesIO(raw))
        infos = z.infolist()
        data = [i for i in infos if "/data/" in i.filename and not i.filename.endswith(".pkl")]
        if len(data) != 1 or data[0].compress_type != zipfile.ZIP_STORED or not data[0].flag_bits & 0x08:
            raise ValueError("unexpected torch.save archive layout")
        info = data[0]
        start = _record_start(raw, info)
        end = start + info.file_size
        self.head, self.tail = raw[:start], raw[end:]
        self.nbytes = len(raw)
        # field offsets in the tail: [data descriptor CRC, central-directory CRC] per patched record
        self.data_crc_at = self._crc_fields(raw, z, info, end)
        sid = [i for i in infos if i.filename.endswith("/.data/serialization_id")]
        self.crcs = [i.CRC for i in infos if not i.filename.endswith("/.data/serialization_id")]
        self.data_index = infos.index(info)
        self.sid = None
        if sid:
            s = sid[0]
            s_start = _record_start(raw, s)
            self.sid = (s_start - end, s.file_size, self._crc_fields(raw, z, s, end), raw[s_start:s_start + 20])

    @staticmethod
    def _crc_fields(raw: bytes, z: zipfile.ZipFile, info: zipfile.ZipInfo, end: int) -> List[int]:
        stop = _record_start(raw, info) + info.file_size
        if raw[stop:stop + 4] != b"PK\x07\x08":  # the data descriptor: signature, CRC-32, sizes
            raise ValueError("no data descriptor after a record")
        fields = [stop + 4 - end]
        pos = z.start_dir
        while raw[pos:pos + 4] == b"PK\x01\x02":
            e = _CENTRAL_ENTRY.unpack_from(raw, pos)
            if e[18] == info.header_offset:  # the relative offset of its local header
                fields.append(pos + 16 - end)
            pos += _CENTRAL_ENTRY.size + e[12] + e[13] + e[14]
        if len(fields) != 2:
            raise ValueError("a record is not in the central directory")
        return fields

    def parts(self, t: torch.Tensor):
        """(head, tensor bytes, tail): `torch.save(t)` as three buffers."""
        data = _tensor_bytes(t)
        tail = bytearray(self.tail)
        crc = zlib.crc32(data)
        for off in self.data_crc_at:
            struct.pack_into("<I", tail, off, crc)
        if self.sid is not None:
            at, size, crc_at, names_part = self.sid
            combined = 0
            for i, c in enumerate(self.crcs):
                combined = _hash_combine(combined, crc if i == self.data_index else c)
            sid = names_part + b"%020d" % combined
            if len(sid) != size:
                raise ValueError("unexpected serialization id length")
            tail[at:at + size] = sid
            for off in crc_at:
                struct.pack_into("<I", tail, off, zlib.crc32(sid))
        return self.head, data, tail


def _torch_save_bytes(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _record_start(raw, info: zipfile.ZipInfo) -> int:
    head = _LOCAL_HEADER.unpack_from(raw, info.header_offset)
    return info.header_offset + _LOCAL_HEADER.size + head[9] + head[10]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """`torch.save` writes a tensor's whole storage: a view into a larger tensor is copied out first."""
    t = t.detach().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _rows(blocks: List[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of the blocks stacked along dim 0: a view when they lie in one block."""
    pos = 0
    for b in blocks:
        if pos <= start and stop <= pos + b.shape[0]:
            return b[start - pos: stop - pos]
        pos += b.shape[0]
    return torch.cat(blocks)[start:stop]


class TorchDistWriter:
    """Streams canonical tensors into `model_dir` as a torch_dist checkpoint of `plan(cfg)`.

    `write(name, tensor)` in any order; `close()` writes `.metadata`, `common.pt` and `metadata.json` and
    returns {file relative to the checkpoint root: sha256} of the files written (the distcp file is hashed
    while it is written, never read back)."""

    def __init__(self, model_dir, cfg: ModelConfig, dtype: torch.dtype):
        self.dir = Path(model_dir)
        self.dtype = dtype
        placements, self.objects = plan(cfg)
        self.placements = {p.name: p for p in placements}
        self.pending = set(self.placements)
        self.files = [_HashingFile(self.dir / name) for name in DISTCP_FILES]
        self.storage: Dict[Tuple[str, Optional[Tuple[int, ...]]], Tuple[str, int, int]] = {}
        self.templates: Dict[Tuple[int, ...], _ArchiveTemplate] = {}
        extra_state = io.BytesIO()
        torch.save([None], extra_state)  # what megatron saves for a linear layer without TE extra state
        for key in self.objects:
            self._append(key, None, extra_state.getvalue())

    def _append(self, key: str, offsets, obj) -> None:
        """One archive (a tensor chunk, or a byte object's bytes) to the file with fewer bytes so far."""
        i = min(range(len(self.files)), key=lambda j: self.files[j].pos)
        f = self.files[i]
        start = f.pos
        if isinstance(obj, bytes):
            f.write(obj)
        else:
            shape = tuple(obj.shape)
            if shape not in self.templates:
                self.templates[shape] = _ArchiveTemplate(self.dtype, shape)
            template = self.templates[shape]
            if template.usable:  # its CRC-32s are computed in the writer thread
                f.write_parts(lambda t=obj, tpl=template: tpl.parts(t), template.nbytes)
            else:
                torch.save(_compact(obj), f)
        self.storage[(key, offsets)] = (DISTCP_FILES[i], start, f.pos - start)

    def write(self, name: str, tensor) -> None:
        """Write canonical tensor `name`: a tensor, or a list of tensors that are its rows in order (e.g. gate
        and up of a SwiGLU `linear_fc1`, which are exactly its two chunks: no concatenated copy is made)."""
        p = self.placements.get(name)
        if p is None or name not in self.pending:
            raise ConversionError(f"tensor '{name}' is {'not part of' if p is None else 'twice in'} the checkpoint")
        blocks = list(tensor) if isinstance(tensor, (list, tuple)) else [tensor]
        rows = sum(b.shape[0] for b in blocks)
        if (rows, *blocks[0].shape[1:]) != p.shape or any(b.shape[1:] != blocks[0].shape[1:] for b in blocks):
            got = [rows, *blocks[0].shape[1:]]
            raise ConversionError(f"tensor '{name}' has shape {got}, expected {list(p.shape)}")
        lead = len(p.offset) - len(p.shape)  # 1 for an expert: one slice of its layer's stacked tensor
        for offsets, sizes in p.chunks:
            rel = [o - b for o, b in zip(offsets, p.offset)][lead:]
            view = _rows(blocks, rel[0], rel[0] + sizes[lead])
            view = view[(slice(None),) + tuple(slice(r, r + s) for r, s in zip(rel[1:], sizes[lead + 1:]))]
            self._append(p.key, offsets, view.detach().to(self.dtype).reshape(sizes))
        self.pending.discard(name)

    def close(self) -> Dict[str, str]:
        if self.pending:
            missing = sorted(self.pending)
            raise ConversionError(f"tensor '{missing[0]}' was never written"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        # no fsync: integrity is COMPLETE's checksum, as for every other file of a checkpoint
        digests = {f"{self.dir.name}/{name}": f.close(fsync=False) for name, f in zip(DISTCP_FILES, self.files)}
        self._write_metadata()
        torch.save({}, self.dir / "common.pt")
        (self.dir / "metadata.json").write_text(json.dumps(BACKEND_MARKER))
        return digests

    def abort(self) -> None:
        for f in self.files:
            f.abort()

    def _write_metadata(self) -> None:
        state: Dict[str, object] = {}
        for p in self.placements.values():
            md = state.setdefault(p.key, dcp_md.TensorStorageMetadata(dcp_md.TensorProperties(dtype=self.dtype),
                                                                      torch.Size(p.global_shape), []))
            md.chunks.extend(dcp_md.ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in p.chunks)
        for key in self.objects:
            state[key] = dcp_md.BytesStorageMetadata()
        storage = {dcp_md.MetadataIndex(key, None if off is None else torch.Size(off)):
                   dcp_fs._StorageInfo(name, start, n) for (key, off), (name, start, n) in self.storage.items()}
        meta = dcp_md.Metadata(state_dict_metadata=state, storage_data=storage, version="1.0.0",
                               storage_meta=dcp_md.StorageMeta(checkpoint_id=str(self.dir), save_id=str(uuid.uuid4())))
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(meta, f)


# ----------------------------------------------------------------------------------------------- reading
class UnsupportedCheckpoint(ConversionError):
    """The checkpoint holds something this direct reader does not decode (callers fall back to megatron's)."""


def _allowed_metadata_classes() -> Dict[Tuple[str, str], object]:
    import torch.serialization as ser

    allowed = {("torch", "Size"): torch.Size, ("collections", "OrderedDict"): collections.OrderedDict,
               ("torch.serialization", "_get_layout"): ser._get_layout,
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_fs._StorageInfo}
    for mod, names in ((dcp_md, ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                             "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
                       # megatron pickles its save plans along (`all_local_plans`, a cache for re-saving)
                       (dcp_planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"))):
        for n in names:
            if hasattr(mod, n):
                allowed[(mod.__name__, n)] = getattr(mod, n)
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """`.metadata` holds DCP's dataclasses, torch sizes/dtypes/layouts: anything else is refused (unpickling
    an arbitrary class can run code, so there is no fallback to a plain unpickler either)."""

    allowed: Dict[Tuple[str, str], object] = {}

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ConversionError(f"refusing to unpickle {module}.{name} from the checkpoint's .metadata (it holds "
                              f"only checkpoint metadata classes)")


@dataclass(frozen=True)
class _TensorRef:
    key: str
    dtype: torch.dtype
    storage_offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor_ref(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    key, dtype = storage
    return _TensorRef(key, dtype, int(storage_offset), tuple(size), tuple(stride))


class _TensorUnpickler(pickle.Unpickler):
    """A `torch.save`d plain tensor's data.pkl -> where its bytes are (nothing is constructed or executed)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_ref
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage") and isinstance(getattr(torch, name, None), type):
            with warnings.catch_warnings():  # the legacy typed-storage classes warn when touched
                warnings.simplefilter("ignore")
                return getattr(torch, name).dtype  # the storage type only tells the dtype
        raise UnsupportedCheckpoint(f"unexpected class {module}.{name} in a checkpoint tensor")

    def persistent_load(self, pid):
        kind, dtype, key, _location, _numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise UnsupportedCheckpoint(f"unexpected storage {pid!r} in a checkpoint tensor")
        return str(key), dtype


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of a memory map (or any buffer) as a seekable file (what zipfile needs)."""

    def __init__(self, mm, start: int, length: int):
        self.mm, self.start, self.length, self.pos = mm, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.length + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def getbuffer(self) -> memoryview:
        """The window's bytes as a buffer (no copy)."""
        return memoryview(self.mm)[self.start: self.start + self.length]

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = bytes(self.mm[self.start + self.pos: self.start + end])
        self.pos = end
        return out


class TorchDistReader:
    """Canonical tensors from a torch_dist checkpoint directory (`.../model`) written by megatron (training,
    any TP/EP layout) or by `TorchDistWriter`; no process group needed. Tensors are views of the files' memory
    maps until copied."""

    def __init__(self, model_dir):
        self.dir = Path(model_dir)
        if not _MetadataUnpickler.allowed:
            _MetadataUnpickler.allowed = _allowed_metadata_classes()
        try:
            with open(self.dir / ".metadata", "rb") as f:
                self.meta = _MetadataUnpickler(f).load()
        except ConversionError as e:
            raise ConversionError(f"checkpoint {self.dir}: {e}") from None
        except Exception as e:  # missing or truncated file
            raise ConversionError(f"checkpoint {self.dir}: not a readable torch_dist directory "
                                  f"({type(e).__name__}: {e})") from None
        self.tensors = {k: v for k, v in self.meta.state_dict_metadata.items() if hasattr(v, "chunks")}
        self.storage = {(i.fqn, None if i.offset is None else tuple(i.offset)): v
                        for i, v in self.meta.storage_data.items()}
        self._maps: Dict[str, mmap.mmap] = {}
        self._layouts: Dict[Tuple[int, Tuple[int, ...]], _ArchiveLayout] = {}
        self._chunk_index: Dict[str, tuple] = {}

    def has(self, key: str) -> bool:
        return key in self.tensors

    def global_shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def _map(self, rel: str) -> mmap.mmap:
        if rel not in self._maps:
            with open(self.dir / rel, "rb") as f:  # copy-on-write: torch wants a writable buffer, nothing writes
                self._maps[rel] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[rel]

    def _chunk(self, key: str, offsets: Tuple[int, ...], sizes: Tuple[int, ...]) -> torch.Tensor:
        info = self.storage.get((key, offsets))
        if info is None:
            raise ConversionError(f"checkpoint {self.dir}: no storage for '{key}' chunk at {list(offsets)}")
        if getattr(info, "transform_descriptors", None):
            raise UnsupportedCheckpoint(f"'{key}' is stored with transforms {info.transform_descriptors}")
        mm = self._map(info.relative_path)
        if info.offset + info.length > len(mm):
            raise ConversionError(f"checkpoint {self.dir}: {info.relative_path} is shorter than its .metadata says")
        t = _view(mm, info.offset, self._layout(mm, info.offset, info.length, sizes))
        if tuple(t.shape) != tuple(sizes):
            raise ConversionError(f"checkpoint {self.dir}: '{key}' chunk at {list(offsets)} holds {list(t.shape)}, "
                                  f".metadata says {list(sizes)}")
        return t

    def _layout(self, mm: mmap.mmap, start: int, length: int, sizes: Tuple[int, ...]) -> _ArchiveLayout:
        """Archives of one length and chunk shape are laid out identically (the same data.pkl, the same record
        offsets): parse the first, and for the others check that their data.pkl bytes and the data record's
        header are where the first had them (a mismatch parses the archive in full)."""
        known = self._layouts.get((length, sizes))
        if known is not None:
            p = start + known.pkl_at
            h = start + known.data_header_at
            if mm[p: p + len(known.pkl)] == known.pkl and mm[h: h + len(known.data_header)] == known.data_header:
                return known
        layout = _archive_layout(mm, start, length)
        self._layouts[(length, sizes)] = layout
        return layout

    def _chunks_near(self, key: str, lo0: int, hi0: int) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
        """The chunks of `key` that may overlap rows [lo0, hi0) of its first dimension (indexed once per key:
        a layer's stacked experts have one or two chunks per expert, and a scan per expert would be
        quadratic in the number of experts)."""
        index = self._chunk_index.get(key)
        if index is None:
            by_row: Dict[int, list] = {}
            longest = 1
            for c in self.tensors[key].chunks:
                off, size = tuple(c.offsets), tuple(c.sizes)
                first = off[0] if off else 0
                by_row.setdefault(first, []).append((off, size))
                longest = max(longest, size[0] if size else 1)
            index = self._chunk_index[key] = (by_row, longest)
        by_row, longest = index
        if len(by_row) <= 2 * max(1, hi0 - lo0 + longest):
            return [c for cs in by_row.values() for c in cs]
        return [c for r in range(lo0 - longest + 1, hi0) for c in by_row.get(r, ())]

    def read(self, key: str, offset: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """The region [offset, offset + shape) of `key`'s global tensor, assembled from the chunks that cover
        it (one chunk exactly: a view, no copy)."""
        dtype = self.tensors[key].properties.dtype
        lo, hi = tuple(offset), tuple(o + s for o, s in zip(offset, shape))
        parts = []
        for c_lo, c_size in self._chunks_near(key, lo[0] if lo else 0, hi[0] if hi else 1):
            c_hi = tuple(o + s for o, s in zip(c_lo, c_size))
            a = tuple(max(x, y) for x, y in zip(lo, c_lo))
            b = tuple(min(x, y) for x, y in zip(hi, c_hi))
            if all(x < y for x, y in zip(a, b)):
                parts.append((c_lo, c_size, a, b))
        covered = sum(_volume(a, b) for *_, a, b in parts)
        if covered != _volume(lo, hi):
            raise ConversionError(f"checkpoint {self.dir}: the chunks of '{key}' do not cover {list(shape)} at "
                                  f"{list(offset)}")
        if len(parts) == 1 and parts[0][2] == lo and parts[0][3] == hi:
            c_lo, c_size, a, b = parts[0]
            t = self._chunk(key, c_lo, c_size)
            return t[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c_lo))]
        out = torch.empty(tuple(shape), dtype=dtype)
        for c_lo, c_size, a, b in parts:
            t = self._chunk(key, c_lo, c_size)
            src = t[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, c_lo))]
            out[tuple(slice(x - o, y - o) for x, y, o in zip(a, b, lo))] = src
        return out


def _volume(a, b) -> int:
    n = 1
    for x, y in zip(a, b):
        n *= max(0, y - x)
    return n


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")


@dataclass(frozen=True)
class _ArchiveLayout:
    """Where a `torch.save`d tensor's pieces are, relative to the archive's start."""

    pkl_at: int
    pkl: bytes
    data_header_at: int
    data_header: bytes  # local header + name + extra (CRC and sizes are in the data descriptor: all equal)
    data_at: int
    nbytes: int
    ref: _TensorRef


def _archive_layout(buf, start: int, length: int) -> _ArchiveLayout:
    """Parse the archive `torch.save` wrote at [start, start + length) of `buf` (zip directory, data.pkl)."""
    try:
        z = zipfile.ZipFile(_Window(buf, start, length))
        names = {i.filename.split("/", 1)[-1]: i for i in z.infolist()}
        pkl_info = names["data.pkl"]
        pkl = z.read(pkl_info)
        ref = _TensorUnpickler(io.BytesIO(pkl)).load()
    except UnsupportedCheckpoint:
        raise
    except Exception as e:
        raise ConversionError(f"a checkpoint tensor archive is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(ref, _TensorRef):
        raise UnsupportedCheckpoint(f"a checkpoint item holds {type(ref).__name__}, not a tensor")
    info = names.get(f"data/{ref.key}")
    if info is None or info.compress_type != zipfile.ZIP_STORED or pkl_info.compress_type != zipfile.ZIP_STORED:
        raise UnsupportedCheckpoint("a checkpoint tensor's bytes are missing or compressed")
    item = torch.empty((), dtype=ref.dtype).element_size()
    last = ref.storage_offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride))
    if min(ref.size, default=1) > 0 and last >= info.file_size // item:
        raise ConversionError("a checkpoint tensor is larger than its stored bytes")
    window = _Window(buf, start, length).getbuffer()
    data_at = _record_start(window, info)
    return _ArchiveLayout(_record_start(window, pkl_info), pkl, info.header_offset,
                          bytes(window[info.header_offset: data_at]), data_at, info.file_size, ref)


def _view(buf, start: int, layout: _ArchiveLayout) -> torch.Tensor:
    ref = layout.ref
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=layout.nbytes, offset=start + layout.data_at)
    return flat.view(ref.dtype).as_strided(ref.size, ref.stride, ref.storage_offset)


def _tensor_from_archive(buf, start: int, length: int) -> torch.Tensor:
    """The tensor `torch.save` wrote at [start, start + length) of `buf`, as a view of those bytes."""
    return _view(buf, start, _archive_layout(buf, start, length))


def write_model(model_dir, cfg: ModelConfig, dtype: torch.dtype,
                tensors: Iterable[Tuple[str, torch.Tensor]]) -> Dict[str, str]:
    """Write every canonical tensor of `cfg` (from `tensors`) as a torch_dist checkpoint into `model_dir`.
    Returns {relative path: sha256} of the big file (see `TorchDistWriter.close`)."""
    writer = TorchDistWriter(model_dir, cfg, dtype)
    try:
        for name, t in tensors:
            writer.write(name, t)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
