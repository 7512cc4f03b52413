"""A vLLM general plugin (entry point `vllm.general_plugins`) that makes in-place weight sync work on CPU.

vLLM's CPU linear layers pack their weights into oneDNN / SGL kernel handles after loading and empty the
parameters. An in-place `reload_weights` then updates the parameters but not the packed handles, so the
engine silently keeps part of the old weights (measured here: log-prob error 0.25 nats after a sync, while
norms and experts had followed). With `UPGRPO_VLLM_SYNCABLE_CPU_LINEAR=1` (set by `RolloutEngine` on CPU),
CPU linear layers keep their weights as plain tensors and call `torch.nn.functional.linear` on them, so every
reload is seen by the next forward pass. GPU engines are untouched (the variable is not set there, and the
patch only applies on the CPU platform).
"""

from __future__ import annotations

import os

ENV = "UPGRPO_VLLM_SYNCABLE_CPU_LINEAR"


def _plain_cpu_linear(layer, remove_weight: bool) -> None:
    import torch

    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def register() -> None:
    if os.environ.get(ENV) != "1":
        return
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.utils as utils
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe

    for module in (utils, linear, vpe):
        if hasattr(module, "dispatch_cpu_unquantized_gemm"):
            module.dispatch_cpu_unquantized_gemm = _plain_cpu_linear
