"""The HF <-> Megatron mapping itself (no model, no process group): QKV interleave per query group, gate/up
fusion, every tensor of both architectures round-tripping through the mapping, and config.json fields
refused by name."""
import dataclasses

import pytest
import torch

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.convert import (
    ConversionError,
    canonical_names,
    hf_config_to_model_cfg,
    hf_shapes,
    hf_sources,
    hf_to_megatron,
    megatron_to_hf,
    model_cfg_to_hf_config,
)

QWEN3 = ModelConfig(architecture="qwen3_moe", vocab_size=96, hidden_size=64, num_layers=3, num_attention_heads=4,
                    num_query_groups=2, head_dim=16, ffn_hidden_size=96, moe_ffn_hidden_size=32, num_experts=4,
                    moe_router_topk=2, norm_topk_prob=True, first_k_dense_layers=1, shared_expert_ffn_hidden_size=0,
                    rope_theta=5e5, norm_epsilon=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
                    moe_aux_loss_coeff=0.0, dtype="fp32")
QWEN2 = dataclasses.replace(QWEN3, architecture="qwen2_moe", norm_topk_prob=False, first_k_dense_layers=0,
                            shared_expert_ffn_hidden_size=48, dtype="bf16")


def test_qkv_rows_are_interleaved_per_query_group():
    cfg = QWEN3  # 4 query heads in 2 groups, head_dim 16
    hd = 16
    q = torch.arange(4 * hd).float().unsqueeze(1)          # head h rows: h*16 .. h*16+15
    k = 1000 + torch.arange(2 * hd).float().unsqueeze(1)
    v = 2000 + torch.arange(2 * hd).float().unsqueeze(1)
    get = {"model.layers.0.self_attn.q_proj.weight": q, "model.layers.0.self_attn.k_proj.weight": k,
           "model.layers.0.self_attn.v_proj.weight": v}.__getitem__
    qkv = hf_to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", get, cfg)
    expected = torch.cat([q[0:32], k[0:16], v[0:16], q[32:64], k[16:32], v[16:32]])
    assert torch.equal(qkv, expected)
    back = dict(megatron_to_hf("decoder.layers.0.self_attention.linear_qkv.weight", qkv, cfg))
    assert torch.equal(back["model.layers.0.self_attn.q_proj.weight"], q)
    assert torch.equal(back["model.layers.0.self_attn.k_proj.weight"], k)
    assert torch.equal(back["model.layers.0.self_attn.v_proj.weight"], v)


def test_expert_fc1_is_gate_then_up():
    gate, up = torch.randn(32, 64), torch.randn(32, 64)
    get = {"model.layers.1.mlp.experts.3.gate_proj.weight": gate,
           "model.layers.1.mlp.experts.3.up_proj.weight": up}.__getitem__
    fc1 = hf_to_megatron("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", get, QWEN3)
    assert torch.equal(fc1, torch.cat([gate, up]))


@pytest.mark.parametrize("cfg", [QWEN3, QWEN2], ids=["qwen3_moe", "qwen2_moe"])
def test_every_tensor_round_trips_through_the_mapping(cfg):
    g = torch.Generator().manual_seed(0)
    shapes = hf_shapes(cfg)
    hf = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    seen = {}
    for name in canonical_names(cfg):
        t = hf_to_megatron(name, hf.__getitem__, cfg)
        for k, v in megatron_to_hf(name, t, cfg):
            assert k not in seen, f"{k} produced twice"
            seen[k] = v
    assert set(seen) == set(hf)  # every HF tensor is covered, and nothing else is made up
    for k in hf:
        assert torch.equal(seen[k], hf[k]), k
    # the sources named for each canonical tensor are exactly what it is built from
    assert sorted(s for n in canonical_names(cfg) for s in hf_sources(n, cfg)) == sorted(hf)


@pytest.mark.parametrize("cfg", [QWEN3, QWEN2], ids=["qwen3_moe", "qwen2_moe"])
def test_model_section_survives_hf_config_and_transformers_reads_it(cfg):
    import transformers

    hf = model_cfg_to_hf_config(cfg)
    back = hf_config_to_model_cfg(hf)
    assert isinstance(back, ModelConfig)
    assert back == cfg  # every field the HF config fixes comes back; the others (hf_path, init_std) are defaults
    tcfg = transformers.AutoConfig.for_model(**hf)
    assert tcfg.num_experts == cfg.num_experts and tcfg.num_hidden_layers == cfg.num_layers
    assert tcfg.rope_parameters["rope_theta"] == cfg.rope_theta
    assert list(tcfg.mlp_only_layers) == list(range(cfg.first_k_dense_layers))


def _hf(**over):
    hf = model_cfg_to_hf_config(QWEN3)
    hf.update(over)
    return hf


@pytest.mark.parametrize("over, field", [
    (dict(model_type="mixtral", architectures=["MixtralForCausalLM"]), "model_type='mixtral'"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "rope_parameters"),
    (dict(mlp_only_layers=[1]), "mlp_only_layers=[1]"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(dtype="float16", torch_dtype="float16"), "dtype='float16'"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), "layer_types"),
])
def test_unsupported_config_fields_are_refused_by_name(over, field):
    with pytest.raises(ConversionError, match=field.replace("[", r"\[").replace("]", r"\]")) as e:
        hf_config_to_model_cfg(_hf(**over), "some/config.json")
    assert "some/config.json" in str(e.value)


def test_missing_required_field_is_named():
    hf = _hf()
    del hf["num_experts_per_tok"]
    with pytest.raises(ConversionError, match="num_experts_per_tok"):
        hf_config_to_model_cfg(hf)


def test_first_k_dense_layers_map_to_mlp_only_prefix():
    cfg = hf_config_to_model_cfg(_hf(mlp_only_layers=[0, 1]))
    assert cfg.first_k_dense_layers == 2
    names = canonical_names(cfg)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names and "decoder.layers.1.mlp.router.weight" not in names
    assert "decoder.layers.2.mlp.router.weight" in names


def test_tied_embeddings_have_no_output_layer():
    cfg = dataclasses.replace(QWEN3, tie_word_embeddings=True)
    assert "output_layer.weight" not in canonical_names(cfg) and "lm_head.weight" not in hf_shapes(cfg)


@pytest.mark.parametrize("field, value", [("moe_router_topk", 4), ("norm_topk_prob", False), ("rope_theta", 1e6),
                                          ("norm_epsilon", 1e-5), ("vocab_size", 128)])
def test_an_hf_model_that_computes_otherwise_than_the_recipe_is_refused_by_name(field, value):
    """Same tensor shapes or not: a top-k, RoPE base or norm setting that differs would load without a shape error
    and train another model than the recipe says."""
    from upgrpo_megatron.convert import check_compatible

    check_compatible(dataclasses.replace(QWEN3, rope_theta=5e5 * (1 + 1e-12)), QWEN3, "hf/config.json")  # float noise
    with pytest.raises(ConversionError, match=f"hf/config.json: {field}={value!r} does not match the recipe's "
                                              f"model.{field}="):
        check_compatible(dataclasses.replace(QWEN3, **{field: value}), QWEN3, "hf/config.json")
