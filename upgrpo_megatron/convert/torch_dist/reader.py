"""Reading a torch_dist checkpoint directly: restricted unpicklers, tensors mapped from the files (see __init__)."""

from __future__ import annotations

import collections
import io
import mmap
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
import torch.distributed.checkpoint.planner as dcp_planner

from upgrpo_megatron.convert.hf_io import ConversionError
from upgrpo_megatron.convert.torch_dist.writer import (
    _record_start,
)


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
