"""The real vLLM engine (CPU, fp32) on a tiny random Qwen3-MoE, checked against transformers on the same weights.

One engine serves the whole module (a start costs ~40 s on the shared 2-core machine). The process-death test
kills it, so it runs last.
"""

from __future__ import annotations

import copy
import os
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from upgrpo_megatron.rollout import RolloutEngine, RolloutError, pad_rollout_batch  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TINY = dict(vocab_size=32, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
            max_position_embeddings=128)
STOP = 2
PROMPTS = [[1, 5, 6, 7], [3, 4, 9], [10, 11, 12, 13, 14, 15], [1, 5, 6, 7]]  # the last repeats the first
N, MAX_TOKENS, MAX_LEN = 4, 12, 32
# fp32 engine vs fp32 transformers: same math, different kernels and summation order (oneDNN/SGL GEMMs,
# vLLM's CPU attention vs eager attention). Measured here: mean |Δ| ~1e-7, max ~5e-7 nats. 1e-4 leaves 200x
# headroom for other CPUs' kernels while any real error (a stale or misplaced weight, a position shift)
# moves log-probs by > 1e-2.
FP32_LOGPROB_TOL = 1e-4
MIN_ROUTING_AGREEMENT = 0.99


def build_tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(**TINY)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def reference(model, prompt, response):
    """transformers' log-prob of each response token, `[R]`, and the top-k experts of every input position,
    `[P + R, layers, topk]`."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    p = len(prompt)
    lp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)[p - 1:]
    topk = torch.stack([r.topk(TINY["num_experts_per_tok"], -1).indices for r in out.router_logits], dim=1)
    return lp, topk


def compare(model, prompts, batch):
    """(mean |Δlog-prob|, max |Δlog-prob|, fraction of (position, layer) pairs with the same top-k set over every
    position the engine computed: `prompt_routing` = positions 0 .. P - 2, `routing` = P - 1 .. P + R - 2, the
    positions that score the response tokens)."""
    diffs, agree, total = [], 0, 0
    for s in batch.samples:
        lp, topk = reference(model, prompts[s.prompt_index], s.response_ids)
        diffs.append((lp - torch.tensor(s.log_probs, dtype=torch.float32)).abs())
        engine = np.concatenate([s.prompt_routing, s.routing])
        assert len(s.prompt_routing) == len(prompts[s.prompt_index]) - 1
        for t in range(len(engine)):
            for layer in range(topk.shape[1]):
                total += 1
                agree += set(topk[t, layer].tolist()) == set(engine[t, layer].tolist())
    d = torch.cat(diffs)
    return d.mean().item(), d.max().item(), agree / total


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = build_tiny_model()
    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    model.save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def engine(tiny):
    eng = RolloutEngine(tiny[0], dtype="float32", seed=1, max_model_len=MAX_LEN, kv_cache_gib=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def rollout(engine):
    return engine.generate(PROMPTS, n=N, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=3)


def test_engine_log_probs_match_transformers_fp32(tiny, rollout):
    mean, mx, _ = compare(tiny[1], PROMPTS, rollout)
    print(f"\nfp32 engine vs transformers log-probs over {rollout.num_tokens()} tokens: "
          f"mean |d| {mean:.2e}, max {mx:.2e}")
    assert mx < FP32_LOGPROB_TOL


def test_rollout_routing_has_the_right_shape_and_matches_transformers_topk(tiny, engine, rollout):
    assert engine.routing_source == "decode capture"
    assert not any(s.routing_replayed for s in rollout.samples)
    for s in rollout.samples:
        assert s.routing.shape == (len(s.response_ids), TINY["num_hidden_layers"], TINY["num_experts_per_tok"])
        assert s.routing.min() >= 0 and s.routing.max() < TINY["num_experts"]
        assert all(len(set(row)) == len(row) for row in s.routing.reshape(-1, TINY["num_experts_per_tok"]).tolist())
    _, _, agreement = compare(tiny[1], PROMPTS, rollout)
    print(f"\nrouting top-k set agreement with transformers fp32: {agreement:.4f}")
    assert agreement >= MIN_ROUTING_AGREEMENT


def test_samples_are_prompt_major_and_a_stop_token_ends_its_response(rollout):
    expected = [(i, j) for i in range(len(PROMPTS)) for j in range(N)]
    assert [(s.prompt_index, s.sample_index) for s in rollout.samples] == expected
    for s in rollout.samples:
        assert 1 <= len(s.response_ids) <= MAX_TOKENS
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == STOP and STOP not in s.response_ids[:-1]
        else:
            assert s.finish_reason == "length" and len(s.response_ids) == MAX_TOKENS and STOP not in s.response_ids
    assert rollout.weight_version == 0


def test_same_seed_gives_the_same_rollouts_and_another_seed_does_not(engine, rollout):
    again = engine.generate(PROMPTS, n=N, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=3)
    assert [s.response_ids for s in again.samples] == [s.response_ids for s in rollout.samples]
    # tokens and routing are identical; log-probs agree to float rounding (measured 2.4e-7 on one first token:
    # the CPU GEMMs are not bitwise reproducible across calls, e.g. oneDNN's thread partitioning)
    for a, b in zip(again.samples, rollout.samples):
        np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=0, atol=1e-5)
    assert all(np.array_equal(a.routing, b.routing) for a, b in zip(again.samples, rollout.samples))
    assert all(np.array_equal(a.prompt_routing, b.prompt_routing) for a, b in zip(again.samples, rollout.samples))
    other = engine.generate(PROMPTS, n=N, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=4)
    assert [s.response_ids for s in other.samples] != [s.response_ids for s in rollout.samples]


def test_routing_replay_split_over_many_calls_gives_the_decode_captures_routing(engine, rollout, monkeypatch):
    # the replay (the fallback) re-runs the sequences as a prefill, in calls of at most one pass's token budget
    # (so vLLM never chunks a sequence); at a 20-token budget the 16 sequences take several calls. Prefill and
    # token-by-token decode must route every fed token alike (ties to float rounding aside: none here)
    monkeypatch.setattr(engine, "max_num_batched_tokens", 20)
    monkeypatch.setattr(engine, "capture_mode", "replay")
    again = engine.generate(PROMPTS, n=N, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=3)
    assert engine.routing_source == "prefill replay" and all(s.routing_replayed for s in again.samples)
    assert [s.response_ids for s in again.samples] == [s.response_ids for s in rollout.samples]
    assert all(np.array_equal(a.routing, b.routing) for a, b in zip(again.samples, rollout.samples))
    assert all(np.array_equal(a.prompt_routing, b.prompt_routing) for a, b in zip(again.samples, rollout.samples))


def test_an_engine_that_does_not_keep_the_prompt_routing_drops_it_and_keeps_the_rest(engine, monkeypatch):
    # only R3 replays the prompt positions; otherwise they would travel to every rank for nothing
    monkeypatch.setattr(engine, "keep_prompt_routing", False)
    b = engine.generate(PROMPTS[:2], n=2, temperature=1.0, max_tokens=4, stop_token_ids=[STOP], seed=3)
    assert all(s.prompt_routing is None and s.routing is not None for s in b.samples)


def test_decode_capture_follows_requests_the_engine_preempts(tmp_path, monkeypatch):
    # 120-token prompts and a KV cache of three 128-token blocks: past position 128 a request needs a second
    # block, so vLLM preempts and later recomputes requests mid-generation; each sample must still get its own
    # routing
    from upgrpo_megatron.rollout import capture
    from upgrpo_megatron.rollout.engine import kv_cache_bytes

    torch.manual_seed(1)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**TINY, "max_position_embeddings": 160}))
    model.eval().save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32, (120,), generator=g).tolist() for _ in range(3)]
    recomputed = []

    def spy(rec, *args):
        seen = {}
        for (_, pos), (req_ids, qsl) in zip(rec["steps"], rec["batches"]):
            for i, r in enumerate(req_ids):
                p = pos[int(qsl[i]):int(qsl[i + 1])].tolist()
                recomputed.extend(r for q in p if q in seen.setdefault(r, set()))
                seen[r].update(p)
        return decode_routing(rec, *args)

    decode_routing = capture.decode_routing
    monkeypatch.setattr(capture, "decode_routing", spy)
    eng = RolloutEngine(str(tmp_path), dtype="float32", seed=1, max_model_len=140,
                        kv_cache_gib=3 * kv_cache_bytes(0, model.config.to_dict(), 4) / 2 / 1024**3)
    try:
        batch = eng.generate(prompts, n=2, temperature=1.0, max_tokens=16, seed=9)
        assert eng.routing_source == "decode capture"
    finally:
        eng.shutdown()
    assert recomputed, "no request was preempted: the test no longer tests recompute"
    _, _, agreement = compare(model, prompts, batch)
    assert agreement >= MIN_ROUTING_AGREEMENT


def test_duplicate_prompts_get_independent_samples(rollout):
    first = [s.response_ids for s in rollout.samples if s.prompt_index == 0]
    repeat = [s.response_ids for s in rollout.samples if s.prompt_index == 3]
    assert first != repeat
    assert len({tuple(r) for r in first}) > 1  # and the n samples of one prompt differ among themselves


def test_empty_batch_gives_an_empty_rollout_batch(engine):
    batch = engine.generate([], n=N, max_tokens=MAX_TOKENS)
    assert len(batch) == 0 and batch.weight_version == engine.weight_version
    assert pad_rollout_batch(batch)["responses"].shape == (0, 0)


def test_over_long_prompt_error_names_the_prompt_index(engine):
    with pytest.raises(RolloutError, match=r"prompt 1 has 25 tokens.*max_model_len=32"):
        engine.generate([[1, 2], [3] * 25], n=1, max_tokens=MAX_TOKENS)
    with pytest.raises(RolloutError, match=r"prompt 0 has token id 99 outside the vocabulary"):
        engine.generate([[1, 99]], n=1, max_tokens=2)


def test_padded_tensors_from_a_real_rollout(rollout):
    t = pad_rollout_batch(rollout, response_len=MAX_TOKENS)
    B = len(PROMPTS) * N
    assert t["responses"].shape == (B, MAX_TOKENS) and t["rollout_log_prob"].shape == (B, MAX_TOKENS)
    assert t["rollout_routing"].shape == (B, MAX_TOKENS, TINY["num_hidden_layers"], TINY["num_experts_per_tok"])
    assert t["rollout_routing"].dtype == torch.int16
    lengths = torch.tensor([len(s.response_ids) for s in rollout.samples])
    assert torch.equal(t["response_mask"].sum(1), lengths)
    pad = t["response_mask"] == 0
    assert (t["rollout_routing"][pad] == -1).all() and (t["rollout_routing"][~pad] >= 0).all()
    assert (t["rollout_log_prob"][~pad] <= 0).all() and (t["rollout_log_prob"][pad] == 0).all()


def _perturbed(model, scale=0.05, seed=11):
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return new


def test_update_weights_makes_the_engine_follow_the_new_weights(tiny, engine, monkeypatch):
    from upgrpo_megatron.rollout import transfer

    hf_dir, old = tiny
    new = _perturbed(old)
    # transformers' in-memory names (fused experts), in 64 KiB buckets: each layer's experts span buckets; the
    # buckets travel as files on /dev/shm where it exists, and none is left behind
    info = engine.update_weights(new.state_dict().items(), version=1, bucket_bytes=64 * 1024)
    assert info["buckets"] > 10 and engine.weight_version == 1
    if os.path.isdir("/dev/shm"):
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"upgrpo-weights-{os.getpid()}-")]
    batch = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=5)
    assert batch.weight_version == 1
    mean_new, max_new, agree_new = compare(new, PROMPTS, batch)
    mean_old, _, _ = compare(old, PROMPTS, batch)
    print(f"\nafter sync: |d| vs new weights mean {mean_new:.2e} max {max_new:.2e}; vs old mean {mean_old:.2e}; "
          f"routing agreement {agree_new:.4f}; sync {info}")
    assert max_new < FP32_LOGPROB_TOL and mean_old > 1e-2
    assert agree_new >= MIN_ROUTING_AGREEMENT
    # back to the original weights, this time with checkpoint names (per-expert tensors) in one bucket, as bytes
    # (the path taken where /dev/shm is missing or too small)
    from safetensors.torch import load_file

    monkeypatch.setattr(transfer, "SHM_DIR", None)
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    engine.update_weights(original.items(), version=2)
    back = engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=5)
    assert back.weight_version == 2
    assert compare(old, PROMPTS, back)[1] < FP32_LOGPROB_TOL


def test_update_weights_refuses_unknown_names_and_incomplete_expert_layers(engine):
    version = engine.weight_version
    with pytest.raises(RolloutError,
                       match=r"tensor 'model.layers.0.mlp.nonsense.weight' is not in the engine's checkpoint"):
        engine.update_weights([("model.layers.0.mlp.nonsense.weight", torch.zeros(3))], version=version + 1)
    with pytest.raises(RolloutError, match=r"'lm_head.weight' has shape \(3,\)"):
        engine.update_weights([("lm_head.weight", torch.zeros(3))], version=version + 1)
    only_expert_0 = [(f"model.layers.0.mlp.experts.0.{k}.weight", torch.zeros(s))
                     for k, s in (("gate_proj", (64, 128)), ("up_proj", (64, 128)), ("down_proj", (128, 64)))]
    with pytest.raises(RolloutError, match=r"layer 0 received 3 of its 24 expert tensors"):
        engine.update_weights(only_expert_0, version=version + 1)
    assert engine.weight_version == version


def test_sleep_and_wake_up_keep_the_engine_usable_on_cpu(engine):
    engine.sleep()  # documented no-op on CPU
    engine.wake_up()
    assert len(engine.generate([[1, 2, 3]], n=1, max_tokens=2, seed=0)) == 1


def test_an_engine_core_in_this_process_gives_the_same_rollouts_and_leaves_the_process_as_it_was(tiny, rollout):
    """rollout.engine_core=in_process (the default at world size 1): no engine process, the same samples and
    routing as the engine in its own process, and this process left as it was: its RNGs, torch's threads and
    environment (vLLM's start-up seeds the global RNGs and replaces set_num_threads in its CPU worker), vLLM's
    environment cache (frozen by the engine core: a later engine would start in this process too), and the
    trainer's torch.distributed world, which vLLM's in-process shutdown destroys unless it is kept."""
    import random

    import torch.distributed as dist

    from upgrpo_megatron.rollout.engine_process import MULTIPROCESSING_ENV

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), torch.set_num_threads
    threads, env = torch.get_num_threads(), os.environ.get(MULTIPROCESSING_ENV)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # the trainer's world of one
    try:
        eng = RolloutEngine(tiny[0], dtype="float32", seed=1, max_model_len=MAX_LEN, kv_cache_gib=1,
                            core_in_process=True)
        try:
            assert eng.alive_processes() == []  # nothing of its own to watch or reap
            assert torch.equal(torch.get_rng_state(), before[0])
            assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]
            assert torch.set_num_threads is before[3] and torch.get_num_threads() == threads
            assert os.environ.get(MULTIPROCESSING_ENV) == env
            from vllm import envs as vllm_envs

            assert not vllm_envs._is_envs_cache_enabled()
            here = eng.generate(PROMPTS, n=N, temperature=1.0, max_tokens=MAX_TOKENS, stop_token_ids=[STOP], seed=3)
        finally:
            eng.shutdown()
        assert dist.is_initialized()  # the world outlives the engine and still works
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 1.0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert [s.response_ids for s in here.samples] == [s.response_ids for s in rollout.samples]
    for a, b in zip(here.samples, rollout.samples):
        np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=0, atol=1e-5)  # float rounding (see above)
        assert np.array_equal(a.routing, b.routing) and np.array_equal(a.prompt_routing, b.prompt_routing)


def test_engine_processes_are_out_of_the_terminals_session(engine):
    """Ctrl-C in a terminal signals its foreground process group: the engine is not in it (vllm_plugin.py), so
    only the trainer decides when it stops."""
    assert engine._procs and all(os.getsid(p.pid) != os.getsid(0) for p in engine._procs)


def test_engine_process_death_is_reported_and_shutdown_reaps_it(engine):
    """Runs last: it kills this module's engine (its own child processes, by pid)."""
    import psutil

    assert engine.alive_processes()
    core = [p.pid for p in engine._procs if "EngineCore" in p.name() + " ".join(p.cmdline())]
    assert core, [p.name() for p in engine._procs]
    os.kill(core[0], signal.SIGKILL)
    psutil.Process(core[0]).wait(10)
    with pytest.raises(RolloutError, match="engine process died"):
        engine.generate([[1, 2, 3]], n=1, max_tokens=2)
    engine.shutdown()
    assert engine.alive_processes() == []
    with pytest.raises(RolloutError, match="shut down"):
        engine.generate([[1, 2, 3]], n=1, max_tokens=2)
