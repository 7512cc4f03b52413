"""bench/losses.py runs end to end at a tiny size and writes its entries in results.json's format (no timing
assertions: speed is measured by the benchmark, not tested)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_losses_bench_tiny_writes_time_and_memory_entries(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"other_measure": {"ours": 1, "theirs": 1, "ratio": 1, "unit": "s", "config": {},
                                                     "extra": {}}}))
    env = dict(os.environ, BENCH_RESULTS=str(results), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "losses.py"), "--tiny", "--dtypes", "fp32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(results.read_text())
    assert "other_measure" in data  # merged, not overwritten
    for name, unit in (("losses_up_grpo_fwd_bwd_fp32_tiny", "s/call"), ("losses_up_grpo_peak_mem_fp32_tiny", "MiB")):
        e = data[name]
        assert e["unit"] == unit and e["config"]["batch"] == 16 and e["config"]["response_len"] == 256
        assert e["ours"] >= 0 and e["theirs"] >= 0 and e["ratio"] >= 0
