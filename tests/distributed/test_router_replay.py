"""Routing replay (the R2/R3 comparison arms) through megatron-core's RouterReplay in our actor, at one rank
and with experts split over two ranks (EP=2, whose token dispatch must carry the replayed choice)."""
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker_replay.py")


@pytest.mark.parametrize("nproc, args", [(1, []), (2, ["--ep", "2"])], ids=["single", "ep2"])
def test_replay_fixes_the_experts_and_keeps_the_router_learning(torchrun, tmp_path, nproc, args):
    out = tmp_path / "replay.json"
    torchrun(WORKER, nproc, [*args, "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["routing_matches_record"]            # full_routing and the RECORD pass agree
    assert r["own_max_diff"] < 1e-5               # replaying what the router chose anyway changes nothing
    assert r["swapped_max_diff"] < 1e-5           # gate weights come from the logits, not the replayed order
    assert r["other_changed_frac"] > 0.5 and r["other_max_diff"] > 1e-3  # another routing is really used
    assert r["router_params"] >= 2 and r["router_update"] > 0 and r["skipped"] == 0.0  # router gets gradients
