"""Functions that run *inside* the vLLM engine process (sent with `LLM.apply_model` / `collective_rpc`).

They live in an importable module because vLLM pickles them by reference. State kept between calls (the
routing capture buffer) is module-global in the engine process.

Routing capture binds a callback to every MoE router of the engine's model, exactly as vLLM's own
routed-experts capturer does (`bind_routed_experts_capturer`): the callback receives the logical top-k
expert ids the engine's router chose, `[num_tokens, topk]`, for every forward pass. A forward pre-hook on
the model records the positions and token ids of the same rows, so rows can be mapped back to sequences.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Dict, List

import torch

_CAPTURE: Dict[str, object] = {"enabled": False, "steps": [], "layers": {}, "bound": 0, "handle": None}


def _record_layer(layer_id: int, topk_ids: torch.Tensor) -> None:
    if _CAPTURE["enabled"]:
        _CAPTURE["layers"].setdefault(layer_id, []).append(topk_ids.detach().to("cpu", torch.int16).clone())


def _pre_hook(module, args, kwargs):
    if _CAPTURE["enabled"]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        _CAPTURE["steps"].append((input_ids.detach().cpu().clone(), positions.detach().cpu().clone()))


def bind_capture(model: torch.nn.Module) -> int:
    """Attach the capture callback to every MoE router (once). Returns the number of MoE layers bound."""
    if _CAPTURE["bound"]:
        return int(_CAPTURE["bound"])
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    layer_ids = []
    for module in model.modules():
        if isinstance(module, MoERunner):
            if not isinstance(module.router, BaseRouter):
                raise RuntimeError(f"routing capture: unsupported router {type(module.router).__name__}")
            module.router.set_capture_fn(partial(_record_layer, module.layer_id))
            layer_ids.append(module.layer_id)
    if not layer_ids:
        raise RuntimeError("routing capture: the engine's model has no MoE router")
    _CAPTURE["handle"] = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    _CAPTURE["bound"] = len(layer_ids)
    _CAPTURE["layer_ids"] = sorted(layer_ids)
    return len(layer_ids)


def start_capture(model: torch.nn.Module) -> int:
    n = bind_capture(model)
    _CAPTURE.update(enabled=True, steps=[], layers={})
    return n


def stop_capture(model: torch.nn.Module) -> dict:
    """Stop and return what was recorded: per forward pass (input_ids, positions), and per MoE layer the
    top-k ids of each forward pass, `[num_tokens, topk]` int16."""
    _CAPTURE["enabled"] = False
    # plain lists: vLLM's RPC serialiser mangles tensors inside containers
    out = {"steps": [(i.tolist(), p.tolist()) for i, p in _CAPTURE["steps"]],
           "layers": {int(k): [t.tolist() for t in v] for k, v in _CAPTURE["layers"].items()},
           "layer_ids": list(_CAPTURE.get("layer_ids", []))}
    _CAPTURE.update(steps=[], layers={})
    return out


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PENDING_EXPERTS: Dict[int, Dict[tuple, torch.Tensor]] = {}


def _find_experts_impl(obj, depth: int = 0):
    """The object that (re)packs a MoE layer's expert weights for its kernel (`process_weights_after_loading`
    of the experts implementation, e.g. vLLM's CPUUnquantizedExperts)."""
    if depth > 5 or obj is None:
        return None
    if hasattr(obj, "process_weights_after_loading") and hasattr(obj, "moe_config") and depth > 0:
        return obj
    for name in ("moe_kernel", "impl", "fused_experts", "experts", "_quant_method", "quant_method"):
        found = _find_experts_impl(getattr(obj, name, None), depth + 1)
        if found is not None:
            return found
    return None


def _load_layer_experts(model, layer: int, parts: Dict[tuple, torch.Tensor]) -> None:
    from vllm.model_executor.utils import replace_parameter

    block = model.model.layers[layer].mlp
    moe = next(m for m in block.modules() if hasattr(m, "w13_weight"))
    n = len({e for e, _ in parts})
    w13 = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]], 0) for e in range(n)])
    w2 = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    impl = _find_experts_impl(moe._quant_method if hasattr(moe, "_quant_method") else moe)
    dtype = moe.w13_weight.dtype
    replace_parameter(moe, "w13_weight", w13.to(dtype))
    replace_parameter(moe, "w2_weight", w2.to(dtype))
    if impl is not None:  # re-pack for the kernel, exactly as after the first load
        impl.process_weights_after_loading(moe)


def reload_weights(worker, blob: bytes) -> int:
    """Load a bucket of HF-named tensors, sent as safetensors bytes (vLLM's RPC serialiser turns tensors
    into lists; bytes pass as they are, and safetensors executes nothing), into the engine's model in place.

    vLLM's own `reload_weights` left part of the old weights in place on CPU (the CPU kernels keep packed
    copies: linear layers a oneDNN/SGL handle, MoE experts a VNNI-packed buffer). So: plain parameters go
    through the model's `load_weights` (linear layers stay plain tensors thanks to rollout/vllm_plugin.py),
    and each MoE layer's experts, once all of them have arrived (a layer may span buckets), are stacked into
    the kernel's [experts, 2*inter, hidden] / [experts, hidden, inter] tensors and packed again by the experts
    implementation's own `process_weights_after_loading`."""
    from safetensors.torch import load

    weights = load(blob)
    model = worker.model_runner.get_model()
    plain = []
    for name, t in weights.items():
        m = _EXPERT.match(name)
        if m:
            _PENDING_EXPERTS.setdefault(int(m.group(1)), {})[(int(m.group(2)), m.group(3))] = t
        else:
            plain.append((name, t))
    with torch.no_grad():
        if plain:
            model.load_weights(iter(plain))
        num_experts = model.config.num_experts if hasattr(model.config, "num_experts") else model.config.num_local_experts
        for layer in [k for k, v in _PENDING_EXPERTS.items() if len(v) == 3 * num_experts]:
            _load_layer_experts(model, layer, _PENDING_EXPERTS.pop(layer))
    return len(weights)
