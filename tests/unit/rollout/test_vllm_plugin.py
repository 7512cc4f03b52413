"""The engine processes' idle spin (vllm_plugin._short_idle_spin), on vLLM's real SpinCondition: a reader stops
busy-waiting after UPGRPO_VLLM_IDLE_SPIN_S, and its idle sleep is capped so a lost notification costs
IDLE_POLL_MS, not vLLM's 5 s recheck."""

from __future__ import annotations

import importlib

import pytest

shm = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")


@pytest.fixture
def patched(monkeypatch):
    """The plugin's patch applied to a fresh copy of SpinCondition's methods, undone afterwards."""
    from upgrpo_megatron.rollout import vllm_plugin

    cls = shm.SpinCondition
    monkeypatch.setattr(cls, "__init__", cls.__init__)
    monkeypatch.setattr(cls, "wait", cls.wait)
    monkeypatch.setattr(cls, "_upgrpo_spin_s", None, raising=False)
    monkeypatch.setenv(vllm_plugin.IDLE_SPIN_ENV, "0.02")
    vllm_plugin._short_idle_spin()
    return importlib.import_module("upgrpo_megatron.rollout.vllm_plugin")


def _reader_and_writer():
    import zmq
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    ctx = zmq.Context()
    addr = get_open_zmq_ipc_path()
    writer = shm.SpinCondition(is_reader=False, context=ctx, notify_address=addr)
    reader = shm.SpinCondition(is_reader=True, context=ctx, notify_address=addr)
    return ctx, reader, writer


def test_reader_spins_briefly_and_idle_wait_is_capped(patched):
    ctx, reader, writer = _reader_and_writer()
    try:
        assert reader.busy_loop_s == pytest.approx(0.02)  # vLLM's default is 1 s
        assert writer.busy_loop_s == 0
        polls = []
        real_poll = reader.poller.poll
        reader.poller.poll = lambda timeout=None: polls.append(timeout) or real_poll(timeout=0)
        reader.last_read = 0.0  # long idle: the reader sleeps on its notification socket
        reader.wait(timeout_ms=None)  # vLLM passes its 5 s recheck interval or None
        reader.wait(timeout_ms=5000)
        reader.wait(timeout_ms=2)
        assert polls == [patched.IDLE_POLL_MS, patched.IDLE_POLL_MS, 2]
    finally:
        ctx.destroy(linger=0)


def test_no_variable_leaves_vllm_as_it_is(monkeypatch):
    from upgrpo_megatron.rollout import vllm_plugin

    cls = shm.SpinCondition
    init, wait = cls.__init__, cls.wait
    monkeypatch.delenv(vllm_plugin.IDLE_SPIN_ENV, raising=False)
    vllm_plugin._short_idle_spin()
    assert (cls.__init__, cls.wait) == (init, wait)
    monkeypatch.setenv(vllm_plugin.IDLE_SPIN_ENV, "not-a-number")
    vllm_plugin._short_idle_spin()
    assert (cls.__init__, cls.wait) == (init, wait)
