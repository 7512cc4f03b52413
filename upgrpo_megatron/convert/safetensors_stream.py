"""Write safetensors files whose tensors arrive one at a time, holding none of them after they are written.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. Here the set of names, shapes
and the dtype is known in advance (the architecture's mapping says so), so each file's header, with every
tensor's byte range, is written first; a tensor's bytes are then written at its offset whenever it arrives,
in any order. Peak memory is one tensor group, not one shard. The files are standard safetensors (8-byte
little-endian header length, JSON header padded to 8 bytes, raw little-endian data in header order).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from upgrpo_megatron.errors import UpgrpoError

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class StreamedShardsError(UpgrpoError, ValueError):
    """A tensor that the plan does not expect, with the wrong shape, or never delivered."""


def plan_shards(specs: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
                max_shard_bytes: int) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """Split (name, shape) in order into consecutive shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        n = item * _numel(shape)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape)))
        size += n
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class StreamedSafetensors:
    """Pre-laid-out safetensors files in `out_dir`; `write(name, tensor)` fills one tensor's bytes.

    Args:
        out_dir: directory for the files.
        shards: [(file name, [(tensor name, shape), ...]), ...] (see `plan_shards`).
        dtype: every tensor is stored in this dtype (tensors are cast on write).
    """

    def __init__(self, out_dir, shards: Sequence[Tuple[str, Sequence[Tuple[str, Tuple[int, ...]]]]],
                 dtype: torch.dtype):
        self.dtype = dtype
        self.item = torch.empty((), dtype=dtype).element_size()
        self.where: Dict[str, Tuple[int, int, Tuple[int, ...]]] = {}  # name -> (file idx, abs offset, shape)
        self.files = []
        self.paths = []
        self.pending = set()
        for fi, (fname, tensors) in enumerate(shards):
            header = {"__metadata__": {"format": "pt"}}
            off = 0
            for name, shape in tensors:
                n = self.item * _numel(shape)
                header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
                off += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            base = 8 + len(raw)
            path = Path(out_dir) / fname
            f = open(path, "wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(base + off)  # the file has its final size now; unwritten ranges read as zeros
            self.files.append(f)
            self.paths.append(path)
            for name, shape in tensors:
                self.where[name] = (fi, base + header[name]["data_offsets"][0], tuple(shape))
                self.pending.add(name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise StreamedShardsError(f"tensor '{name}' is not part of the output layout")
        if name not in self.pending:
            raise StreamedShardsError(f"tensor '{name}' was produced twice")
        fi, off, shape = self.where[name]
        if tuple(tensor.shape) != shape:
            raise StreamedShardsError(f"tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)}")
        t = tensor.detach().to("cpu", self.dtype).contiguous()
        f = self.files[fi]
        f.seek(off)
        f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
        self.pending.discard(name)

    def close(self) -> None:
        """Close the files; every planned tensor must have been written."""
        for f in self.files:
            f.close()
        if self.pending:
            missing = sorted(self.pending)
            raise StreamedShardsError(f"tensor '{missing[0]}' was never produced"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def abort(self) -> None:
        for f in self.files:
            if not f.closed:
                f.close()
