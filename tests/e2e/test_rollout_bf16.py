"""A bf16 engine against fp32 transformers on the same (fp32-saved) weights: how far rollout log-probs and
routing drift when the engine runs in bf16 (the usual GPU setting), and that shutdown frees the engine."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from tests.e2e.test_rollout_engine import MAX_LEN, MAX_TOKENS, PROMPTS, STOP, N, _perturbed, build_tiny_model, compare  # noqa: E402
from upgrpo_megatron.rollout import RolloutEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per operation). Measured here over 177 tokens:
# log-prob mean |Δ| 1.5e-3, max 4.9e-3 nats; routing top-k sets agree on 99.4% of (token, layer) pairs
# (2 of 354 flipped: near-ties between two experts' router scores). The bounds are ~4x the measured values:
# they catch a broken engine (a wrong weight moves log-probs by > 0.3) but not bf16 rounding.
BF16_MEAN_TOL, BF16_MAX_TOL = 6e-3, 2e-2
BF16_MIN_ROUTING_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_tiny_model()
    path = tmp_path_factory.mktemp("tiny_qwen3_moe_bf16")
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def engine(tiny):
    eng = RolloutEngine(tiny[0], dtype="bfloat16", seed=1, max_model_len=MAX_LEN, kv_cache_gib=1)
    yield eng
    eng.shutdown()


def test_bf16_engine_log_probs_and_routing_stay_near_fp32_transformers(tiny, engine):
    batch = engine.generate(PROMPTS, n=N, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=3)
    mean, mx, agreement = compare(tiny[1], PROMPTS, batch)
    print(f"\nbf16 engine vs fp32 transformers over {batch.num_tokens()} tokens: log-prob mean |d| {mean:.2e}, "
          f"max {mx:.2e}; routing top-k agreement {agreement:.4f}")
    assert mean < BF16_MEAN_TOL and mx < BF16_MAX_TOL
    assert agreement >= BF16_MIN_ROUTING_AGREEMENT


def test_fp32_weights_synced_into_a_bf16_engine_travel_in_bf16_and_take_effect(tiny, engine):
    """The trainer's fp32 weights reach a bf16 engine as bf16 (half the bytes; vLLM's loader would round them the
    same way on copy), and the engine then follows them within bf16's tolerance."""
    new = _perturbed(tiny[1])
    state = new.state_dict()
    fp32_bytes = sum(t.numel() * t.element_size() for t in state.values())
    info = engine.update_weights(state.items(), version=1)
    assert info["bytes"] * 2 == fp32_bytes, (info, fp32_bytes)
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=5)
    mean_new, max_new, _ = compare(new, PROMPTS, batch)
    mean_old, _, _ = compare(tiny[1], PROMPTS, batch)
    assert mean_new < BF16_MEAN_TOL and max_new < BF16_MAX_TOL and mean_old > 1e-2, (mean_new, max_new, mean_old)


def test_shutdown_frees_the_engine_processes(engine):
    assert engine.alive_processes()
    engine.shutdown()
    assert engine.alive_processes() == []
