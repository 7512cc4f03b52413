"""Decode capture's bookkeeping without an engine: rows of interleaved, chunked, preempted requests back to
samples; which rows a response gets (the positions that score its tokens); R3's merge and the diagnostics
with those rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upgrpo_megatron.diagnostics.routing_stats import check_capture_validity
from upgrpo_megatron.diagnostics.step import step_diagnostics
from upgrpo_megatron.rollout.batch import RolloutError
from upgrpo_megatron.rollout.routing import decode_routing, decode_rows, native_response_routing
from upgrpo_megatron.router_replay import merge_rollout_routing

L, K = 2, 2


def _route(req: str, pos: int) -> list:
    """A distinct, checkable top-k per (request, position, layer)."""
    r = ord(req[0]) % 7
    return [[(r + pos + layer) % 8, (r + pos + layer + 1) % 8] for layer in range(L)]


def _capture(passes):
    """passes: per forward pass, a list of (request id, positions, token ids) chunks in batch order."""
    rec = {"steps": [], "layers": {0: [], 1: []}, "layer_ids": [0, 1], "batches": []}
    for chunks in passes:
        ids = [t for _, _, tok in chunks for t in tok]
        pos = [p for _, ps, _ in chunks for p in ps]
        rows = np.array([_route(r, p) for r, ps, _ in chunks for p in ps], dtype=np.int16).reshape(-1, L, K)
        qsl = np.cumsum([0] + [len(ps) for _, ps, _ in chunks])
        rec["steps"].append((np.array(ids), np.array(pos)))
        for layer in range(L):
            rec["layers"][layer].append(rows[:, layer])
        rec["batches"].append(([r for r, _, _ in chunks], qsl))
    return rec


def test_decode_rows_follow_requests_through_chunks_reordering_and_preemption():
    a_prompt, b_prompt = [5, 6, 7], [9, 9]
    passes = [
        [("a", [0, 1], a_prompt[:2]), ("b", [0, 1], b_prompt)],   # a's prefill is chunked
        [("b", [2], [11]), ("a", [2], a_prompt[2:])],              # reordered; b decodes, a's prefill ends
        [("a", [3], [20]), ("b", [3], [12])],
        [("b", [0, 1, 2, 3], b_prompt + [11, 12])],                # b preempted and recomputed
        [("b", [4], [13]), ("a", [4], [21])],
    ]
    rec = _capture(passes)
    got = {tuple(fed.tolist()): rows for fed, rows in decode_rows(rec)}
    assert set(got) == {(5, 6, 7, 20, 21), (9, 9, 11, 12, 13)}
    for req, fed in (("a", (5, 6, 7, 20, 21)), ("b", (9, 9, 11, 12, 13))):
        assert np.array_equal(got[fed], np.array([_route(req, p) for p in range(5)], dtype=np.int16))
    # a's response: 20, 21, 22 (22 never fed), scored at positions 2, 3, 4; b's: 11, 12, 13, 14 at 1 .. 4
    out = decode_routing(rec, [a_prompt, b_prompt], [[20, 21, 22], [11, 12, 13, 14]])
    assert np.array_equal(out[0], np.array([_route("a", p) for p in (2, 3, 4)]))
    assert np.array_equal(out[1], np.array([_route("b", p) for p in (1, 2, 3, 4)]))
    assert out[0].shape == (3, L, K) and out[0].dtype == np.int16


def test_decode_routing_leaves_unmatched_or_gapped_requests_to_the_replay():
    rec = _capture([[("a", [0, 1], [5, 6])], [("a", [3], [8])]])  # position 2 never recorded
    assert decode_rows(rec) == []
    rec = _capture([[("a", [0, 1], [5, 6]), ("c", [0, 1], [5, 6])], [("a", [2], [7]), ("c", [2], [7])]])
    out = decode_routing(rec, [[5, 6], [5, 6], [1]], [[7, 8], [7, 9], [2]])
    assert out[0] is not None and out[1] is not None  # same fed tokens: interchangeable requests
    assert out[2] is None  # no request fed [1]
    one = decode_routing(rec, [[5, 6, 7]], [[3]])[0]  # a one-token response: scored at the last prompt position
    assert one.shape == (1, L, K) and np.array_equal(one[0], _route("a", 2))


def test_a_request_whose_rows_are_in_doubt_is_left_to_the_replay():
    # a recompute that fed other tokens than the first computation, and rows that are not consecutive positions
    changed = _capture([[("a", [0, 1], [5, 6])], [("a", [2], [7])], [("a", [0, 1, 2], [5, 9, 7])]])
    assert decode_rows(changed) == []
    jumbled = _capture([[("a", [0, 2, 1], [5, 7, 6])]])
    assert decode_rows(jumbled) == []
    fine = _capture([[("a", [0, 1], [5, 6])], [("a", [2], [7])], [("a", [0, 1, 2], [5, 6, 7])]])
    assert [f.tolist() for f, _ in decode_rows(fine)] == [[5, 6, 7]]


def test_routing_mask_hits_a_token_whose_scoring_position_was_routed_differently_the_last_one_too():
    from upgrpo_megatron.losses.correction import routing_mask_weights

    train = torch.tensor([[[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]])  # 4 tokens, 1 layer
    roll = torch.tensor([[[[1, 0]], [[2, 4]], [[4, 5]], [[6, 1]]]])  # tokens 1 and 3 differ (order within: not)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    u, m = routing_mask_weights(train, roll, mask, alpha=0.0, advantages=torch.tensor([[1.0, 1.0, -1.0, -1.0]]))
    assert u.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert m["routing_mask/masked_frac"] == pytest.approx(0.5)  # 2 hits of 4 tokens
    assert m["routing_mask/masked_pos_frac"] == pytest.approx(0.5) and m["routing_mask/masked_neg_frac"] == 0.5


def test_decode_capture_with_inconsistent_counts_is_an_error():
    rec = _capture([[("a", [0, 1], [5, 6])]])
    rec["batches"].append(rec["batches"][0])
    with pytest.raises(RolloutError, match="different counts"):
        decode_rows(rec)


def test_native_routing_takes_the_rows_that_score_the_response():
    routed = np.arange(6 * L * K).reshape(6, L, K)  # vLLM computes prompt (3) + response (4) - 1 positions
    got = native_response_routing(routed, 3, 4)
    assert np.array_equal(got, routed[2:6])
    assert native_response_routing(routed[:5], 3, 4) is None  # a scoring position missing: replay
    assert native_response_routing(routed, 0, 4) is None


def test_r3_merge_replays_the_scoring_positions_and_keeps_the_trainers_routing_where_the_engine_has_none():
    full = torch.zeros(1, 6, L, K, dtype=torch.long)  # prompt 2 + response 4
    roll = torch.full((1, 4, L, K), 5, dtype=torch.long)
    roll[0, 2, 1] = -1  # token 2's scoring position (3) not captured in one layer
    local = {"prompt_lens": torch.tensor([2]), "response_mask": torch.ones(1, 4), "rollout_routing": roll}
    out = merge_rollout_routing(full, local)
    assert (out[0, 0] == 0).all() and (out[0, 1:3] == 5).all() and (out[0, 3] == 0).all()
    assert (out[0, 4] == 5).all() and (out[0, 5] == 0).all()  # the last position scores nothing: trainer's
    assert (full == 0).all()  # the input is not modified


def test_step_diagnostics_count_padding_out_and_a_missing_row_inside_a_response_as_a_capture_error():
    B, R, E = 2, 4, 8
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    train = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * R * L)]).reshape(B, R, L, K)
    roll = train.clone()
    roll[0, 3:] = -1  # row 0's padding
    roll[1, 3, 0] = (train[1, 3, 0] + K) % E  # one mismatched pair, at a response's last token
    zeros = torch.zeros(B, R)
    m, _ = step_diagnostics(response_mask=mask, advantages=zeros, old_log_prob=zeros, rollout_log_prob=zeros,
                            train_routing=train, rollout_routing=roll, num_experts=E, clip_low=0.2, clip_high=0.2)
    assert m["routing/rollout_capture/invalid_pairs"] == 0 and m["routing/rollout_capture/valid"] == 1.0
    assert m["mismatch/routing/pair_frac"] == pytest.approx(1 / (7 * L))  # 7 tokens x 2 layers
    roll[1, 3] = -1  # a missing row inside a response is a capture error
    assert check_capture_validity(roll, mask, E)["invalid_pairs"] == L
