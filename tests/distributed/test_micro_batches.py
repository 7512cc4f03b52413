"""Micro-batches packed by length stay collective-safe when the ranks' rows differ: with experts split over
two data-parallel ranks (EP=2: the CPU dispatcher all-gathers tokens over both), every rank runs the agreed
shapes and gets what the full-width pass gives. (TP ranks hold the same rows, so they plan alike anyway.)"""
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker_micro_batches.py")


def test_packed_micro_batches_agree_across_expert_parallel_ranks(torchrun, tmp_path):
    out = tmp_path / "mb.json"
    torchrun(WORKER, 2, ["--ep", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["own_counts"][0] < r["own_counts"][1]  # the ranks' own packings differ in length...
    assert r["agreed"] == r["own_counts"][1]        # ...and all run the larger one
    assert r["max_lp_diff"] < 1e-5 and r["routing_diff_frac"] == 0.0
    assert r["skipped"] == 0.0 and r["grad_norm"] > 0
