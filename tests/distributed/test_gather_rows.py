"""Every rank's rows of a step batch come back whole from `gather_rows`, in their own dtype: the pi_old pass
gathers int16 expert ids (`rollout.batch.ROUTING_DTYPE`), which gloo and NCCL have no type for."""
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]

WORKER = Path(__file__).with_name("worker_gather_rows.py")


def test_gather_rows_returns_the_whole_tensor_for_each_dtype(torchrun, tmp_path):
    out = tmp_path / "gather.json"
    torchrun(WORKER, 2, ["--out", str(out)])
    r = json.loads(out.read_text())
    assert r == {"routing": {"dtype": "torch.int16", "equal": True},
                 "log_prob": {"dtype": "torch.float32", "equal": True},
                 "ids": {"dtype": "torch.int64", "equal": True}}
