"""Recipe schema: overrides, inheritance, one-line errors naming the key, layouts, dry-run estimates."""
from pathlib import Path

import pytest

from upgrpo_megatron.config import (
    ConfigError,
    count_parameters,
    estimate_memory,
    load_recipe,
    save_resolved,
    validate_for_cpu_engine,
    validate_layout,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "qwen_moe.yaml"


def test_overrides_are_parsed_as_yaml_scalars_and_lists():
    cfg = load_recipe(RECIPE, ["actor.lr=1e-4", "rollout.n=4", "diagnostics.extreme_taus=[2,5]", "trainer.resume=never"])
    assert cfg.actor.lr == 1e-4 and cfg.rollout.n == 4
    assert cfg.diagnostics.extreme_taus == [2.0, 5.0] and cfg.trainer.resume == "never"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_recipe(RECIPE, ["actor.lr=3e-5"])
    save_resolved(cfg, tmp_path / "config.yaml")
    again = load_recipe(tmp_path / "config.yaml")
    cfg.source = again.source = ""
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    (["actor.lrr=1"], "unknown key 'actor.lrr'.*did you mean 'actor.lr'"),
    (["actor.lr=abc"], "actor.lr.*expected a number"),
    (["rollout.n=0"], "rollout.n=0.*must be > 0"),
    (["actor.micro_batch_size=-1"], "actor.micro_batch_size=-1.*must be > 0"),
    (["algorithm.loss_mode=ppo"], "algorithm.loss_mode='ppo'.*choose one of"),
    (["algorithm.clip_ratio_c=1.0"], "clip_ratio_c"),
    (["model.num_query_groups=3"], "num_query_groups=3.*must divide"),
    (["model.moe_router_topk=9"], "moe_router_topk=9.*exceeds"),
    (["trainer.total_steps=ten"], "trainer.total_steps.*expected an integer"),
    (["model.tie_word_embeddings=maybe"], "expected true or false"),
    (["data.max_response_length=200"], "exceeds model.max_position_embeddings"),
    (["actor.lr"], "expected dotted.key=value"),
])
def test_bad_recipe_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(RECIPE, override)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 128\n   num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: malformed YAML"):
        load_recipe(bad)


def test_inherit_overrides_only_what_differs(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"inherit: {RECIPE}\nalgorithm:\n  loss_mode: vanilla\n")
    cfg, base = load_recipe(child), load_recipe(RECIPE)
    assert cfg.algorithm.loss_mode == "vanilla" and cfg.actor == base.actor and cfg.model == base.model


@pytest.mark.parametrize("override, world, message", [
    (["parallel.tp=2"], 3, "parallel.tp=2.*does not divide the world size 3"),
    (["parallel.ep=3"], 3, "model.num_experts=8.*not divisible by parallel.ep=3"),
    (["parallel.ep=2"], 3, "parallel.ep=2 x parallel.etp=1.*does not divide"),
    (["parallel.tp=4", "parallel.ep=1", "model.num_attention_heads=6", "model.num_query_groups=2"], 4,
     "num_attention_heads=6.*not divisible by parallel.tp=4"),
])
def test_impossible_layouts_are_refused_naming_the_setting(override, world, message):
    cfg = load_recipe(RECIPE, override)
    with pytest.raises(ConfigError, match=message):
        validate_layout(cfg, world)


def test_tp_switches_on_sequence_parallelism_and_counts_dp():
    layout = validate_layout(load_recipe(RECIPE, ["parallel.tp=2", "parallel.ep=2"]), 4)
    assert layout.sequence_parallel and layout.dp == 2 and layout.expert_dp == 2 and layout.notes


def test_cpu_engine_head_dim_is_checked():
    with pytest.raises(ConfigError, match="head_dim=16.*64 or 128"):
        validate_for_cpu_engine(load_recipe(RECIPE, ["model.head_dim=16"]))


def test_parameter_count_matches_transformers_exactly():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = load_recipe(RECIPE).model
    hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups, head_dim=m.head_dim,
        intermediate_size=m.ffn_hidden_size, moe_intermediate_size=m.moe_ffn_hidden_size, num_experts=m.num_experts,
        num_experts_per_tok=m.moe_router_topk, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False))
    assert count_parameters(m)["total"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_is_valid(recipe):
    cfg = load_recipe(recipe)
    world = cfg.trainer.world_size_hint or 1
    layout = validate_layout(cfg, world)
    mem = estimate_memory(cfg, layout)
    assert mem["total"] > 0
