"""What the step moves between ranks, in host memory: every rank's rows of a step batch come back whole from
`gather_rows`, in their own dtype (the pi_old pass gathers int16 expert ids, `rollout.batch.ROUTING_DTYPE`, which
gloo and NCCL have no type for); the rollout's shares arrive from each engine's rank in order (`objects_from`);
both over `host_twin`'s gloo group, which a default group on another backend gets (NCCL on GPU; "cpu:gloo" here)."""
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]

WORKER = Path(__file__).with_name("worker_gather_rows.py")


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo"])
def test_rows_and_rollout_shares_travel_whole_over_a_gloo_group(torchrun, tmp_path, backend):
    out = tmp_path / "gather.json"
    torchrun(WORKER, 2, ["--backend", backend, "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["twin_backend"] == "gloo" and r["twin_ranks"] == [0, 1]
    assert r["twin_is_world"] == (backend == "gloo")  # a plain gloo world is used as it is; otherwise a twin
    assert r["routing"] == {"dtype": "torch.int16", "equal": True}
    assert r["log_prob"] == {"dtype": "torch.float32", "equal": True}
    assert r["ids"] == {"dtype": "torch.int64", "equal": True}
    assert r["objects"] == [[1, 200, 1], [0, 100, 0]]  # in the order asked for, each at its own size
