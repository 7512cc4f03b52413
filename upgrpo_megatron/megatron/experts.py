"""Grouped-GEMM experts for the local (CPU) layer spec: what Transformer Engine's grouped GEMM is on GPU.

megatron-core's local spec runs the experts with `SequentialMLP`: a Python loop over the local experts, two
small matmuls, an activation and their autograd bookkeeping per expert. Its cost grows with the number of
experts even when the tokens (and FLOPs) do not. `GroupedSequentialMLP` computes the same function with two
`torch._grouped_mm` calls over all local experts (one for `linear_fc1`, one for `linear_fc2`) and one
activation over all dispatched tokens.

It is a `SequentialMLP` in everything but the forward: the same `local_experts.{i}.linear_fc1/linear_fc2`
parameters (names, shapes, TP attributes), the same `sharded_state_dict`, so checkpoints, the HF mapping,
sharding and weight sync see no difference. Expert-TP and EP need nothing here: the token dispatcher does all
of the experts' communication, and inside the experts each linear is a local matmul on this rank's shard.

To avoid stacking the expert weights on every forward, the weights of each linear are moved into one
`[experts, out, in]` buffer at construction (each parameter then uses its slice of that memory; parameters
stay separate `Parameter` objects). A forward checks that the parameters still live there (something may
have re-assigned `param.data`) and stacks a copy otherwise. Results are bit-identical to the loop (same
per-expert matmuls, same activation); the loop is used where `torch._grouped_mm` is missing or does not
support the dtype/device, and for features this path does not implement (biases, fp8/fp4, probabilities on
the input, clamped or non-GLU-standard activations).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """True when `torch._grouped_mm` runs forward and backward for `dtype` on this device type (probed once
    on a tiny problem that includes an expert without tokens)."""
    if not hasattr(torch, "_grouped_mm") or device_type != "cpu":
        return False
    try:  # sizes of 16-byte rows: torch's reduced-precision path requires them (see `_rows_aligned`)
        x = torch.ones(3, 8, dtype=dtype)
        w = torch.ones(2, 16, 8, dtype=dtype)
        offs = torch.tensor([0, 3], dtype=torch.int32)
        y = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        gx = torch._grouped_mm(y, w, offs=offs)
        gw = torch._grouped_mm(y.t(), x, offs=offs)
        return y.shape == (3, 16) and gx.shape == (3, 8) and gw.shape == (2, 16, 8) and bool(gw[0].eq(0).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _rows_aligned(dtype: torch.dtype, *sizes: int) -> bool:
    """torch's grouped GEMM refuses reduced-precision operands whose rows are not a multiple of 16 bytes
    ("strides should be multiple of 16 bytes"); fp32 has no such constraint on the CPU."""
    item = torch.empty((), dtype=dtype).element_size()
    return dtype == torch.float32 or all(n * item % 16 == 0 for n in sizes)


class _GroupedLinear(torch.autograd.Function):
    """y[rows of expert e] = x[rows of expert e] @ W_e^T for every local expert, with W stacked as [E, out, in].

    `weights` are the per-expert parameters whose values `stacked` holds (the same memory or a copy): they
    are inputs only so that autograd hands each its own gradient (a slice of one grouped weight-gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, stacked: torch.Tensor, *weights: torch.Tensor):
        ctx.save_for_backward(x, offs, stacked)
        return torch._grouped_mm(x, stacked.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, offs, stacked = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # e.g. a sum()'s expanded (stride-0) gradient
        grad_x = torch._grouped_mm(grad_out, stacked, offs=offs) if ctx.needs_input_grad[0] else None
        grad_w = torch._grouped_mm(grad_out.t(), x, offs=offs)  # [E, out, in]; zeros for experts without tokens
        return (grad_x, None, None, *grad_w.unbind(0))


def pack_weights(weights: Sequence[torch.nn.Parameter]) -> Optional[torch.Tensor]:
    """Move the values of same-shaped parameters into one [n, *shape] buffer, each parameter keeping its
    slice of it as its storage. Returns the buffer (None when the parameters do not share shape/dtype/device).

    The parameters' `.data` are fresh tensors on the buffer's storage (not autograd views of it), so code that
    asserts a parameter is not a view, or re-assigns `.data`, keeps working; `stacked_weights` notices the
    latter and stops using the buffer."""
    first = weights[0]
    if any(w.shape != first.shape or w.dtype != first.dtype or w.device != first.device for w in weights):
        return None
    with torch.no_grad():
        buf = torch.stack([w.detach() for w in weights])
    storage, step = buf.untyped_storage(), buf.stride(0)
    for i, w in enumerate(weights):
        w.data = torch.empty(0, dtype=buf.dtype, device=buf.device).set_(storage, i * step, w.shape, w.stride())
    return buf


def stacked_weights(weights: Sequence[torch.Tensor], buf: Optional[torch.Tensor]) -> torch.Tensor:
    """[n, *shape] values of `weights`: `buf` itself when every weight still uses its slice of `buf`'s memory
    (no copy), else a stacked copy."""
    if buf is not None and len(weights) == buf.shape[0] and all(
            w.dtype == buf.dtype and w.is_contiguous() and w.shape == buf.shape[1:] for w in weights):
        base, step = buf.data_ptr(), buf.stride(0) * buf.element_size()
        if all(w.data_ptr() == base + i * step for i, w in enumerate(weights)):
            return buf.detach()
    return torch.stack([w.detach() for w in weights])


class GroupedSequentialMLP(SequentialMLP):
    """`SequentialMLP` whose forward runs all local experts as two grouped GEMMs (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self._packed = {name: pack_weights(self._weights(name)) for name in ("linear_fc1", "linear_fc2")}

    def _weights(self, name: str) -> List[torch.nn.Parameter]:
        return [getattr(expert, name).weight for expert in self.local_experts]

    def _grouped_path_applies(self, hidden: torch.Tensor) -> bool:
        c = self.config
        expert = self.local_experts[0]
        return (
            self.num_local_experts > 1
            and grouped_mm_supported(hidden.dtype, hidden.device.type)
            and not (c.fp8 or c.fp4 or c.moe_apply_probs_on_input or c.use_te_activation_func)
            and c.activation_func_clamp_value is None
            and expert.linear_fc1.bias is None and expert.linear_fc2.bias is None
            and all(w.dtype == hidden.dtype for w in (expert.linear_fc1.weight, expert.linear_fc2.weight))
            and _rows_aligned(hidden.dtype, *expert.linear_fc1.weight.shape, *expert.linear_fc2.weight.shape)
        )

    def _linear(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        weights = self._weights(name)
        return _GroupedLinear.apply(x, offs, stacked_weights(weights, self._packed[name]), *weights)

    def _activation(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """MLP.forward's unfused activation and per-token scaling, over all experts' tokens at once."""
        c = self.config
        if c.gated_linear_unit:
            gate, linear = torch.chunk(h, 2, dim=-1)
            h = c.activation_func(gate) * (linear + c.glu_linear_offset)
        else:
            h = c.activation_func(h)
        return (h * probs.unsqueeze(-1)).to(h.dtype)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._grouped_path_applies(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        # offs[e] = end row of expert e in the permuted tokens (grouped_mm wants int32 cumulative ends)
        offs = torch.as_tensor(tokens_per_expert, device=x.device).cumsum(0).to(torch.int32)
        h = self._linear("linear_fc1", x, offs)
        h = self._activation(h, permuted_probs)
        return self._linear("linear_fc2", h, offs), None
