"""Rollout bookkeeping without an engine: padding, data-parallel sharding/merge, captured-row mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upgrpo_megatron.rollout import (
    RolloutBatch,
    RolloutError,
    RolloutSample,
    merge_rank_batches,
    pad_rollout_batch,
    shard_prompts,
)
from upgrpo_megatron.rollout.routing import rows_per_sequence, token_groups


def _sample(pi, si, n_tokens, layers=2, k=2, base=0):
    routing = (np.arange(n_tokens * layers * k).reshape(n_tokens, layers, k) + base) % 8
    return RolloutSample(pi, si, list(range(3, 3 + n_tokens)), [-0.5] * n_tokens, "length", routing.astype(np.int16))


def test_pad_rollout_batch_pads_responses_log_probs_and_routing():
    batch = RolloutBatch([_sample(0, 0, 3), _sample(0, 1, 1)], weight_version=4)
    t = pad_rollout_batch(batch, pad_token_id=9)
    assert t["responses"].tolist() == [[3, 4, 5], [3, 9, 9]]
    assert t["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert t["rollout_log_prob"].tolist() == [[-0.5] * 3, [-0.5, 0.0, 0.0]]
    assert t["rollout_routing"].shape == (2, 3, 2, 2) and t["rollout_routing"].dtype == torch.int16
    assert (t["rollout_routing"][1, 1:] == -1).all()
    assert torch.equal(t["rollout_routing"][0], torch.as_tensor(batch.samples[0].routing, dtype=torch.int16))


def test_pad_rollout_batch_refuses_a_response_longer_than_response_len():
    with pytest.raises(RolloutError, match="sample 1 has 5 response tokens, more than response_len=4"):
        pad_rollout_batch(RolloutBatch([_sample(0, 0, 2), _sample(0, 1, 5)]), response_len=4)


def test_pad_rollout_batch_without_routing_gives_minus_one_when_shape_is_given():
    s = _sample(0, 0, 2)
    s.routing = None
    t = pad_rollout_batch(RolloutBatch([s]), num_moe_layers=3, topk=2)
    assert t["rollout_routing"].shape == (1, 2, 3, 2) and (t["rollout_routing"] == -1).all()
    assert "rollout_routing" not in pad_rollout_batch(RolloutBatch([s]))


def test_data_parallel_shards_merge_back_into_global_prompt_major_order():
    num_prompts, world, n = 5, 2, 2
    assert shard_prompts(num_prompts, 0, world) == [0, 2, 4] and shard_prompts(num_prompts, 1, world) == [1, 3]
    per_rank = []
    for r in range(world):
        own = shard_prompts(num_prompts, r, world)
        samples = [_sample(local, j, 1 + own[local], base=own[local]) for local in range(len(own)) for j in range(n)]
        per_rank.append(RolloutBatch(samples, weight_version=3, seconds=1.0 + r))
    merged = merge_rank_batches(per_rank, num_prompts)
    expected = [(i, j) for i in range(num_prompts) for j in range(n)]
    assert [(s.prompt_index, s.sample_index) for s in merged.samples] == expected
    assert [len(s.response_ids) for s in merged.samples] == [1 + i for i in range(num_prompts) for _ in range(n)]
    assert merged.weight_version == 3 and merged.seconds == 2.0


def test_data_parallel_merge_refuses_mixed_weight_versions():
    with pytest.raises(RolloutError, match=r"different weight versions \[1, 2\]"):
        merge_rank_batches([RolloutBatch([], 1), RolloutBatch([], 2)], 0)


def _capture(passes, k=2, layers=(0, 1)):
    """A capture record as worker_ext returns it (unpacked): per pass (ids, positions) and per-layer top-k
    rows that encode (token id, layer) so the mapping can be checked."""
    steps, per_layer = [], {lid: [] for lid in layers}
    for ids, pos in passes:
        steps.append((np.array(ids), np.array(pos)))
        for lid in layers:
            per_layer[lid].append(np.array([[t * 10 + lid, p] for t, p in zip(ids, pos)], dtype=np.int16)[:, :k])
    return {"steps": steps, "layers": per_layer, "layer_ids": list(layers)}


def test_captured_rows_map_back_to_sequences_across_a_chunked_prefill():
    a, b, c = [1, 2, 3, 4, 5], [6, 7], [1, 2, 3, 4, 5]  # c repeats a
    # pass 1: all of b, first 3 tokens of a (chunked); pass 2: the rest of a, then c in full
    passes = [(b + a[:3], [0, 1, 0, 1, 2]), (a[3:] + c, [3, 4, 0, 1, 2, 3, 4])]
    rows = rows_per_sequence(_capture(passes), [a, b, c])
    assert [r.shape for r in rows] == [(5, 2, 2), (2, 2, 2), (5, 2, 2)]
    assert rows[0][:, 1, 0].tolist() == [t * 10 + 1 for t in a] and rows[0][:, 0, 1].tolist() == [0, 1, 2, 3, 4]
    assert rows[1][:, 0, 0].tolist() == [60, 70]


def test_a_chunked_prefill_continues_anywhere_in_the_next_pass():
    # vLLM's persistent batch moves a partially prefilled request when others finish: its continuation can come
    # after new requests (found at 128 x 76-token sequences over an 8192-token pass budget)
    a, b, c, d = [1, 2, 3, 4, 5, 6], [6, 7, 8], [9, 9], [1, 2, 3, 7]  # d shares a's first 3 tokens
    passes = [(b + a[:3], [0, 1, 2, 0, 1, 2]), (c + a[3:] + d, [0, 1, 3, 4, 5, 0, 1, 2, 3])]
    rows = rows_per_sequence(_capture(passes), [a, b, c, d])
    assert [r.shape[0] for r in rows] == [6, 3, 2, 4]
    assert rows[0][:, 0, 0].tolist() == [t * 10 for t in a] and rows[0][:, 0, 1].tolist() == list(range(6))
    assert rows[3][:, 1, 0].tolist() == [t * 10 + 1 for t in d]
    # a continuation whose tokens begin no sequence after the segment it would continue is refused
    with pytest.raises(RolloutError, match="position 3 continues no request"):
        rows_per_sequence(_capture([(a[:3], [0, 1, 2]), ([8, 8, 8], [3, 4, 5])]), [a])


def test_replay_calls_stay_within_one_pass_token_budget():
    seqs = [[1] * 5, [2] * 4, [3] * 2, [4] * 9, [5]]
    groups = list(token_groups(seqs, 9))
    assert groups == [[[1] * 5, [2] * 4], [[3] * 2], [[4] * 9], [[5]]]
    assert [s for g in groups for s in g] == seqs  # order kept, nothing dropped
    assert list(token_groups([], 9)) == []


def test_captured_rows_missing_a_sequence_is_an_error():
    with pytest.raises(RolloutError, match="sequence 1 were not captured"):
        rows_per_sequence(_capture([([1, 2], [0, 1])]), [[1, 2], [3, 4]])
    with pytest.raises(RolloutError, match="continues no request"):
        rows_per_sequence(_capture([([1, 2], [3, 4])]), [[1, 2]])


def _hf_config_dir(tmp_path, **overrides):
    import json

    cfg = dict(model_type="qwen3_moe", vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2)
    cfg.update(overrides)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


@pytest.mark.vllm
def test_unsupported_cpu_head_dim_is_refused_before_the_engine_starts(tmp_path):
    pytest.importorskip("vllm")
    from upgrpo_megatron.rollout import RolloutEngine

    if torch.cuda.is_available():
        pytest.skip("the head_dim restriction is the CPU attention backend's")
    with pytest.raises(RolloutError,
                       match=r"head_dim=16 is not supported by the CPU vLLM engine \(supported: .*64.*128"):
        RolloutEngine(_hf_config_dir(tmp_path))


def test_engine_refuses_a_directory_without_config_or_a_mismatched_topk(tmp_path):
    from upgrpo_megatron.rollout import RolloutEngine

    with pytest.raises(RolloutError, match="config.json not found"):
        RolloutEngine(str(tmp_path / "nowhere"))
    with pytest.raises(RolloutError, match=r"topk=4 does not match .*config.json \(2\)"):
        RolloutEngine(_hf_config_dir(tmp_path, head_dim=64), topk=4)
