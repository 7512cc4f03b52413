"""The trainer's one door to the rollout tier: start the engine, generate, sync weights, track the version.

    client = RolloutClient(cfg, tokenizer, run_dir)
    client.start(weights, version)         # collective: exports the actor's weights, starts vLLM
    batch = client.generate(prompt_ids, n=8, temperature=1.0, seed=s)   # the same RolloutBatch on every rank
    client.sync(weights)                   # collective: streams the actor's weights into the engine
    client.shutdown()

`weights` is a zero-argument callable returning the actor's full weights as HF-named tensors; iterating it
is a collective over the model-parallel groups (every rank iterates, see `megatron/sharding.py`).

Placement today: one vLLM engine, driven by global rank 0, generates the whole step; the batch is broadcast
to every rank. All ranks join each weight gather; rank 0 streams the HF-named tensors into its engine.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

from upgrpo_megatron.distributed import broadcast_object, rank
from upgrpo_megatron.errors import TrainingStopped

WeightStream = Callable[[], Iterator[Tuple[str, torch.Tensor]]]


class RolloutClient:
    def __init__(self, cfg, tokenizer, run_dir: Path):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.init_dir = Path(run_dir) / "engine_init"
        self.engine = None
        self.weight_version = 0

    @property
    def is_driver(self) -> bool:
        return rank() == 0

    def start(self, weights: WeightStream, version: int) -> None:
        """Export the current weights once as an HF directory and start vLLM on rank 0. The engine starts from
        these weights, so it holds `version` (on resume: the checkpoint's)."""
        from upgrpo_megatron.convert import save_hf_checkpoint

        tensors = list(self._engine_view(weights(), version))  # collective: every rank iterates
        if self.is_driver:
            if self.init_dir.exists():
                shutil.rmtree(self.init_dir)
            save_hf_checkpoint(self.cfg.model, iter(tensors), self.init_dir, tokenizer=self.tokenizer)
            from upgrpo_megatron.rollout import RolloutEngine

            r = self.cfg.rollout
            self.engine = RolloutEngine(
                str(self.init_dir), dtype={"fp32": "float32", "bf16": "bfloat16"}.get(r.dtype, r.dtype),
                seed=self.cfg.trainer.seed,
                max_model_len=self.cfg.data.max_prompt_length + self.cfg.data.max_response_length,
                kv_cache_gib=r.kv_cache_gib, enforce_eager=r.enforce_eager, capture_routing=r.capture_routing,
                gpu_memory_utilization=r.gpu_memory_utilization,
            )
            self.engine.weight_version = version
        del tensors
        self.weight_version = version

    def sync(self, weights: WeightStream) -> None:
        """Stream the actor's weights into the engine; the engine then holds the next weight version."""
        self.weight_version += 1
        stream = self._engine_view(weights(), self.weight_version)
        if self.is_driver:
            self.engine.update_weights(stream, version=self.weight_version)
        else:
            for _ in stream:  # take part in the gathers
                pass

    def _engine_view(self, stream, version: int):
        """What the engine receives: the actor's weights, with `rollout.router_noise` on the router weights."""
        from upgrpo_megatron.rollout.weight_noise import with_router_noise

        return with_router_noise(stream, self.cfg.rollout.router_noise, seed=self.cfg.trainer.seed, version=version)

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, n: int, temperature: float, seed: int):
        """n samples per prompt (prompt-major), the same `RolloutBatch` on every rank. An engine failure stops
        training on every rank (`TrainingStopped(before_update=True)`: no weight has changed yet)."""
        r, d = self.cfg.rollout, self.cfg.data
        out = None
        if self.is_driver:
            from upgrpo_megatron.rollout import RolloutError

            try:
                out = self.engine.generate(
                    prompt_ids, n=n, temperature=temperature, top_p=r.top_p if temperature > 0 else 1.0,
                    top_k=r.top_k if temperature > 0 else -1, max_tokens=d.max_response_length,
                    stop_token_ids=[self.tokenizer.eos_token_id], seed=seed,
                )
            except RolloutError as e:
                out = e
        out = broadcast_object(out)
        if isinstance(out, Exception):
            raise TrainingStopped(f"rollout engine failed: {out}", before_update=True)
        return out

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def alive_processes(self) -> List[int]:
        return self.engine.alive_processes() if self.engine is not None else []


def actor_hf_weights(model_cfg, module) -> WeightStream:
    """The actor's full weights as HF-named tensors (a collective over TP/EP groups when iterated)."""
    def stream() -> Iterator[Tuple[str, torch.Tensor]]:
        from upgrpo_megatron.convert import megatron_to_hf_stream
        from upgrpo_megatron.megatron.sharding import iter_full_params

        return megatron_to_hf_stream(model_cfg, iter_full_params(module))

    return stream


