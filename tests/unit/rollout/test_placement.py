"""Engine placement (rollout/placement.py) and the --dry-run planner that prints it."""
from pathlib import Path

import pytest

from upgrpo_megatron.config import ConfigError, load_recipe, validate_layout
from upgrpo_megatron.rollout.placement import EnginePlacement
from upgrpo_megatron.sizing import dry_run, estimate_memory

ROOT = Path(__file__).resolve().parents[3]


def test_cpu_engines_one_per_tp_group_driven_by_its_first_rank():
    p = EnginePlacement.build(world_size=4, tp=2, on_gpu=False)
    assert (p.num_engines, p.in_process) == (2, False)
    assert [p.engine_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert p.drivers() == [0, 2] and p.group_ranks(1) == [2, 3]


def test_gpu_engines_span_rollout_tp_ranks_and_every_rank_runs_them():
    p = EnginePlacement.build(world_size=8, tp=2, rollout_tp=4, on_gpu=True)
    assert (p.num_engines, p.in_process) == (2, True)
    assert p.drivers() == list(range(8)) and [p.leader(e) for e in range(2)] == [0, 4]


def test_prompts_are_dealt_by_global_index_and_cover_the_step_once():
    p = EnginePlacement.build(world_size=3, tp=1, on_gpu=False)
    shards = [p.prompts_of(e, 7) for e in range(p.num_engines)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for s in shards for i in s) == list(range(7))


@pytest.mark.parametrize("world, setting, numa, here", [
    (1, "auto", 1, True), (2, "auto", 1, False), (1, "subprocess", 1, False), (1, "in_process", 1, True),
    (4, "subprocess", 1, False),
    (1, "auto", 2, False),  # vLLM would bind the trainer's memory to one NUMA node
    (1, "in_process", 2, True),
])
def test_a_cpu_engines_core_runs_in_the_trainer_process_at_world_size_one_unless_told_otherwise(
        monkeypatch, world, setting, numa, here):
    from upgrpo_megatron.rollout import placement

    monkeypatch.setattr(placement, "numa_nodes", lambda: numa)
    p = EnginePlacement.build(world_size=world, tp=1, on_gpu=False, engine_core=setting)
    assert p.core_in_process is here and p.in_process is False
    assert ("core runs in the trainer process" in p.describe()[0]) is here


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=2, tp=1, rollout_tp=2, on_gpu=False), "tensor-parallel engines need GPUs"),
    (dict(world_size=6, tp=1, rollout_tp=4, on_gpu=True), "must divide the world size 6"),
    (dict(world_size=2, tp=1, on_gpu=False, engine_core="in_process"), "in_process needs world size 1"),
    (dict(world_size=4, tp=1, on_gpu=True, engine_core="subprocess"), "GPU engines run in the trainer processes"),
    (dict(world_size=1, tp=1, on_gpu=False, engine_core="thread"), "choose one of auto, in_process, subprocess"),
])
def test_impossible_placements_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnginePlacement.build(**kwargs)


def test_dry_run_prints_the_engines_the_trainer_builds_and_warns_above_the_gpu_memory():
    cfg = load_recipe(ROOT / "recipes" / "qwen3_30b_a3b_upgrpo_math.yaml")
    text = dry_run(cfg, 64, gpu_mem_gib=80)
    assert "rollout: 16 rollout engine(s), one per 4 consecutive rank(s): vLLM external_launcher" in text
    assert "warning: the per-GPU peak" not in text  # the step batch does warn: see test_step_batch_size.py
    assert "warning: the per-GPU peak" in dry_run(cfg, 64, gpu_mem_gib=40)


def test_rollout_phase_keeps_the_actor_state_resident():
    cfg = load_recipe(ROOT / "recipes" / "qwen3_30b_a3b_upgrpo_math.yaml")
    m = estimate_memory(cfg, validate_layout(cfg, 64))
    actor = m["params"] + m["grads"] + m["optimizer"]
    assert m["rollout_total"] == pytest.approx(actor + m["engine_params"] + m["kv_cache"] + m["reference"])
    assert m["engine_params"] == pytest.approx(m["params_total"] * 2 / 4)  # bf16, 1/rollout.tp per GPU


def test_tensor_parallel_engines_on_cpu_are_a_config_error():
    cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml", ["rollout.tp=2", "parallel.backend=gloo"])
    with pytest.raises(ConfigError, match="rollout.tp=2"):
        dry_run(cfg, 2)


def test_an_in_process_engine_at_world_size_two_is_refused_by_the_dry_run_naming_the_recipe():
    cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml", ["rollout.engine_core=in_process", "parallel.backend=gloo"])
    with pytest.raises(ConfigError, match=r"rollout.engine_core=in_process needs world size 1 .*qwen_moe.yaml"):
        dry_run(cfg, 2)
    assert "core runs in the trainer process" in dry_run(cfg, 1)
