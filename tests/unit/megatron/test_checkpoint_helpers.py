"""megatron's checkpoint writer processes are forked from the saving thread; `results_queue_dies_with_us` wraps
their target so each sets a parent-death signal first (a writer busy when the trainer was SIGKILLed outlived it
in CI). The end-to-end check is tests/reliability/test_faults.py (orphans after a SIGKILL); this one checks what
megatron will call, in a forked child and in this process."""
import inspect
import multiprocessing as mp
import signal

from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

from upgrpo_megatron.megatron import checkpoint


def _child_pdeathsig(q) -> None:
    import ctypes

    PR_GET_PDEATHSIG = 2
    sig = ctypes.c_int(0)
    ctypes.CDLL("libc.so.6").prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    q.put(sig.value)


def test_the_forked_writers_target_sets_a_parent_death_signal_in_the_child_only(monkeypatch):
    monkeypatch.setattr(fa.FileSystemWriterAsync, "write_preloaded_data", staticmethod(
        lambda *a, **k: _child_pdeathsig(k["results_queue"])))
    checkpoint._writers_die_with_us(fa)
    wrapped = fa.FileSystemWriterAsync.write_preloaded_data
    assert wrapped._dies_with_parent
    assert inspect.signature(wrapped) == inspect.signature(wrapped.__wrapped__)  # megatron inspects it
    checkpoint._writers_die_with_us(fa)  # idempotent: not wrapped twice
    assert fa.FileSystemWriterAsync.write_preloaded_data is wrapped
    ctx = mp.get_context("fork")  # as megatron starts them
    q = ctx.Queue()
    p = ctx.Process(target=fa.FileSystemWriterAsync.write_preloaded_data, kwargs={"results_queue": q})
    p.start()
    p.join(30)
    assert q.get(timeout=5) == int(signal.SIGKILL)  # the child dies with us
    q2 = ctx.Queue()
    wrapped(results_queue=q2)  # called in this process: no signal set here
    assert q2.get(timeout=5) == 0
