"""A weight bucket's way to the engine's worker (rollout/transfer.py): through a tmpfs file when there is room,
as bytes otherwise; either way the worker gets the same tensors back and no file outlives the call."""

from __future__ import annotations

import os

import pytest
import torch

from upgrpo_megatron.rollout import transfer


def _bucket():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
            "c.idx": torch.arange(5)}


def _same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k])


def test_file_path_round_trips_and_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "SHM_DIR", str(tmp_path))
    bucket = _bucket()
    with transfer.packed(bucket) as payload:
        assert isinstance(payload, str) and os.path.dirname(payload) == str(tmp_path) and os.path.exists(payload)
        _same(bucket, transfer.unpack(payload))
    assert os.listdir(tmp_path) == []


def test_file_is_removed_when_the_call_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "SHM_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="engine died"):
        with transfer.packed(_bucket()):
            raise RuntimeError("engine died")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["none", "missing", "no room"])
def test_bytes_where_there_is_no_usable_tmpfs(tmp_path, monkeypatch, where):
    monkeypatch.setattr(transfer, "SHM_DIR", None if where == "none" else str(tmp_path / "absent")
                        if where == "missing" else str(tmp_path))
    if where == "no room":
        monkeypatch.setattr(transfer, "HEADROOM", 10**15)
    bucket = _bucket()
    with transfer.packed(bucket) as payload:
        assert isinstance(payload, bytes)
        _same(bucket, transfer.unpack(payload))
    assert not any(p.name.startswith("upgrpo-weights") for p in tmp_path.iterdir())


def test_bytes_when_writing_the_file_fails(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        open(a[1], "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transfer, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    bucket = _bucket()
    with transfer.packed(bucket) as payload:
        assert isinstance(payload, bytes)
        _same(bucket, transfer.unpack(payload))
    assert os.listdir(tmp_path) == []
