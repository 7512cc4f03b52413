"""CPU / gloo compatibility layer for megatron-core 0.16.1, and Transformer Engine / apex detection.

megatron-core assumes CUDA in a handful of places that have nothing to do with the math. On a machine
without CUDA, `apply_cpu_patches()` fixes exactly these, and nothing else:

1. `torch.cuda.current_device()` (RoPE frequencies, attention softmax offsets) raises on a CPU-only torch:
   it is made to return "cpu", which every such call site passes on as a `device=` argument; and
   `torch.cuda.synchronize()` (dist_checkpointing's tensor preload) becomes a no-op, as there is no device.
2. The default causal mask is built with `device="cuda"` (`fused_softmax.get_default_causal_mask`): it is
   rebuilt on the CPU.
3. The model-parallel RNG tracker (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`) reads
   and writes the CUDA generator: it is mapped to the CPU default generator, which is the one CPU kernels
   (dropout, init) draw from, so forking keeps its meaning (a separate stream per model-parallel rank).
4. `moe_utils.te_general_gemm` is referenced by the router but only defined when Transformer Engine imports:
   it is defined as None (the router then uses its torch matmul path).
5. megatron's optimizer (`FP32Optimizer`), grad-norm clipping and its local multi-tensor L2 norm
   allocate scalars with `device="cuda"`: those three modules see a `torch` whose tensor factories map "cuda"
   to the CPU; and gradient clipping, which asserts CUDA grads, is the same scaling without the assert.
6. TP > 1 with MoE requires sequence parallelism, and the local spec's `WrappedTorchNorm` refuses it: that is
   not a patch but `SequenceParallelRMSNorm` in `model.py`, put in every norm slot of the local spec.
7. The distributed optimizer (`parallel.use_distributed_optimizer`) accepts only `torch.cuda.*Tensor`
   parameters when it builds its shards ("Wrapped parameters must be one of torch.cuda.FloatTensor ...",
   `_build_model_and_main_param_groups`): while that method runs, CPU tensors report the CUDA type name of
   their dtype. Nothing else reads tensor type names there; the shards are built exactly as on GPU (measured:
   weights after 3 steps equal a plain DP=2 run's to 3.6e-7).
8. Its checkpoint (`megatron/optimizer.py`, sharding type `dp_reshardable`) assumes Transformer Engine's or
   apex's FusedAdam, which keep Adam's `step` in the param group; torch's Adam keeps it per parameter, and
   (a) `state_dict()` asserts that a freshly built optimizer (no state yet) has exactly one step, which stops
   every load; (b) loading restores the per-parameter `step` from the fresh optimizer, silently: the bias
   correction then restarts (measured: weights 2e-3 off one step after resume). `state_dict()` now reports
   step 0 for an optimizer without state, and `load_state_dict()` sets every parameter's `step` to the one
   saved in the param groups after the parameter state is loaded (exact resume, tests/distributed).

Also a choice rather than a patch: the "alltoall" token dispatcher creates a `torch.cuda.Stream()` at
construction, so on CPU `model.py` selects the "allgather" dispatcher.

When CUDA is available, `apply_cpu_patches()` returns without touching anything (it is inert by
construction: every patch is guarded by `torch.cuda.is_available()`). This cannot be tested on these
CPU-only machines, which is why the layer is kept this small and every patch is listed above.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import torch

_PATCHED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def have_transformer_engine() -> bool:
    """True when Transformer Engine imports and CUDA is present (TE kernels are CUDA-only)."""
    if not cuda_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install must not stop training on the local spec
        return False
    return True


def have_apex() -> bool:
    """True when NVIDIA apex (not the unrelated PyPI `apex`) provides fused layer norm."""
    if importlib.util.find_spec("apex") is None:
        return False
    return importlib.util.find_spec("apex.normalization") is not None


def quiet_megatron_import_warnings() -> None:
    """megatron-core warns at import that TE/apex are missing; on CPU that is expected, not news."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine is not installed.*")
    warnings.filterwarnings("ignore", message=".*legacy GroupedMLP.*")


class _DropCpuRngWarning(logging.Filter):
    # The tracker's fork() warns when the CPU RNG moves inside a "GPU" RNG context; with patch 3 the CPU
    # generator *is* the forked generator, so the warning is expected and says nothing.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply_cpu_patches() -> bool:
    """Apply the patches listed in the module docstring when CUDA is absent. Idempotent.

    Returns True when patches are in effect.
    """
    global _PATCHED
    if cuda_available():
        return False
    if _PATCHED:
        return True
    quiet_megatron_import_warnings()

    # 1. current_device() -> "cpu"; synchronize() -> nothing to wait for
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

    # 2. default causal mask on the CPU
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask

    # 3. RNG tracker on the CPU generator
    import megatron.core.tensor_parallel.random as mrandom

    def _get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def _tracker_add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    logging.getLogger(mrandom.__name__).addFilter(_DropCpuRngWarning())

    # 4. te_general_gemm referenced without Transformer Engine
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # 5. megatron's optimizer and grad clipping allocate scalars with device="cuda"
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as moptimizer
    import megatron.core.utils as mutils

    for module in (clip_grads, moptimizer, mutils):
        module.torch = _CpuDeviceTorch()

    @torch.no_grad()
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        # megatron's version asserts `torch.cuda.FloatTensor` grads; the scaling itself is the same.
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            attr = "decoupled_grad" if use_decoupled_grad else "grad"
            for p in parameters:
                g = getattr(p, attr, None)
                if g is not None:
                    g.mul_(clip_coeff)

    moptimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32

    _patch_distributed_optimizer()  # 7, 8
    _PATCHED = True
    return True


_CUDA_TYPE_NAMES = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def _patch_distributed_optimizer() -> None:
    from megatron.core.optimizer import distrib_optimizer as dopt

    cls = dopt.DistributedOptimizer
    build = cls._build_model_and_main_param_groups.__func__

    def build_on_cpu(klass, *args, **kwargs):  # 7: CPU tensors pass the CUDA type-name check
        real_type = torch.Tensor.type

        def cuda_type_name(self, dtype=None, non_blocking=False, **kw):
            if dtype is None and not kw:
                name = real_type(self)
                return _CUDA_TYPE_NAMES.get(name, name)
            return real_type(self, dtype, non_blocking, **kw)

        torch.Tensor.type = cuda_type_name
        try:
            return build(klass, *args, **kwargs)
        finally:
            torch.Tensor.type = real_type

    cls._build_model_and_main_param_groups = classmethod(build_on_cpu)
    if dopt.HAVE_APEX_OR_TE:  # FusedAdam keeps `step` in the param group: 8 does not apply
        return
    state_dict, load_state_dict = cls.state_dict, cls.load_state_dict

    def state_dict_without_state(self):  # 8a: a fresh torch Adam has no per-parameter step yet
        if len(self.optimizer.state) == 0:
            inner = self.optimizer.state_dict()
            out = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
            for g in out["optimizer"]["param_groups"]:
                del g["params"]
                g["step"] = 0
            if self.grad_scaler:
                out["grad_scaler"] = self.grad_scaler.state_dict()
            return out
        return state_dict(self)

    def load_state_dict_with_step(self, sd):  # 8b: the saved step, not the fresh optimizer's
        load_state_dict(self, sd)
        steps = {g.get("step") for g in (sd.get("optimizer") or {}).get("param_groups", [])} - {None}
        if len(steps) == 1:
            step = float(steps.pop())
            for st in self.optimizer.state.values():
                st["step"] = torch.tensor(step, dtype=torch.float32)

    cls.state_dict = state_dict_without_state
    cls.load_state_dict = load_state_dict_with_step


class _CpuDeviceTorch:
    """`torch` as seen by one megatron module, with tensor factories' device="cuda" mapped to the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._FACTORIES:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def default_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
