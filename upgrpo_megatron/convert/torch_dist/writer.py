"""Writing a torch_dist checkpoint directly: torch.save-identical archives, streamed and hashed (see __init__)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.convert.hf_io import ConversionError
from upgrpo_megatron.convert.safetensors_stream import BackgroundWriter
from upgrpo_megatron.convert.torch_dist.layout import (
    BACKEND_MARKER,
    DISTCP_FILES,
    plan,
)


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


_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header


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
