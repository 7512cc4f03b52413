"""Write safetensors files whose tensors arrive one at a time, holding none of them after they are written.

`safetensors.torch.save_file` needs every tensor of a file in memory at once. Here the set of names, shapes
and the dtype is known in advance (the architecture's mapping says so), so each file's header, with every
tensor's byte range, is written first; a tensor's bytes are then written at its offset whenever it arrives,
in any order. Peak memory is one tensor group, not one shard. The files are standard safetensors (8-byte
little-endian header length, JSON header padded to 8 bytes, raw little-endian data in header order).
"""

from __future__ import annotations

import json
import queue
import struct
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from upgrpo_megatron.errors import UpgrpoError

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class BackgroundWriter:
    """Writes (and optionally hashes) buffers in a background thread, in the order they are submitted.

    File writes and hashlib both release the GIL on large buffers, so the caller reads and converts the next
    tensors while the previous ones go to disk. Buffers are handed over in batches of about `batch_bytes`:
    every hand-over between the threads can cost a GIL switch interval (5 ms) on a busy machine, so a few
    dozen of them are cheap and thousands (one per tensor) are not. At most ~`max_pending` bytes wait. A
    submitted buffer must not change afterwards (its tensor is not modified once handed over); an error in
    the thread is raised by the next `submit` or by `close`."""

    def __init__(self, batch_bytes: int = 16 * 1024**2, max_pending: int = 64 * 1024**2):
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, max_pending // batch_bytes))
        self._batch: list = []
        self._batch_size = 0
        self._batch_bytes = batch_bytes
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._drain, name="tensor-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                for f, offset, bufs, update in batch:
                    if self._error is not None:
                        break
                    if offset is not None:
                        f.seek(offset)
                    for buf in bufs() if callable(bufs) else (bufs,):
                        if update is not None:
                            update(buf)
                        f.write(buf)
            except BaseException as e:
                self._error = e

    def submit(self, f, buf, offset: Optional[int] = None, update: Optional[Callable] = None,
               nbytes: Optional[int] = None) -> int:
        """Queue `buf` for `f` (at `offset`, else after the previous write); `update(buf)` (a hash) first.
        `buf` may be a function returning the buffers to write, called in the thread (work such as checksums
        then runs there too); `nbytes` is then their total size."""
        if self._error is not None:
            raise self._error
        n = nbytes if callable(buf) else memoryview(buf).nbytes
        self._batch.append((f, offset, buf, update))
        self._batch_size += n
        if self._batch_size >= self._batch_bytes:
            self._hand_over()
        return n

    def _hand_over(self) -> None:
        if self._batch:
            self._queue.put(self._batch)  # blocks while `max_pending` bytes wait
            self._batch, self._batch_size = [], 0

    def close(self) -> None:
        """Write what is left, wait until everything is written; raise the first error."""
        if self._thread.is_alive():
            self._hand_over()
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._batch = []
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


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
        self.writer = BackgroundWriter()
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
        if t.numel():
            self.writer.submit(self.files[fi], t.reshape(-1).view(torch.uint8).numpy().data, offset=off)
        self.pending.discard(name)

    def close(self) -> None:
        """Close the files; every planned tensor must have been written."""
        try:
            self.writer.close()
        finally:
            for f in self.files:
                f.close()
        if self.pending:
            missing = sorted(self.pending)
            raise StreamedShardsError(f"tensor '{missing[0]}' was never produced"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def abort(self) -> None:
        self.writer.abort()
        for f in self.files:
            if not f.closed:
                f.close()
