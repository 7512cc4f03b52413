"""Decode capture's bookkeeping without an engine: rows of interleaved, chunked, preempted requests back to
samples; the last response token's row; R3's merge and the diagnostics' routed tokens with such rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upgrpo_megatron.diagnostics.routing_stats import check_capture_validity, routed_mask
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
    # a's response: 20, 21, 22 (22 never fed); b's: 11, 12, 13, 14
    out = decode_routing(rec, [a_prompt, b_prompt], [[20, 21, 22], [11, 12, 13, 14]])
    assert np.array_equal(out[0][:2], np.array([_route("a", p) for p in (3, 4)])) and (out[0][2] == -1).all()
    assert np.array_equal(out[1][:3], np.array([_route("b", p) for p in (2, 3, 4)])) and (out[1][3] == -1).all()
    assert out[0].shape == (3, L, K) and out[0].dtype == np.int16


def test_decode_routing_leaves_unmatched_or_gapped_requests_to_the_replay():
    rec = _capture([[("a", [0, 1], [5, 6])], [("a", [3], [8])]])  # position 2 never recorded
    assert decode_rows(rec) == []
    rec = _capture([[("a", [0, 1], [5, 6]), ("c", [0, 1], [5, 6])], [("a", [2], [7]), ("c", [2], [7])]])
    out = decode_routing(rec, [[5, 6], [5, 6], [1]], [[7, 8], [7, 9], [2]])
    assert out[0] is not None and out[1] is not None  # same fed tokens: interchangeable requests
    assert out[2] is None  # no request fed [1]
    one = decode_routing(rec, [[5, 6, 7]], [[3]])[0]  # a one-token response: only the -1 row
    assert one.shape == (1, L, K) and (one == -1).all()


def test_a_request_whose_rows_are_in_doubt_is_left_to_the_replay():
    # a recompute that fed other tokens than the first computation, and rows that are not consecutive positions
    changed = _capture([[("a", [0, 1], [5, 6])], [("a", [2], [7])], [("a", [0, 1, 2], [5, 9, 7])]])
    assert decode_rows(changed) == []
    jumbled = _capture([[("a", [0, 2, 1], [5, 7, 6])]])
    assert decode_rows(jumbled) == []
    fine = _capture([[("a", [0, 1], [5, 6])], [("a", [2], [7])], [("a", [0, 1, 2], [5, 6, 7])]])
    assert [f.tolist() for f, _ in decode_rows(fine)] == [[5, 6, 7]]


def test_routing_mask_never_hits_the_unrouted_last_token_and_leaves_it_out_of_its_fractions():
    from upgrpo_megatron.losses.correction import routing_mask_weights

    train = torch.tensor([[[[0, 1]], [[2, 3]], [[4, 5]]]])  # 3 tokens, 1 layer
    roll = torch.tensor([[[[0, 1]], [[2, 4]], [[-1, -1]]]])  # token 1 differs; token 2 never routed
    u, m = routing_mask_weights(train, roll, torch.ones(1, 3), alpha=0.0, advantages=torch.ones(1, 3))
    assert u.tolist() == [[1.0, 0.0, 1.0]]
    assert m["routing_mask/masked_frac"] == pytest.approx(0.5)  # 1 hit of 2 routed tokens
    assert m["routing_mask/masked_pos_frac"] == pytest.approx(0.5)


def test_decode_capture_with_inconsistent_counts_is_an_error():
    rec = _capture([[("a", [0, 1], [5, 6])]])
    rec["batches"].append(rec["batches"][0])
    with pytest.raises(RolloutError, match="different counts"):
        decode_rows(rec)


def test_native_routing_without_the_last_fed_row_is_accepted():
    routed = np.arange(6 * L * K).reshape(6, L, K)  # vLLM computes prompt (3) + response (4) - 1 positions
    got = native_response_routing(routed, 3, 4)
    assert np.array_equal(got[:3], routed[3:6]) and (got[3] == -1).all()
    assert native_response_routing(routed[:5], 3, 4) is None  # a fed response position missing: replay


def test_routed_mask_drops_each_responses_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert routed_mask(mask).tolist() == [[True, True, False, False], [False] * 4, [True, True, True, False]]
    holes = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0]])  # e.g. masked tool output inside a response
    assert routed_mask(holes).tolist() == [[True, False, True, False, False], [False] * 5]


def test_r3_merge_keeps_the_trainers_routing_where_the_engine_has_none():
    full = torch.zeros(1, 6, L, K, dtype=torch.long)  # prompt 2 + response 4
    roll = torch.full((1, 4, L, K), 5, dtype=torch.long)
    roll[0, 3] = -1  # the last response token: never routed by the engine
    local = {"prompt_lens": torch.tensor([2]), "response_mask": torch.ones(1, 4), "rollout_routing": roll}
    out = merge_rollout_routing(full, local)
    assert (out[0, :2] == 0).all() and (out[0, 2:5] == 5).all() and (out[0, 5] == 0).all()
    assert (full == 0).all()  # the input is not modified


def test_step_diagnostics_do_not_count_the_unrouted_last_token_as_a_capture_error():
    B, R, E = 2, 4, 8
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    train = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * R * L)]).reshape(B, R, L, K)
    roll = train.clone()
    roll[0, 2:] = -1  # row 0's last token (2) and its padding
    roll[1, 3] = -1
    roll[1, 0, 0] = (train[1, 0, 0] + K) % E  # one mismatched pair among the routed ones
    zeros = torch.zeros(B, R)
    m, _ = step_diagnostics(response_mask=mask, advantages=zeros, old_log_prob=zeros, rollout_log_prob=zeros,
                            train_routing=train, rollout_routing=roll, num_experts=E, clip_low=0.2, clip_high=0.2)
    assert m["routing/rollout_capture/invalid_pairs"] == 0 and m["routing/rollout_capture/valid"] == 1.0
    assert m["mismatch/routing/pair_frac"] == pytest.approx(1 / (5 * L))  # 5 routed tokens x 2 layers
    # the same -1 row inside a response is a capture error
    assert check_capture_validity(roll, mask, E)["invalid_pairs"] == 2 * L
