"""Every benchmark script runs end to end at its --tiny size and writes its entries, with finite numbers, into
the results file named by BENCH_RESULTS (a temporary one: bench/results.json is never touched here).
No timing assertions: speed is what the benchmarks measure, not what the tests pin."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
TIMEOUT = 600


def run_tiny(script, tmp_path, *args):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"other_measure": {"ours": 1, "theirs": 1, "ratio": 1, "unit": "s", "config": {},
                                                     "extra": {}}}))
    env = dict(os.environ, BENCH_RESULTS=str(results), PYTHONUNBUFFERED="1", UPGRPO_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--tiny", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{script} --tiny failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(results.read_text())
    assert "other_measure" in data, "record() must merge into the results file, not overwrite it"
    assert not (BENCH / "results.json").samefile(results)
    return data


def assert_entries(data, names, signed=()):
    """`signed`: entries whose `ours` is a fitted exponent, not a time or a size: on tiny, noisy sweeps it may come
    out negative (CI: alpha = -0.077 at load 3 on 2 cores), and the entry then says ratio 0."""
    for name in names:
        assert name in data, f"{name} not written (have: {sorted(data)})"
        e = data[name]
        for key in ("ours", "theirs", "ratio"):
            assert isinstance(e[key], (int, float)) and math.isfinite(e[key]), (name, key, e[key])
        assert (name in signed or e["ours"] >= 0) and e["theirs"] >= 0 and e["ratio"] >= 0, (name, e)
        if name in signed and e["ours"] <= 0:
            assert e["ratio"] == 0, (name, e)
        assert e["unit"] and isinstance(e["config"], dict), name


@pytest.mark.slow
def test_losses_bench_tiny(tmp_path):
    data = run_tiny("losses.py", tmp_path, "--dtypes", "fp32")
    assert_entries(data, ["losses_up_grpo_fwd_bwd_fp32_tiny", "losses_up_grpo_peak_mem_fp32_tiny"])


@pytest.mark.slow
def test_actor_step_bench_tiny(tmp_path):
    assert_entries(run_tiny("actor_step.py", tmp_path), ["actor_step_tiny"])


@pytest.mark.slow
def test_convert_bench_tiny(tmp_path):
    assert_entries(run_tiny("convert.py", tmp_path), ["convert_hf_to_megatron_tiny", "convert_megatron_to_hf_tiny"])


def test_diagnostics_bench_tiny(tmp_path):
    assert_entries(run_tiny("diagnostics.py", tmp_path), ["diagnostics_step_tiny"])


@pytest.mark.slow
@pytest.mark.distributed
def test_scaling_bench_tiny_sweeps_fit_and_two_ranks(tmp_path):
    data = run_tiny("scaling.py", tmp_path)
    assert_entries(data, ["scaling_hidden_tiny", "scaling_experts_tiny", "scaling_layers_tiny", "scaling_tokens_tiny",
                          "scaling_fit_tiny", "scaling_ranks_dp2_tiny", "scaling_ranks_ep2_tiny"],
                   signed={"scaling_fit_tiny"})
    assert 0 <= data["scaling_fit_tiny"]["config"]["r2"] <= 1
    assert data["scaling_ranks_ep2_tiny"]["config"]["ep"] == 2


@pytest.mark.slow
@pytest.mark.vllm
def test_rollout_bench_tiny(tmp_path):
    assert_entries(run_tiny("rollout.py", tmp_path), ["rollout_tiny"])


@pytest.mark.slow
@pytest.mark.vllm
def test_rl_step_bench_tiny_against_trl(tmp_path):
    pytest.importorskip("trl", reason="TRL is the alternative rl_step.py measures against: pip install -e '.[dev]'")
    data = run_tiny("rl_step.py", tmp_path)
    assert_entries(data, ["rl_step_vs_trl_tiny", "rl_diagnostics_share_tiny", "rl_weight_sync_share_tiny"])
    assert data["rl_step_vs_trl_tiny"]["extra"]["ours_timing_s_median"]["timing_s/weight_sync"] >= 0


def test_table_leaves_out_tiny_entries_and_updates_the_readme_between_markers(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.run_all import MARKERS, render_table, update_readme

    results = tmp_path / "results.json"
    entry = {"ours": 2.0, "theirs": 1.0, "ratio": 2.0, "unit": "s", "config": {"a": 1}}
    results.write_text(json.dumps({"m": entry, "m_tiny": entry}))
    table = render_table(results)
    assert "| m |" in table and "m_tiny" not in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{MARKERS[0]}\nold table\n{MARKERS[1]}\nafter\n")
    assert update_readme(table, readme)
    text = readme.read_text()
    assert text == f"intro\n{MARKERS[0]}\n{table}{MARKERS[1]}\nafter\n"


def test_paired_ratios_and_their_rendering(tmp_path):
    """The ratio of a comparison is the median of its pairwise ratios; the table shows [min-max], the machine and
    the load at the start, and a range that straddles 1 as no clear difference."""
    sys.path.insert(0, str(ROOT))
    from bench.common import Pairs, interleave, record
    from bench.run_all import render_table

    p = Pairs([1.0, 2.0, 1.0, 4.0, 1.0], [2.0, 2.0, 3.0, 2.0, 1.5])  # seconds: ratios 2, 1, 3, 0.5, 1.5
    assert p.ratios == [2.0, 1.0, 3.0, 0.5, 1.5] and p.ratio == 1.5
    tput = Pairs([10.0, 30.0], [5.0, 10.0], lower_is_better=False)  # throughput: ours / theirs
    assert tput.ratios == [2.0, 3.0]
    calls = []
    q = interleave(lambda: calls.append("a"), lambda: calls.append("b"), pairs=5, warmup=1)
    assert calls == ["a", "b"] * 6 and len(q.ours) == len(q.theirs) == 5

    results = tmp_path / "results.json"
    record("straddles", 1.0, 1.0, None, "s", {"x": 1}, path=results, pairs=p)
    record("clear", 1.0, 2.0, None, "s", {"x": 1}, path=results, pairs=Pairs([1.0] * 5, [2.0, 2.5, 3.0, 2.2, 2.1]))
    data = json.loads(results.read_text())
    assert data["straddles"]["pairs"] == [[1.0, 2.0], [2.0, 2.0], [1.0, 3.0], [4.0, 2.0], [1.0, 1.5]]
    assert data["straddles"]["n_pairs"] == 5 and len(data["straddles"]["load_avg_start"]) == 3
    table = render_table(results)
    assert table.startswith("Machine: ") and "cores" in table.splitlines()[0]
    row = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "no clear difference (1.50x [0.50-3.00], 5 pairs)" in row["straddles"]
    assert "**2.20x [2.00-3.00], 5 pairs**" in row["clear"]
