"""How a bucket of weights travels from the trainer to a CPU engine's worker processes (same host).

As bytes (safetensors `save`), a bucket is copied five times on its way: serialised, msgpack-encoded to the
engine core, pickled into vLLM's message queue, received by the worker over zmq, parsed. Measured on the rollout
benchmark's medium model (147 MB, one bucket): 1.1-3.0 s per sync, ~50 MB/s, most of it in those copies. Through
a file on a tmpfs (/dev/shm) it is written once and read once; only its path crosses the RPC. The file lives only
while the RPC runs (removed in `finally`). Where /dev/shm is missing or lacks room (containers often give it
64 MB), or the write fails, the bytes path is used.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Union

import torch

SHM_DIR: Optional[str] = "/dev/shm"
HEADROOM = 2  # use the tmpfs only when it has this many times the bucket's size free


def _shm_path(nbytes: int) -> Optional[str]:
    if not SHM_DIR or not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
        return None
    try:
        if shutil.disk_usage(SHM_DIR).free < HEADROOM * nbytes:
            return None
    except OSError:
        return None
    return os.path.join(SHM_DIR, f"upgrpo-weights-{os.getpid()}-{uuid.uuid4().hex}.safetensors")


@contextmanager
def packed(bucket: Dict[str, torch.Tensor]) -> Iterator[Union[str, bytes]]:
    """The bucket as the worker's `unpack` takes it: a path to a safetensors file on the tmpfs, or bytes."""
    from safetensors.torch import save, save_file

    path = _shm_path(sum(t.numel() * t.element_size() for t in bucket.values()))
    if path is not None:
        try:
            save_file(bucket, path)
        except OSError:  # the tmpfs filled up meanwhile (another engine's bucket): bytes instead
            _remove(path)
            path = None
    if path is None:
        yield save(bucket)
        return
    try:
        yield path
    finally:
        _remove(path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unpack(payload: Union[str, bytes]) -> Dict[str, torch.Tensor]:
    """In the worker: the tensors of a bucket made by `packed`."""
    from safetensors.torch import load, load_file

    if isinstance(payload, (bytes, bytearray, memoryview)):
        return load(bytes(payload))
    return load_file(payload)
