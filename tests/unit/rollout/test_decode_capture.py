"""Decode capture's bookkeeping without an engine: rows of interleaved, chunked, preempted requests back to
samples; which rows a response gets (the positions that score its tokens) and its prompt (the positions before);
R3's merge and the diagnostics with those rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from upgrpo_megatron.diagnostics.routing_stats import check_capture_validity
from upgrpo_megatron.diagnostics.step import step_diagnostics
from upgrpo_megatron.rollout.batch import RolloutError
from upgrpo_megatron.rollout.routing import decode_routing, decode_rows, native_routing, sample_routing
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
    a_prompt_rows, a_rows = sample_routing(out[0], 3, 3)
    b_prompt_rows, b_rows = sample_routing(out[1], 2, 4)
    assert np.array_equal(a_rows, np.array([_route("a", p) for p in (2, 3, 4)]))
    assert np.array_equal(b_rows, np.array([_route("b", p) for p in (1, 2, 3, 4)]))
    assert np.array_equal(a_prompt_rows, np.array([_route("a", p) for p in (0, 1)]))
    assert np.array_equal(b_prompt_rows, np.array([_route("b", 0)]))
    assert a_rows.shape == (3, L, K) and a_rows.dtype == np.int16 and a_prompt_rows.dtype == np.int16


def test_decode_routing_leaves_unmatched_or_gapped_requests_to_the_replay():
    rec = _capture([[("a", [0, 1], [5, 6])], [("a", [3], [8])]])  # position 2 never recorded
    assert decode_rows(rec) == []
    rec = _capture([[("a", [0, 1], [5, 6]), ("c", [0, 1], [5, 6])], [("a", [2], [7]), ("c", [2], [7])]])
    out = decode_routing(rec, [[5, 6], [5, 6], [1]], [[7, 8], [7, 9], [2]])
    assert out[0] is not None and out[1] is not None  # same fed tokens: interchangeable requests
    assert out[2] is None  # no request fed [1]
    one = decode_routing(rec, [[5, 6, 7]], [[3]])[0]  # a one-token response: scored at the last prompt position
    prompt_rows, rows = sample_routing(one, 3, 1)
    assert rows.shape == (1, L, K) and np.array_equal(rows[0], _route("a", 2)) and len(prompt_rows) == 2


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


def test_native_routing_takes_the_rows_that_score_the_response_and_the_prompt_before_them():
    routed = np.arange(6 * L * K).reshape(6, L, K)  # vLLM computes prompt (3) + response (4) - 1 positions
    prompt_rows, rows = native_routing(routed, 3, 4)
    assert np.array_equal(rows, routed[2:6]) and np.array_equal(prompt_rows, routed[:2])
    assert native_routing(routed[:5], 3, 4) is None  # a scoring position missing: replay
    assert native_routing(routed, 0, 4) is None
    one_token_prompt, rows = native_routing(routed, 1, 4)
    assert one_token_prompt.shape == (0, L, K) and np.array_equal(rows, routed[:4])
    with pytest.raises(RolloutError, match="do not cover"):
        sample_routing(routed[:4], 3, 4)


def test_r3_merge_replays_every_position_the_engine_computed_and_keeps_the_trainers_routing_elsewhere():
    full = torch.zeros(2, 7, L, K, dtype=torch.long)  # row 0: prompt 3 + response 4; row 1: prompt 2 + response 2
    roll = torch.full((2, 4, L, K), 5, dtype=torch.long)
    roll[0, 2, 1] = -1  # token 2's scoring position (4) not captured in one layer
    roll[1, 2:] = -1    # row 1's padding
    prompt = torch.full((2, 3, L, K), 7, dtype=torch.long)
    prompt[:, 2] = -1   # only positions 0 .. prompt_len - 2 are prompt routing
    local = {"prompt_lens": torch.tensor([3, 2]), "response_mask": torch.tensor([[1.0] * 4, [1, 1, 0, 0]]),
             "rollout_routing": roll}
    out = merge_rollout_routing(full, local)  # no prompt routing: the trainer's at positions 0 .. P - 2
    assert (out[0, :2] == 0).all() and (out[0, 2:4] == 5).all() and (out[0, 4] == 0).all()
    assert (out[0, 5] == 5).all() and (out[0, 6] == 0).all()  # the last position scores nothing: trainer's
    assert (out[1, 0] == 0).all() and (out[1, 1:3] == 5).all() and (out[1, 3:] == 0).all()
    out = merge_rollout_routing(full, {**local, "rollout_prompt_routing": prompt})
    assert (out[0, :2] == 7).all() and (out[0, 2:4] == 5).all() and (out[0, 4] == 0).all()
    assert (out[1, 0] == 7).all() and (out[1, 1:3] == 5).all() and (out[1, 3:] == 0).all()
    assert (full == 0).all()  # the input is not modified


def test_training_batch_carries_the_prompt_routing_only_when_asked():
    from upgrpo_megatron.rollout.batch import RolloutBatch, RolloutSample, training_batch

    samples = [RolloutSample(0, 0, [4, 5], [-0.1, -0.2], "stop", routing=np.full((2, L, K), 1, np.int16),
                             prompt_routing=np.full((2, L, K), 3, np.int16)),
               RolloutSample(1, 0, [6], [-0.3], "stop")]  # routing not captured
    kw = dict(max_prompt_length=4, max_response_length=3, pad_token_id=0, num_moe_layers=L, topk=K)
    args = (RolloutBatch(samples), [[1, 2, 3], [9]], [0, 1], torch.ones(2))
    assert "rollout_prompt_routing" not in training_batch(*args, **kw)
    pr = training_batch(*args, **kw, prompt_routing=True)["rollout_prompt_routing"]
    assert pr.shape == (2, 4, L, K) and (pr[0, :2] == 3).all() and (pr[0, 2:] == -1).all() and (pr[1] == -1).all()
    assert pr.dtype == torch.int16  # as captured; R3 widens it where it replays it
    # the step drops the samples' copies once the batch is built (rl_step): the batch must not share their memory
    batch = training_batch(*args, **kw, prompt_routing=True)
    args[0].samples[0].routing[:] = 7
    args[0].samples[0].prompt_routing[:] = 7
    assert (batch["rollout_routing"][0, :2] == 1).all() and (batch["rollout_prompt_routing"][0, :2] == 3).all()
    args[0].drop_routing()
    assert all(s.routing is None and s.prompt_routing is None for s in args[0].samples)
    for bad in (np.zeros((2, L + 1, K), np.int16), np.zeros((5, L, K), np.int16)):  # other layers; too long
        samples[0].prompt_routing = bad
        with pytest.raises(RolloutError, match="prompt routing of shape"):
            training_batch(*args, **kw, prompt_routing=True)


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
