"""The vLLM rollout engine: n samples per prompt with log-probs, rollout routing, in-memory weight sync.

    engine = RolloutEngine(hf_dir, dtype="float32", seed=1, max_model_len=64)
    batch = engine.generate(prompt_ids, n=8, temperature=1.0, max_tokens=16, stop_token_ids=[eos])
    engine.update_weights(hf_named_tensors, version=1)

Rollout routing, `[response_len, moe_layers, topk]` per sample: routing[t] is the top-k experts the engine
chose for the input position that holds response token t (the same positions the trainer routes when it
scores prompt + response). On GPU builds that support it, vLLM returns them natively
(`enable_return_routed_experts`); the CPU build cannot (it needs Model Runner V2 and Triton's CPU backend),
so after generation the completed sequences are re-run once as a prefill with capture callbacks bound to the
engine's MoE routers (the same hook vLLM's own capturer uses). Both paths produce the same structure. The
replay runs the engine's kernels on the same weights, but as a prefill rather than token-by-token decode;
on CPU both paths use the same GEMMs, so differences are at the level of float summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch


class RolloutError(RuntimeError):
    """The rollout engine cannot do what was asked (bad prompt, unsupported model, engine died)."""


CPU_HEAD_DIMS = (64, 128)


@dataclass
class RolloutSample:
    prompt_index: int
    sample_index: int
    response_ids: List[int]
    log_probs: List[float]
    finish_reason: str
    routing: Optional[np.ndarray] = None  # [response_len, moe_layers, topk] int16


@dataclass
class RolloutBatch:
    samples: List[RolloutSample] = field(default_factory=list)
    weight_version: int = 0
    seconds: float = 0.0

    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)


def _engine_env():
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # our capture fns travel by reference
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


class RolloutEngine:
    def __init__(self, hf_dir: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int = 256,
                 kv_cache_gib: float = 1.0, enforce_eager: bool = True, capture_routing: bool = True,
                 gpu_memory_utilization: float = 0.6, max_num_seqs: int = 256):
        import json

        cfg = json.loads((open(os.path.join(hf_dir, "config.json")).read()))
        self.num_moe_layers = cfg["num_hidden_layers"] - len(cfg.get("mlp_only_layers") or [])
        self.topk = cfg["num_experts_per_tok"]
        self.max_model_len = max_model_len
        self.capture_routing = capture_routing
        self.on_gpu = torch.cuda.is_available()
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        if not self.on_gpu and head_dim not in CPU_HEAD_DIMS:
            raise RolloutError(f"head_dim={head_dim}: the CPU vLLM engine supports head_dim "
                               f"{' or '.join(map(str, CPU_HEAD_DIMS))} (set model.head_dim accordingly)")
        _engine_env()
        if not self.on_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gib))))
            # keep CPU linear weights syncable in place (see rollout/vllm_plugin.py)
            os.environ["UPGRPO_VLLM_SYNCABLE_CPU_LINEAR"] = "1"
        from vllm import LLM

        kwargs = dict(model=hf_dir, skip_tokenizer_init=True, dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                      max_model_len=max_model_len, enable_prefix_caching=False, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max(8192, max_model_len))
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization,
                          enable_return_routed_experts=capture_routing)
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM's start-up errors are long; keep the cause
            raise RolloutError(f"the vLLM engine failed to start for {hf_dir}: {type(e).__name__}: {e}") from e
        self.weight_version = 0
        self.sleeping = False

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = -1, max_tokens: int = 16, stop_token_ids: Sequence[int] = (),
                 seed: Optional[int] = None) -> RolloutBatch:
        """Samples ordered prompt-major, then sample index (deterministic for a seed)."""
        import time

        from vllm import SamplingParams

        t0 = time.perf_counter()
        if len(prompt_token_ids) == 0:
            return RolloutBatch([], self.weight_version)
        for i, p in enumerate(prompt_token_ids):
            if len(p) == 0:
                raise RolloutError(f"prompt {i} is empty")
            if len(p) + max_tokens > self.max_model_len:
                raise RolloutError(f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} it exceeds the "
                                   f"engine's max_model_len={self.max_model_len}")
        if self.sleeping:
            self.wake_up()
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                stop_token_ids=list(stop_token_ids), logprobs=0, detokenize=False, seed=seed)
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_token_ids]
        outputs = self._call(lambda: self.llm.generate(prompts, params, use_tqdm=False))
        samples = []
        for pi, out in enumerate(outputs):
            for si, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for d, t in zip(c.logprobs or [], ids)]
                routing = None
                native = getattr(c, "routed_experts", None)
                if native is not None:
                    routing = self._native_response_routing(np.asarray(native), len(prompt_token_ids[pi]), len(ids))
                samples.append(RolloutSample(pi, si, ids, lps, str(c.finish_reason), routing))
        if self.capture_routing and any(s.routing is None for s in samples):
            self._replay_routing(prompt_token_ids, samples)
        return RolloutBatch(samples, self.weight_version, time.perf_counter() - t0)

    def _native_response_routing(self, routed: np.ndarray, prompt_len: int, resp_len: int) -> np.ndarray:
        # native: [seq_len, layers, topk] over prompt + response positions
        return routed[prompt_len : prompt_len + resp_len].astype(np.int16)

    def _replay_routing(self, prompt_token_ids, samples: List[RolloutSample]) -> None:
        """Re-run prompt + response as one prefill with capture on; cut out each response's rows."""
        from vllm import SamplingParams

        from upgrpo_megatron.rollout import worker_ext

        seqs = [list(map(int, prompt_token_ids[s.prompt_index])) + s.response_ids for s in samples]
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        self._call(lambda: self.llm.apply_model(worker_ext.start_capture))
        try:
            self._call(lambda: self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False))
        finally:
            rec = self._call(lambda: self.llm.apply_model(worker_ext.stop_capture))[0]
        per_seq = _rows_per_sequence(rec, seqs)
        for s, seq, rows in zip(samples, seqs, per_seq):
            p = len(seq) - len(s.response_ids)
            s.routing = rows[p:].astype(np.int16)  # [response_len, layers, topk]

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]], version: int,
                       bucket_bytes: int = 256 * 1024**2) -> dict:
        """Stream HF-named tensors into the engine in memory, in buckets of about `bucket_bytes`."""
        import time

        from upgrpo_megatron.rollout import worker_ext

        t0 = time.perf_counter()
        if self.sleeping:
            self.wake_up()
        from safetensors.torch import save

        def send(bucket):
            blob = save(bucket)
            return sum(self._call(lambda: self.llm.collective_rpc(worker_ext.reload_weights, args=(blob,))))

        bucket, size, n, total = {}, 0, 0, 0
        for name, t in named_tensors:
            t = t.detach().cpu().contiguous()
            bucket[name] = t.clone() if t.storage_offset() else t
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                n, total, bucket, size = n + send(bucket), total + size, {}, 0
        if bucket:
            n, total = n + send(bucket), total + size
        self.weight_version = version
        return {"tensors": n, "bytes": total, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ lifecycle
    def sleep(self) -> None:
        """Release the KV cache between rollouts where the engine supports it (GPU); a no-op on CPU."""
        if self.on_gpu and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            self.llm = None

    def _call(self, fn):
        try:
            return fn()
        except RolloutError:
            raise
        except Exception as e:
            name = type(e).__name__
            if "EngineDead" in name or "EngineDead" in str(e) or isinstance(e, (BrokenPipeError, EOFError)):
                raise RolloutError(f"the vLLM engine process died ({name}: {e})") from e
            raise


def _layer_steps(rec: dict, lid):
    layers = rec["layers"]
    return layers[lid] if lid in layers else layers[str(lid)]


def _rows_per_sequence(rec: dict, seqs: List[List[int]]) -> List[np.ndarray]:
    """Map captured prefill rows back to sequences: `[len(seq), layers, topk]` each.

    Rows arrive as forward passes of concatenated request chunks. A chunk starts at position 0 (a new
    request) or continues a request whose rows stopped one position earlier (chunked prefill). Each completed
    row group is matched to a sequence by its token ids (identical sequences are interchangeable)."""
    layer_ids = rec["layer_ids"]
    open_segs: List[dict] = []
    done: List[dict] = []
    for step, (ids, pos) in enumerate(rec["steps"]):
        # (tensors may arrive as nested lists: vLLM's RPC serialiser converts them)
        topk = np.stack([np.asarray(_layer_steps(rec, lid)[step]) for lid in layer_ids], axis=1)  # [rows, L, k]
        ids, pos = np.asarray(ids).reshape(-1), np.asarray(pos).reshape(-1)
        start = 0
        while start < len(pos):
            end = start + 1
            while end < len(pos) and pos[end] == pos[end - 1] + 1:
                end += 1
            if pos[start] == 0:
                seg = {"ids": [], "rows": []}
                open_segs.append(seg)
            else:
                seg = next((s for s in open_segs if len(s["ids"]) == pos[start]), None)
                if seg is None:
                    raise RolloutError("routing capture: a prefill chunk does not continue any request")
            seg["ids"].extend(ids[start:end].tolist())
            seg["rows"].append(topk[start:end])
            start = end
    done = open_segs
    by_tokens: dict = {}
    for seg in done:
        by_tokens.setdefault(tuple(seg["ids"]), []).append(np.concatenate(seg["rows"]))
    out = []
    for s in seqs:
        bucket = by_tokens.get(tuple(s))
        if not bucket:
            raise RolloutError("routing capture: a sequence's prefill rows were not captured")
        out.append(bucket.pop(0))
    return out
