"""Functions that run *inside* the vLLM worker process (sent with `LLM.apply_model` / `LLM.collective_rpc`).

They live in an importable module because vLLM pickles them by reference (this needs
`VLLM_ALLOW_INSECURE_SERIALIZATION=1`, set by `RolloutEngine`). State kept between calls (the routing capture
buffer, expert weights of a layer that spans buckets) is module-global in the worker process.

Results travel back as plain Python objects or bytes: vLLM's RPC serialiser turns tensors nested in
containers into lists, while bytes pass unchanged.

Routing capture binds a callback to every MoE router of the engine's model, as vLLM's own routed-experts
capturer does (`BaseRouter.set_capture_fn`): the callback receives the logical top-k expert ids the engine
chose, `[num_tokens, topk]`, for every forward pass. A forward pre-hook on the model records the token ids and
positions of the same rows and, for decode capture (`start_decode_capture`, during generation), the model
runner's request ids and `query_start_loc` of that pass, so `routing.decode_rows` maps rows to requests; for
the replay prefill (`start_capture`) `routing.rows_per_sequence` maps them by positions and token ids.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Dict, List

import numpy as np
import torch

_CAPTURE: Dict[str, object] = {"enabled": False, "steps": [], "layers": {}, "bound": 0, "layer_ids": [],
                               "runner": None, "batches": []}


def _record_layer(layer_id: int, topk_ids: torch.Tensor) -> None:
    if _CAPTURE["enabled"]:
        _CAPTURE["layers"].setdefault(layer_id, []).append(topk_ids.detach().to("cpu", torch.int16).numpy().copy())


def _pre_hook(module, args, kwargs):
    if _CAPTURE["enabled"]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        _CAPTURE["steps"].append((input_ids.detach().cpu().numpy().copy(), positions.detach().cpu().numpy().copy()))
        runner = _CAPTURE["runner"]
        if runner is not None:  # decode capture: which request each row belongs to (set by _prepare_inputs)
            n = int(runner.input_batch.num_reqs)
            _CAPTURE["batches"].append((list(runner.input_batch.req_ids[:n]),
                                        np.asarray(runner.query_start_loc.np[:n + 1], dtype=np.int64).copy()))


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
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    _CAPTURE["bound"] = len(layer_ids)
    _CAPTURE["layer_ids"] = sorted(layer_ids)
    return len(layer_ids)


def start_capture(model: torch.nn.Module) -> int:
    """Capture for a replay prefill (`LLM.apply_model`): rows are mapped back by positions and token ids."""
    n = bind_capture(model)
    _CAPTURE.update(enabled=True, steps=[], layers={}, runner=None, batches=[])
    return n


def start_decode_capture(worker) -> int:
    """Capture during generation (`LLM.collective_rpc`): every forward pass also records the model runner's
    request ids and `query_start_loc` (rows `qsl[i]:qsl[i + 1]` belong to request i), so rows map to requests
    however vLLM interleaves, chunks or preempts them."""
    runner = worker.model_runner
    n = bind_capture(runner.get_model())
    _CAPTURE.update(enabled=True, steps=[], layers={}, runner=runner, batches=[])
    return n


def stop_capture(_model_or_worker) -> dict:
    """Stop and return what was recorded: `steps` = per forward pass (input_ids, positions),
    `layers[layer_id]` = per forward pass `[num_tokens, topk]` int16 top-k ids, all as bytes + shapes, and for
    decode capture `batches` = per forward pass (request ids, query_start_loc)."""
    _CAPTURE["enabled"] = False
    pack = lambda a: (a.tobytes(), a.dtype.str, a.shape)  # noqa: E731
    out = {"steps": [(pack(i), pack(p)) for i, p in _CAPTURE["steps"]],
           "layers": {int(k): [pack(t) for t in v] for k, v in _CAPTURE["layers"].items()},
           "layer_ids": list(_CAPTURE["layer_ids"]),
           "batches": [(ids, pack(q)) for ids, q in _CAPTURE["batches"]]}
    _CAPTURE.update(steps=[], layers={}, runner=None, batches=[])
    return out


def unpack_capture(rec: dict) -> dict:
    """Driver side: bytes back to numpy arrays (the layout `routing.rows_per_sequence` reads)."""
    un = lambda b: np.frombuffer(b[0], dtype=np.dtype(b[1])).reshape(b[2])  # noqa: E731
    return {"steps": [(un(i), un(p)) for i, p in rec["steps"]],
            "layers": {int(k): [un(t) for t in v] for k, v in rec["layers"].items()},
            "layer_ids": rec["layer_ids"], "batches": [(ids, un(q)) for ids, q in rec.get("batches", [])]}


# ------------------------------------------------------------------------------------------------ weights
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
    # vLLM's fused layout: w13 = [experts, 2 * inter, hidden] (gate rows, then up rows), w2 = [experts, hidden, inter]
    w13 = torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]], 0) for e in range(n)])
    w2 = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    impl = _find_experts_impl(moe._quant_method if hasattr(moe, "_quant_method") else moe)
    dtype = moe.w13_weight.dtype
    replace_parameter(moe, "w13_weight", w13.to(dtype).contiguous())
    replace_parameter(moe, "w2_weight", w2.to(dtype).contiguous())
    if impl is not None:  # re-pack for the kernel, exactly as after the first load
        impl.process_weights_after_loading(moe)


def reload_weights(worker, payload) -> int:
    """Load a bucket of HF-named tensors, sent as safetensors bytes or a safetensors file on a tmpfs
    (`transfer.packed`; safetensors executes nothing), into the engine's model in place. Returns the number of
    tensors received.

    vLLM's own `reload_weights` left part of the old weights in place on CPU (the CPU kernels keep packed
    copies: linear layers a oneDNN/SGL handle, MoE experts a VNNI-packed buffer). Measured on the tests' tiny
    model after a 0.05-sigma perturbation of every weight (linear layers kept plain by the plugin): log-prob
    |Δ| to the new weights mean 0.17 / max 0.60 nats with all tensors in one call, mean 0.49 with two
    buckets; this function: mean 2e-7 / max 5e-7 with 33 buckets. So: plain parameters go
    through the model's `load_weights` (linear layers stay plain tensors thanks to rollout/vllm_plugin.py),
    and each MoE layer's experts, once all of them have arrived (a layer may span buckets), are stacked into
    the kernel's fused tensors and packed again by the experts implementation's `process_weights_after_loading`."""
    from upgrpo_megatron.rollout.transfer import unpack

    weights = unpack(payload)
    model = worker.model_runner.get_model()
    plain = []
    for name, t in weights.items():
        m = _EXPERT.match(name)
        if m:
            _PENDING_EXPERTS.setdefault(int(m.group(1)), {})[(int(m.group(2)), m.group(3))] = t
        else:
            plain.append((name, t))
    cfg = model.config
    num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    with torch.no_grad():
        if plain:
            model.load_weights(iter(plain))
        for layer in [k for k, v in _PENDING_EXPERTS.items() if len(v) == 3 * num_experts]:
            _load_layer_experts(model, layer, _PENDING_EXPERTS.pop(layer))
    return len(weights)


def load_weights_in_process(worker, named) -> int:
    """GPU engines under `external_launcher` (GPU path not yet run, see README): the worker is in the
    trainer's process, so (name, tensor) pairs arrive by reference, on the GPU. vLLM's own `load_weights` cuts
    each rank's tensor-parallel shard and maps per-expert names into its fused MoE weights; the CUDA kernels
    read the parameters directly (no packed copies as on CPU), so no re-packing follows."""
    model = worker.model_runner.get_model()
    with torch.no_grad():
        model.load_weights(iter(named))
    return len(named)


def pending_expert_layers(worker, clear: bool = True) -> Dict[int, int]:
    """Layers whose experts arrived only in part (layer -> tensors received); cleared when `clear`."""
    out = {int(k): len(v) for k, v in _PENDING_EXPERTS.items()}
    if clear:
        _PENDING_EXPERTS.clear()
    return out


def unsyncable_linear_layers(model: torch.nn.Module) -> List[str]:
    """Linear layers whose weight the CPU backend moved into a packed kernel handle (emptied parameter):
    in-place weight sync cannot reach them. Empty when rollout/vllm_plugin.py is active."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    bad = []
    for name, m in model.named_modules():
        if isinstance(m, (LinearBase, VocabParallelEmbedding)):
            w = getattr(m, "weight", None)
            if w is not None and w.numel() == 0:
                bad.append(name)
    return bad
