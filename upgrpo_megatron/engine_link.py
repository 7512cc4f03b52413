"""The trainer's one door to the rollout tier: start the engines, generate, sync weights, track the version.

    client = RolloutClient(cfg, tokenizer, run_dir)
    client.start(weights, version)         # collective: starts the engines, streams the actor's weights in
    batch = client.generate(prompt_ids, n=8, temperature=1.0, seed=s)   # the same RolloutBatch on every rank
    client.sync(weights)                   # collective: streams the actor's weights into the engines
    client.shutdown()

`weights` is `actor_hf_weights(model_cfg, module)`: called, it streams the actor's full weights as HF-named
tensors on every rank; `weights.for_ranks(receivers, stats)` streams them only to the ranks that feed an
engine, gathered inside the TP/EP groups that hold them (`megatron/weight_sync.py`). Iterating either is a
collective over the model-parallel groups: every rank iterates.

Placement (`rollout/placement.py`): one engine per data-parallel replica of the actor, colocated with it.
On CPU an independent vLLM engine per TP group (driven by its TP rank 0); on GPU vLLM's `external_launcher`
engine spanning `rollout.tp` ranks, run inside the trainer processes. Engine k generates the prompts
k, k + E, ... of the step, seeded by global prompt index, and the ranks exchange their shards in engine order
(one broadcast per engine, through host memory), so every rank holds the whole batch and a seeded step gives
the same batch for any number of engines.

Engines start on dummy weights (`load_format="dummy"`, only a config.json on disk) and receive the actor's
weights through the same in-memory sync as every later step: no checkpoint is written for them, and each
node needs only its own small config directory.

Failures: an engine that fails (to start, generate or sync) on any rank stops every rank with one message
naming that rank; the failed rank still takes part in the step's gathers, so no rank waits forever.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from upgrpo_megatron import console
from upgrpo_megatron.distributed import rank, world_size
from upgrpo_megatron.errors import TrainingStopped

WeightStream = Callable[[], Iterator[Tuple[str, torch.Tensor]]]
SYNC_BUCKET_BYTES = 256 * 1024**2  # per call into the engine process; a MoE layer's experts may span buckets


def all_gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (a list of one in a world of one)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def objects_from(sources: Sequence[int], obj, group=None) -> list:
    """The object of each rank in `sources`, in that order, on every rank: one `broadcast_object_list` per
    source. Each rank receives every source's object once and holds one pickled object at a time, where
    `all_gather_object` pads every rank's object to the largest and receives world x that at once (with a TP
    engine, every rank of the engine's group counts). With a gloo `group` the bytes stay in host memory."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = []
    for src in sources:
        box = [obj if dist.get_rank() == src else None]
        dist.broadcast_object_list(box, src=src, group=group)
        out.append(box[0])
    return out


class RolloutClient:
    def __init__(self, cfg, tokenizer, run_dir: Path):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.init_dir = Path(run_dir) / "engine_init"
        self.engine = None
        self.placement = None
        self.weight_version = 0
        self.last_sync = None  # SyncStats of the latest sync on this rank
        self._told_routing = False
        self._host_group = None  # a gloo group for the rollout's exchange when the default one is NCCL

    # --------------------------------------------------------------------------------------------- layout
    def _build_placement(self):
        from megatron.core import parallel_state as ps

        from upgrpo_megatron.config import ConfigError
        from upgrpo_megatron.rollout.placement import EnginePlacement

        try:
            return EnginePlacement.build(world_size=world_size(), tp=ps.get_tensor_model_parallel_world_size(),
                                         rollout_tp=self.cfg.rollout.tp, on_gpu=torch.cuda.is_available(),
                                         engine_core=self.cfg.rollout.engine_core)
        except ValueError as e:
            raise ConfigError(f"{e} (in {self.cfg.source})") from None

    @property
    def is_driver(self) -> bool:
        return self.engine is not None

    def _engine_name(self, r: int) -> str:
        p = self.placement
        if p.num_engines == 1:
            return ""
        return f" on data-parallel rank {p.engine_of(r)} (engine {p.engine_of(r)} of {p.num_engines}, global rank {r})"

    def _agree(self, what: str, error: Optional[Exception], before_update: bool) -> None:
        """Every rank learns whether any engine failed; all raise the first failure's message."""
        failed = [(r, e) for r, e in enumerate(all_gather_objects(None if error is None else str(error))) if e]
        if not failed:
            return
        r, msg = failed[0]
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise TrainingStopped(f"rollout engine failed{self._engine_name(r)}{more} during {what}: {msg}",
                              before_update=before_update)

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self, weights, version: int) -> None:
        """Start this rank's engine (drivers only), then stream the actor's weights in: the engines hold
        `version` afterwards (on resume: the checkpoint's). Collective."""
        from upgrpo_megatron.rollout import RolloutError

        self.placement = self._build_placement()
        from upgrpo_megatron.megatron.parallel import host_twin

        self._host_group = host_twin(torch.distributed.group.WORLD)  # on gloo: samples travel in host memory
        err = None
        if self.placement.is_driver(rank()):
            try:
                self.engine = self._start_engine()
            except RolloutError as e:
                err = e
        self._agree("start-up", err, before_update=True)
        self._sync(weights, version)
        if rank() == 0:
            s = self.last_sync
            console.say(f"rollout: {self.placement.describe()[0]}; weight sync on rank 0: {s.recv_bytes / 1e6:.2f} "
                        f"MB gathered, {s.engine_bytes / 1e6:.2f} MB into its engine")

    def _start_engine(self):
        from upgrpo_megatron.convert import hf_shapes, model_cfg_to_hf_config
        from upgrpo_megatron.rollout import RolloutEngine
        from upgrpo_megatron.router_replay import get_router_replay

        cfg, p, r = self.cfg, self.placement, self.cfg.rollout
        d = self.init_dir / f"rank_{rank()}"  # per rank: SPMD engine groups start together, each reads its own
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(model_cfg_to_hf_config(cfg.model, self.tokenizer), indent=2))
        return RolloutEngine(
            str(d), dtype={"fp32": "float32", "bf16": "bfloat16"}.get(r.dtype, r.dtype), seed=cfg.trainer.seed,
            max_model_len=cfg.data.max_prompt_length + cfg.data.max_response_length, kv_cache_gib=r.kv_cache_gib,
            enforce_eager=r.enforce_eager, capture_routing=r.capture_routing,
            keep_prompt_routing=get_router_replay(cfg.algorithm.router_replay).needs_prompt_routing,
            gpu_memory_utilization=r.gpu_memory_utilization, shapes=hf_shapes(cfg.model), load_format="dummy",
            tensor_parallel_size=p.group_size if p.in_process else 1, external_launcher=p.in_process,
            core_in_process=p.core_in_process,
        )

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def alive_processes(self) -> List[int]:
        return self.engine.alive_processes() if self.engine is not None else []

    # ---------------------------------------------------------------------------------------------- weights
    def sync(self, weights) -> None:
        """Stream the actor's weights into the engines; they then hold the next weight version."""
        self._sync(weights, self.weight_version + 1)

    def _sync(self, weights, version: int) -> None:
        from upgrpo_megatron.megatron.weight_sync import SyncStats
        from upgrpo_megatron.rollout import RolloutError

        t0 = time.perf_counter()
        stats = SyncStats()
        receivers: Set[int] = set(self.placement.drivers())
        stream = weights.for_ranks(receivers, stats) if hasattr(weights, "for_ranks") else weights()
        err = None
        if self.engine is not None:
            try:
                info = self.engine.update_weights(self._engine_view(stream, version), version=version,
                                                  bucket_bytes=SYNC_BUCKET_BYTES)
                stats.engine_bytes = info["bytes"]  # as the engine received them: in its dtype (bf16: half)
            except RolloutError as e:
                err = e
        for _ in stream:  # non-drivers, and a driver whose engine failed: take part in the remaining gathers
            pass
        stats.seconds = time.perf_counter() - t0
        self.last_sync = stats
        self._agree("weight sync", err, before_update=False)
        self.weight_version = version

    def _engine_view(self, stream, version: int):
        """What an engine receives: the actor's weights, with `rollout.router_noise` on the router weights (the
        trainer's own weights are never touched; rollout/weight_noise.py)."""
        from upgrpo_megatron.rollout.weight_noise import with_router_noise

        return with_router_noise(stream, self.cfg.rollout.router_noise, seed=self.cfg.trainer.seed, version=version)

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, n: int, temperature: float, seed: int):
        """n samples per prompt (prompt-major), the same `RolloutBatch` on every rank. An engine failure stops
        training on every rank (`TrainingStopped(before_update=True)`: no weight has changed yet)."""
        from upgrpo_megatron.rollout import RolloutError, merge_rank_batches

        r, d, p = self.cfg.rollout, self.cfg.data, self.placement
        me = rank()
        k = p.engine_of(me)
        own = p.prompts_of(k, len(prompt_ids))
        out, err = None, None
        if self.engine is not None:
            try:
                out = self.engine.generate(
                    [prompt_ids[i] for i in own], prompt_keys=own, n=n, temperature=temperature,
                    top_p=r.top_p if temperature > 0 else 1.0, top_k=r.top_k if temperature > 0 else -1,
                    max_tokens=d.max_response_length, stop_token_ids=[self.tokenizer.eos_token_id], seed=seed,
                )
                self.engine.sleep()  # GPU: release the KV cache while the actor trains (a no-op on CPU)
            except RolloutError as e:
                err = e
        if me == 0 and not self._told_routing and self.engine is not None and out is not None:
            console.say(f"rollout routing: {self.engine.routing_source}")
            self._told_routing = True
        failed = [(i, e) for i, e in enumerate(all_gather_objects(err)) if e is not None]
        if failed:
            i, e = failed[0]
            raise TrainingStopped(f"rollout engine failed{self._engine_name(i)}: {e}", before_update=True)
        # the engines' shares, in engine order, through host memory (README, Scale-out: the step batch)
        shares = objects_from([p.leader(e) for e in range(p.num_engines)], out if me == p.leader(k) else None,
                              group=self._host_group)
        return merge_rank_batches(shares, len(prompt_ids))


class ActorWeights:
    """The actor's weights as HF-named tensors, streamed (each call is a collective over TP/EP groups)."""

    def __init__(self, model_cfg, module):
        self.model_cfg, self.module = model_cfg, module

    def __call__(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Full weights on every rank (the HF export, tests)."""
        from upgrpo_megatron.convert import megatron_to_hf_stream
        from upgrpo_megatron.megatron.sharding import iter_full_params

        return megatron_to_hf_stream(self.model_cfg, iter_full_params(self.module))

    def for_ranks(self, receivers: Set[int], stats=None) -> Iterator[Tuple[str, torch.Tensor]]:
        """Full weights on the ranks in `receivers` only, gathered inside the groups that hold the shards."""
        from upgrpo_megatron.convert import megatron_to_hf_stream
        from upgrpo_megatron.megatron.weight_sync import engine_weights

        return megatron_to_hf_stream(self.model_cfg, engine_weights(self.module, receivers, stats))


def actor_hf_weights(model_cfg, module) -> ActorWeights:
    """The actor's full weights as HF-named tensors (a collective over TP/EP groups when iterated)."""
    return ActorWeights(model_cfg, module)
