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
import sys

ENV = "UPGRPO_VLLM_SYNCABLE_CPU_LINEAR"
OWNER_ENV = "UPGRPO_ENGINE_OWNER_PID"
IDLE_SPIN_ENV = "UPGRPO_VLLM_IDLE_SPIN_S"
IDLE_POLL_MS = 5  # an idle engine process rechecks its queue this often (a lost notification costs at most this)


def _plain_cpu_linear(layer, remove_weight: bool) -> None:
    import torch

    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def _tie_to_owner() -> None:
    """In the engine's own processes (EngineCore, workers): die with the parent, and only with it.

    - Out of the terminal's and the rank's process groups (`_leave_terminal`): a terminal's Ctrl-C goes to the
      whole foreground process group, and torchrun forwards the signal it gets to each rank's whole process
      group (`killpg`). Either way the engine used to die first (its own SIGINT handler) while the trainer was
      still finishing its step, which then hung on the dead engine and lost the checkpoint.
    - SIGKILL when the parent process dies: a trainer killed by SIGKILL (OOM killer, node agent) runs no
      cleanup, and vLLM's processes would live on as orphans holding CPU or GPU memory (Linux prctl).
    So the engine stops when the trainer shuts it down, or dies with it. `RolloutEngine` sets
    UPGRPO_ENGINE_OWNER_PID to the trainer's pid; every other process loading this plugin is an engine process."""
    owner = os.environ.get(OWNER_ENV)
    if not owner or str(os.getpid()) == owner or not sys.platform.startswith("linux"):
        return
    _leave_terminal()
    from upgrpo_megatron.parent_death import die_with_parent

    die_with_parent()


def _leave_terminal() -> None:
    """A session of its own (and so a process group of its own, with no terminal); where that is refused (a
    process that already leads a group), a group of its own and SIGINT ignored."""
    try:
        os.setsid()
    except OSError:
        import signal

        try:
            os.setpgid(0, 0)
        except OSError:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _short_idle_spin() -> None:
    """How long an engine process busy-waits (sched_yield) for the next message after its last read, in seconds
    from UPGRPO_VLLM_IDLE_SPIN_S (set by `RolloutEngine` on CPU; vLLM's own is 1 s).

    vLLM's shared-memory message queue (engine core <-> worker) keeps each reader spinning for 1 s after every
    read, so that the next decode step is picked up at once. Where the trainer shares the CPU cores with its
    engine, that second of spinning lands in the trainer's next phase: the RL step on 2 cores took 0.43 s or
    1.4 s for the same work, with the 1.0 s extra in whichever phase followed the engine's last message
    (log-probs of pi_old, or the update). Between decode steps the gap is milliseconds, so a short spin keeps
    generation's latency; after the last one, the reader sleeps on its zmq notification within this time.

    That sleep is capped at IDLE_POLL_MS: the notification can be lost (the writer's PUB socket keeps one message
    and drops the next while a stale one is pending), and vLLM then rechecks only after 5 s. The 1 s spin hid
    that; with a short spin it showed here as one rollout in fourteen taking 5.2 s instead of 0.2 s."""
    value = os.environ.get(IDLE_SPIN_ENV)
    if value is None:
        return
    try:
        spin_s = max(0.0, float(value))
    except ValueError:
        return
    try:
        from vllm.distributed.device_communicators import shm_broadcast
    except ImportError:
        return
    cls = getattr(shm_broadcast, "SpinCondition", None)
    if cls is None or getattr(cls, "_upgrpo_spin_s", None) is not None:
        return
    init, wait = cls.__init__, cls.wait

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = spin_s

    def capped_wait(self, timeout_ms=None):
        return wait(self, timeout_ms=IDLE_POLL_MS if timeout_ms is None else min(int(timeout_ms), IDLE_POLL_MS))

    cls.__init__, cls.wait = __init__, capped_wait
    cls._upgrpo_spin_s = spin_s


def register() -> None:
    _tie_to_owner()
    _short_idle_spin()
    if os.environ.get(ENV) != "1":
        return
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.utils as utils
    import vllm.model_executor.layers.vocab_parallel_embedding as vpe

    for module in (utils, linear, vpe):
        if hasattr(module, "dispatch_cpu_unquantized_gemm"):
            module.dispatch_cpu_unquantized_gemm = _plain_cpu_linear
