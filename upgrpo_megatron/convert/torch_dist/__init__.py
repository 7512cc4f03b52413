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

The package: `layout` (keys, shapes, chunk placement), `writer` (TorchDistWriter, write_model) and `reader`
(TorchDistReader): one file format, its writer and its reader, each in a module of its own.

The package: `layout` (keys, shapes, chunk placement), `writer` (TorchDistWriter, write_model) and `reader`
(TorchDistReader, with its restricted unpicklers): one file format, its writer and its reader.
"""

from upgrpo_megatron.convert.torch_dist.layout import DISTCP_FILES, checkpoint_key, no_cyclic_gc, plan
from upgrpo_megatron.convert.torch_dist.reader import TorchDistReader, UnsupportedCheckpoint
from upgrpo_megatron.convert.torch_dist.writer import TorchDistWriter, write_model

__all__ = ["DISTCP_FILES", "TorchDistReader", "TorchDistWriter", "UnsupportedCheckpoint", "checkpoint_key",
           "no_cyclic_gc", "plan", "write_model"]
