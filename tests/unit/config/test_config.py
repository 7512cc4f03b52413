"""Recipe schema: overrides, inheritance, one-line errors naming the key, layouts, dry-run estimates."""
from pathlib import Path

import pytest

from upgrpo_megatron.config import (
    ConfigError,
    RecipeConfig,
    load_recipe,
    save_resolved,
    to_dict,
    validate_for_cpu_engine,
    validate_layout,
)
from upgrpo_megatron.sizing import count_parameters, estimate_memory, format_layout_and_memory

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "qwen_moe.yaml"
RECIPE_30B = ROOT / "recipes" / "qwen3_30b_a3b_dapo_math.yaml"


# ----------------------------------------------------------------------------------------------- loading
def test_overrides_are_parsed_as_yaml_scalars_and_lists():
    cfg = load_recipe(RECIPE, ["actor.lr=1e-4", "rollout.n=4", "diagnostics.extreme_taus=[2,5]",
                               "trainer.resume=never", "model.tie_word_embeddings=true", "model.hf_path=null"])
    assert cfg.actor.lr == 1e-4 and isinstance(cfg.actor.lr, float)
    assert cfg.rollout.n == 4 and cfg.trainer.resume == "never" and cfg.model.tie_word_embeddings is True
    assert cfg.diagnostics.extreme_taus == [2.0, 5.0] and cfg.model.hf_path is None


def test_later_overrides_win_and_a_single_file_becomes_a_list():
    cfg = load_recipe(RECIPE, ["rollout.n=4", "rollout.n=6", "data.val_files=val.jsonl"])
    assert cfg.rollout.n == 6 and cfg.data.val_files == ["val.jsonl"]


def test_default_recipe_sets_every_section_it_names():
    cfg = load_recipe(RECIPE)
    assert cfg.algorithm.loss_mode == "up_grpo" and cfg.model.num_experts == 8 and cfg.data.task == "arithmetic"
    assert cfg.source == str(RECIPE)


@pytest.mark.parametrize("recipe", [RECIPE, RECIPE_30B])
def test_resolved_config_round_trips(tmp_path, recipe):
    cfg = load_recipe(recipe, ["actor.lr=3e-5", "diagnostics.extreme_taus=[3]"])
    save_resolved(cfg, tmp_path / "run" / "config.yaml")
    again = load_recipe(tmp_path / "run" / "config.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert "source" not in to_dict(cfg)


def test_model_section_stored_as_a_mapping_reads_back_as_model_config():
    import dataclasses

    from upgrpo_megatron.config import ModelConfig, model_config_from_dict

    cfg = ModelConfig(num_layers=3, first_k_dense_layers=1, dtype="bf16")
    assert model_config_from_dict(dataclasses.asdict(cfg), "ckpt/model_config.yaml") == cfg
    # what the converter wrote before it used ModelConfig (no hf_path, init_std): the defaults fill them in
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("hf_path", "init_std")}
    assert model_config_from_dict(old, "ckpt/model_config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"unknown key 'model.num_layer' in ckpt/model_config.yaml .*num_layers'"):
        model_config_from_dict({"num_layer": 3}, "ckpt/model_config.yaml")
    with pytest.raises(ConfigError, match=r"model.num_experts in w.pt: expected an integer"):
        model_config_from_dict({"num_experts": "many"}, "w.pt")


def test_inherit_overrides_only_what_differs(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"inherit: {RECIPE}\nalgorithm:\n  loss_mode: vanilla\n")
    cfg, base = load_recipe(child), load_recipe(RECIPE)
    assert cfg.algorithm.loss_mode == "vanilla" and cfg.actor == base.actor and cfg.model == base.model
    assert cfg.algorithm.clip_ratio_high == base.algorithm.clip_ratio_high


def test_dapo_baseline_differs_from_default_only_in_loss_and_run_dir():
    base, dapo = to_dict(load_recipe(RECIPE)), to_dict(load_recipe(ROOT / "recipes" / "qwen_moe_dapo.yaml"))
    diff = {(s, k) for s in base for k in base[s] if base[s][k] != dapo[s][k]}
    assert diff == {("algorithm", "loss_mode"), ("trainer", "run_dir")}
    assert dapo["algorithm"]["loss_mode"] == "vanilla"


def test_upgrpo_30b_recipe_differs_from_dapo_30b_only_in_loss_and_run_dir():
    dapo = to_dict(load_recipe(RECIPE_30B))
    up = to_dict(load_recipe(ROOT / "recipes" / "qwen3_30b_a3b_upgrpo_math.yaml"))
    diff = {(s, k) for s in dapo for k in dapo[s] if dapo[s][k] != up[s][k]}
    assert diff == {("algorithm", "loss_mode"), ("trainer", "run_dir")}


def test_30b_recipe_carries_the_published_dapo_hyperparameters():
    cfg = load_recipe(RECIPE_30B)
    a, act, d = cfg.algorithm, cfg.actor, cfg.data
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c, a.loss_agg_mode) == (0.2, 0.28, 10.0, "token-mean")
    assert (act.lr, act.lr_warmup_steps, act.weight_decay, act.grad_clip) == (1e-6, 10, 0.1, 1.0)
    assert (cfg.rollout.n, a.dynamic_sampling, a.overlong_buffer_len, a.overlong_penalty_factor) == (
        16, True, 4096, 1.0)
    assert (d.max_prompt_length, d.max_response_length, d.reward) == (2048, 20480, "dapo_answer")
    assert a.kl_loss_coef == 0.0 and cfg.model.moe_aux_loss_coeff == 0.0
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups, m.head_dim) == (
        2048, 48, 32, 4, 128)
    assert (m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size, m.vocab_size) == (128, 8, 768, 151936)


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override, message", [
    (["actor.lrr=1"], r"unknown key 'actor.lrr' in override .* did you mean 'actor.lr'\?"),
    (["modle.hidden_size=8"], r"unknown key 'modle' .*did you mean 'model'"),
    (["actor.lr=abc"], r"actor.lr in .*expected a number, got 'abc'"),
    (["trainer.total_steps=ten"], "trainer.total_steps.*expected an integer"),
    (["model.tie_word_embeddings=maybe"], "expected true or false"),
    (["diagnostics.extreme_taus=5"], "diagnostics.extreme_taus.*expected a list"),
    (["actor.betas=[0.9, x]"], r"actor.betas\[1\].*expected a number"),
    (["rollout.n=0"], "rollout.n=0.*must be > 0"),
    (["rollout.n=1"], "rollout.n=1.*at least 2 samples"),
    (["model.hidden_size=-128"], "model.hidden_size=-128.*must be > 0"),
    (["actor.micro_batch_size=-1"], "actor.micro_batch_size=-1.*must be > 0"),
    (["actor.lr=-1e-3"], "actor.lr=-0.001.*must be >= 0"),
    (["rollout.top_p=1.5"], r"rollout.top_p=1.5.*\(0, 1\]"),
    (["rollout.top_p=0"], r"rollout.top_p=0.0.*\(0, 1\]"),
    (["rollout.gpu_memory_utilization=1.2"], "gpu_memory_utilization=1.2"),
    (["rollout.top_k=0"], "rollout.top_k=0.*-1 \\(off\\) or >= 1"),
    (["algorithm.clip_ratio_c=1.0"], "clip_ratio_c=1.0.*must be > 1"),
    (["algorithm.clip_ratio_low=1.0"], "clip_ratio_low=1.0.*must be < 1"),
    (["algorithm.loss_mode=ppo"], "algorithm.loss_mode='ppo'.*choose one of vanilla, up_grpo, gspo, up_gspo"),
    (["algorithm.loss_agg_mode=mean"], "algorithm.loss_agg_mode='mean'.*choose one of"),
    (["algorithm.router_replay=R4"], "algorithm.router_replay='R4'.*none, R2, R3"),
    (["model.dtype=fp16"], "model.dtype='fp16'.*fp32, bf16"),
    (["model.architecture=llama"], "model.architecture='llama'.*qwen3_moe, qwen2_moe"),
    (["data.reward=bleu"], "data.reward='bleu'.*choose one of"),
    (["data.arithmetic_ops=[+, /]"], "data.arithmetic_ops.*subset of"),
    (["algorithm.overlong_buffer_len=8"], "overlong_buffer_len=8.*must be < data.max_response_length=8"),
    (["model.num_query_groups=3"], "num_query_groups=3.*must divide model.num_attention_heads=4"),
    (["model.moe_router_topk=9"], "moe_router_topk=9.*exceeds model.num_experts=8"),
    (["model.num_experts=40000"], "model.num_experts=40000.*exceeds 32767: expert ids are stored and sent in 16 bits"),
    (["data.max_response_length=200"], "= 216 .*exceeds model.max_position_embeddings=128"),
    (["actor.ppo_mini_batch_size=32"], "ppo_mini_batch_size=32.*exceeds trainer.prompts_per_step=16"),
    (["actor.ppo_mini_batch_size=6"], "ppo_mini_batch_size=6.*must divide trainer.prompts_per_step=16"),
    (["diagnostics.extreme_taus=[0.5]"], "extreme_taus.*must be > 1"),
    (["model.first_k_dense_layers=2"], "first_k_dense_layers=2.*at least one MoE layer"),
    (["model.shared_expert_ffn_hidden_size=64"], "qwen3_moe has no shared expert"),
    (["parallel.pp=2"], "parallel.pp=2.*not supported"),
    (["data.task=math"], "data.train_files.*needs at least one train file"),
    (["actor.lr"], "expected dotted.key=value"),
    (["correction.icepop_low=0"], r"correction.icepop_low=0.0.*must be in \(0, 1\]"),
    (["correction.icepop_high=0.9"], "correction.icepop_high=0.9.*must be >= 1"),
    (["correction.seq_low=1.5", "correction.seq_high=2"], r"correction.seq_low=1.5.*must be in \(0, 1\]"),
    (["correction.routing_weight=2"], r"correction.routing_weight=2.0.*must be in \[0, 1\]"),
    (["rollout.val_sample_n=-1"], "rollout.val_sample_n=-1.*must be >= 0"),
    (["rollout.sync_every=2", "trainer.total_steps=151"], "trainer.total_steps=151.*multiple of rollout.sync_every=2"),
    (["correction.mode=tis", "algorithm.old_log_prob=rollout"], "correction.mode='tis'.*would count twice"),
    (["correction.mode=icepop", "algorithm.old_log_prob=rollout"], "correction.mode='icepop'.*old_log_prob=trainer"),
])
def test_bad_recipe_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(RECIPE, override)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_errors_in_a_file_name_the_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text(f"inherit: {RECIPE}\nactor:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown key 'actor.lrr' in .*x.yaml — did you mean 'actor.lr'\?"):
        load_recipe(bad)
    bad.write_text(f"inherit: {RECIPE}\nactor:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"actor.lr in .*x.yaml: expected a number, got 'fast'"):
        load_recipe(bad)


def test_missing_and_malformed_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 128\n   num_layers: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line 3: malformed YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(bad)
    child = tmp_path / "child.yaml"
    child.write_text("inherit: missing_parent.yaml\n")
    with pytest.raises(ConfigError, match="missing_parent.yaml does not exist"):
        load_recipe(child)


def test_inherit_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_cpu_engine_head_dim_is_checked_only_on_request():
    cfg = load_recipe(RECIPE, ["model.head_dim=16"])  # a valid recipe for a GPU engine
    with pytest.raises(ConfigError, match="head_dim=16.*64 or 128"):
        validate_for_cpu_engine(cfg)
    validate_for_cpu_engine(load_recipe(RECIPE))


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("override, world, message", [
    (["parallel.tp=2"], 3, r"parallel.tp=2 x parallel.pp=1 .*does not divide the world size 3"),
    (["parallel.ep=3"], 3, "model.num_experts=8.*not divisible by parallel.ep=3"),
    (["parallel.ep=2"], 3, r"parallel.ep=2 x parallel.etp=1 x parallel.pp=1.*does not divide the world size 3"),
    (["parallel.ep=2", "parallel.etp=2"], 2, "parallel.ep=2 x parallel.etp=2.*does not divide the world size 2"),
    (["parallel.tp=4", "model.num_attention_heads=6", "model.num_query_groups=2"], 4,
     "num_attention_heads=6.*not divisible by parallel.tp=4"),
    (["parallel.tp=4"], 4, "num_query_groups=2.*not divisible by parallel.tp=4"),
    (["parallel.tp=2", "model.vocab_size=33"], 2, "vocab_size=33.*not divisible by parallel.tp=2"),
    (["parallel.etp=2", "model.moe_ffn_hidden_size=63"], 2, "moe_ffn_hidden_size=63.*not divisible by parallel.etp=2"),
    (["parallel.tp=2", "model.first_k_dense_layers=1", "model.ffn_hidden_size=255"], 2,
     "ffn_hidden_size=255.*not divisible by parallel.tp=2"),
    (["sft_warmup.batch_size=3"], 2, "sft_warmup.batch_size=3.*multiple of the data-parallel size 2"),
])
def test_impossible_layouts_are_refused_naming_the_setting(override, world, message):
    cfg = load_recipe(RECIPE, override)
    with pytest.raises(ConfigError, match=message) as e:
        validate_layout(cfg, world)
    assert "\n" not in str(e.value)


def test_tp_switches_on_sequence_parallelism_and_counts_dp():
    layout = validate_layout(load_recipe(RECIPE, ["parallel.tp=2", "parallel.ep=2"]), 4)
    assert layout.sequence_parallel and layout.notes
    assert (layout.tp, layout.ep, layout.dp, layout.expert_dp) == (2, 2, 2, 2)


def test_expert_data_parallel_follows_megatron_core_semantics():
    # world 8, tp 2, ep 4: dense dp = 8 / 2 = 4; expert dp = 8 / (4 * 1) = 2
    layout = validate_layout(load_recipe(RECIPE, ["parallel.tp=2", "parallel.ep=4"]), 8)
    assert (layout.dp, layout.expert_dp) == (4, 2)
    # ep larger than dp is fine in 0.16: experts are laid over tp x dp ranks
    layout = validate_layout(load_recipe(RECIPE, ["parallel.tp=2", "parallel.ep=8"]), 8)
    assert (layout.dp, layout.expert_dp) == (4, 1)


def test_modes_that_accept_the_settings_others_refuse():
    # cispo reads clip_ratio_low >= 1 as "no lower bound" (verl's CISPO recipe passes 10); routing_mask is not a
    # ratio weight, so it combines with pi_old from the engine; no SFT warm-up, no batch to split
    cispo = load_recipe(RECIPE, ["algorithm.loss_mode=cispo", "algorithm.clip_ratio_low=10"])
    assert cispo.algorithm.clip_ratio_low == 10
    load_recipe(RECIPE, ["correction.mode=routing_mask", "algorithm.old_log_prob=rollout"])
    validate_layout(load_recipe(RECIPE, ["sft_warmup.steps=0", "sft_warmup.batch_size=3"]), 2)


def test_single_rank_layout_has_no_sequence_parallelism():
    layout = validate_layout(load_recipe(RECIPE, ["parallel.sequence_parallel=true"]), 1)
    assert not layout.sequence_parallel and layout.dp == 1 and layout.expert_dp == 1


# ----------------------------------------------------------------------------------------------- counts
def _hf_count(m, arch):
    import torch
    import transformers

    common = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
                  intermediate_size=m.ffn_hidden_size, moe_intermediate_size=m.moe_ffn_hidden_size,
                  num_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk, norm_topk_prob=m.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=list(range(m.first_k_dense_layers)),
                  tie_word_embeddings=m.tie_word_embeddings, max_position_embeddings=m.max_position_embeddings)
    if arch == "qwen3_moe":
        hf_cfg = transformers.Qwen3MoeConfig(head_dim=m.head_dim, **common)
        cls = transformers.Qwen3MoeForCausalLM
    else:
        hf_cfg = transformers.Qwen2MoeConfig(shared_expert_intermediate_size=m.shared_expert_ffn_hidden_size, **common)
        cls = transformers.Qwen2MoeForCausalLM
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = cls(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("overrides", [[], ["model.first_k_dense_layers=1", "model.tie_word_embeddings=true"]])
def test_qwen3_moe_parameter_count_matches_transformers_exactly(overrides):
    m = load_recipe(RECIPE, overrides).model
    assert count_parameters(m)["total"] == _hf_count(m, "qwen3_moe")


def test_qwen2_moe_parameter_count_with_shared_expert_matches_transformers_exactly():
    m = load_recipe(RECIPE, ["model.architecture=qwen2_moe", "model.head_dim=32",
                             "model.shared_expert_ffn_hidden_size=96", "model.first_k_dense_layers=1"]).model
    assert count_parameters(m)["total"] == _hf_count(m, "qwen2_moe")


def test_30b_parameter_counts_match_the_published_sizes_and_transformers():
    m = load_recipe(RECIPE_30B).model
    n = count_parameters(m)
    assert n["total"] == _hf_count(m, "qwen3_moe")
    assert 30.4e9 < n["total"] < 30.6e9          # "30.5B total"
    assert 3.2e9 < n["active"] < 3.4e9           # "3.3B activated"


# ----------------------------------------------------------------------------------------------- memory
def test_30b_memory_estimate_is_in_a_sane_range():
    cfg = load_recipe(RECIPE_30B)
    layout = validate_layout(cfg, 64)
    mem = estimate_memory(cfg, layout)
    gib = 1024**3
    # ~30.5B params: experts / ep=8 + the rest / tp=4 = ~4.0B per GPU, 2 bytes each in bf16
    assert 3.9e9 < mem["params_local"] < 4.1e9
    assert 7.3 * gib < mem["params"] < 7.7 * gib and mem["grads"] == pytest.approx(2 * mem["params"])
    # distributed optimizer: 12 bytes per param sharded over dp 16 (dense) / expert-dp 8 (experts)
    assert 4 * gib < mem["optimizer"] < 7 * gib
    assert mem["training_total"] < 80 * gib and mem["total"] >= mem["training_total"]
    assert mem["kv_seqs_fit"] > 16 and mem["kv_seqs_wanted"] == 256
    text = format_layout_and_memory(cfg, layout, mem)
    assert "30.53B parameters" in text and "tp 4" in text and "ep 8" in text


def test_kv_estimate_counts_whole_engine_blocks():
    # the bench's medium size on a CPU engine: 80-token sequences, 8 KiB of KV per token, blocks of 128 tokens
    # (1 MiB): 64 MiB holds 64 sequences, not 64 MiB / 80 tokens = 102 (the planner said 102; the engine ran 64)
    cfg = load_recipe(RECIPE, ["model.hidden_size=512", "model.num_layers=4", "model.num_attention_heads=8",
                               "model.num_query_groups=4", "data.max_response_length=64", "parallel.backend=gloo"])
    mem = estimate_memory(cfg, validate_layout(cfg, 1))
    assert mem["kv_bytes_per_seq"] == 80 * 8192
    assert mem["kv_seqs_fit"] == 64 and mem["kv_seqs_wanted"] == 128
    assert mem["kv_gib_wanted"] == pytest.approx(0.125)
    assert "the rest wait: 0.125 GiB holds them all" in format_layout_and_memory(cfg, validate_layout(cfg, 1), mem)
    cfg.rollout.kv_cache_gib = 0.125
    mem = estimate_memory(cfg, validate_layout(cfg, 1))
    assert mem["kv_seqs_fit"] == 128 and "the rest wait" not in format_layout_and_memory(cfg, validate_layout(cfg, 1),
                                                                                          mem)


def test_distributed_optimizer_and_sharding_shrink_the_per_gpu_estimate():
    cfg = load_recipe(RECIPE_30B)
    sharded = estimate_memory(cfg, validate_layout(cfg, 64))
    cfg.parallel.use_distributed_optimizer = False
    full = estimate_memory(cfg, validate_layout(cfg, 64))
    assert full["optimizer"] > 7 * sharded["optimizer"]
    more_ep = load_recipe(RECIPE_30B, ["parallel.ep=16"])
    assert estimate_memory(more_ep, validate_layout(more_ep, 64))["params"] < sharded["params"]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(recipe):
    cfg = load_recipe(recipe)
    layout = validate_layout(cfg, cfg.trainer.world_size_hint or 1)
    mem = estimate_memory(cfg, layout)
    assert mem["total"] > 0 and "valid" in format_layout_and_memory(cfg, layout, mem)


def test_defaults_alone_form_a_valid_recipe(tmp_path):
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("trainer:\n  seed: 1\n")
    assert load_recipe(minimal) == RecipeConfig()


def test_an_empty_recipe_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="empty.yaml: the recipe is empty"):
        load_recipe(empty)


def test_a_section_written_twice_is_refused_naming_both_lines(tmp_path):
    r = tmp_path / "twice.yaml"
    r.write_text("actor:\n  lr: 1.0e-4\nrollout:\n  n: 4\nactor:\n  ppo_epochs: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml line 5: 'actor' appears twice \(first on line 1\)"):
        load_recipe(r)


def test_a_recipe_that_is_not_utf8_is_refused_naming_the_line(tmp_path):
    r = tmp_path / "latin1.yaml"
    r.write_bytes("trainer:\n  run_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml line 2: not UTF-8"):
        load_recipe(r)


@pytest.mark.parametrize("override", ["actor.lr=inf", "rollout.temperature=.inf", "actor.lr=nan",
                                      "algorithm.clip_ratio_high=.nan"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_recipe(RECIPE, [override])


def test_allowed_names_come_from_the_registries():
    from upgrpo_megatron.config import choices
    from upgrpo_megatron.losses import KL_ESTIMATORS, POLICY_LOSSES

    c = choices()
    assert c["algorithm.loss_mode"] == tuple(POLICY_LOSSES) and c["algorithm.kl_loss_type"] == tuple(KL_ESTIMATORS)
    with pytest.raises(ConfigError, match="choose one of .*up_grpo"):
        load_recipe(RECIPE, ["algorithm.loss_mode=not_a_loss"])


def test_the_expert_limit_fits_the_routing_dtype():
    """validate.py's MAX_EXPERTS (pure Python) must fit the step batch's expert-id dtype."""
    import torch

    from upgrpo_megatron.config.validate import MAX_EXPERTS
    from upgrpo_megatron.rollout.batch import ROUTING_DTYPE

    assert MAX_EXPERTS <= torch.iinfo(ROUTING_DTYPE).max
