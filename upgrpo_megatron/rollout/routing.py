"""Turn routing the engine recorded into per-sample rollout routing `[response_len, moe_layers, topk]`.

Three sources, one result, `sample_routing`: the response routing (see `batch.py` for the position convention:
row t is the routing of input position `prompt_len - 1 + t`, the one whose logits score response token t) and
the prompt routing (positions `0 .. prompt_len - 2`, which R3 replays too):
- native (GPU vLLM with `enable_return_routed_experts=True`): `CompletionOutput.routed_experts`,
  `[positions, moe_layers, topk]` over the positions the engine computed.
- decode capture (CPU, the default): capture callbacks on the engine's routers (`worker_ext`) record every
  forward pass of the generation itself, with the request id of each row; `decode_rows` rebuilds each
  request's routing by position.
- replay capture (CPU, the fallback): the completed sequences are re-run as one prefill with the same
  callbacks; `rows_per_sequence` maps the rows back to sequences by positions and token ids.
Pure numpy: no vLLM.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from upgrpo_megatron.rollout.batch import RolloutError


def covers(n_rows: int, prompt_len: int, response_len: int) -> bool:
    """Whether rows of positions `0 .. n_rows - 1` hold every position a `prompt_len`-token prompt and its
    `response_len`-token response are scored from (`prompt_len + response_len - 1` of them)."""
    return prompt_len >= 1 and n_rows >= prompt_len + response_len - 1


def sample_routing(rows: np.ndarray, prompt_len: int, response_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """(prompt routing, response routing) int16 from the rows of positions `0 ..` of prompt + response (the
    engine computes `prompt_len + response_len - 1` of them; more rows are ignored):
    prompt routing `[prompt_len - 1, layers, topk]` = positions `0 .. prompt_len - 2` (they score no response
    token; R3 replays them); response routing `[response_len, layers, topk]` = positions
    `prompt_len - 1 .. prompt_len + response_len - 2`, the positions whose logits score the response tokens."""
    if not covers(rows.shape[0], prompt_len, response_len):
        raise RolloutError(f"routing: {rows.shape[0]} rows do not cover the {response_len} scoring positions of a "
                           f"{prompt_len}-token prompt")
    return (np.ascontiguousarray(rows[:prompt_len - 1], dtype=np.int16),
            np.ascontiguousarray(rows[prompt_len - 1: prompt_len - 1 + response_len], dtype=np.int16))


def native_routing(routed: np.ndarray, prompt_len: int, response_len: int
                   ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """`sample_routing` from vLLM's native `routed_experts` `[positions, layers, topk]`, or None when the engine
    did not record every position it computed (then the caller falls back to replay)."""
    routed = np.asarray(routed)
    if routed.ndim != 3 or not covers(routed.shape[0], prompt_len, response_len):
        return None
    return sample_routing(routed, prompt_len, response_len)


def decode_rows(rec: dict) -> List[tuple]:
    """Per request of a decode capture, `(token ids, rows)`: the ids the engine fed at positions 0 .. n-1 and
    their `[n, moe_layers, topk]` top-k ids. `rec` (from `worker_ext.stop_capture` after
    `start_decode_capture`) has, per forward pass, `steps` (input_ids, positions), `layers[layer_id]` and
    `batches` (request ids, query_start_loc): rows `qsl[i]:qsl[i + 1]` are request i's. A preempted request
    computed again overwrites its positions. A request with a gap in its positions, rows that are not
    consecutive positions, or a recompute that fed other tokens is dropped (its samples then fall back to the
    replay): a mapping in doubt is never used."""
    layer_ids = list(rec["layer_ids"])
    batches = rec.get("batches") or []
    if len(batches) != len(rec["steps"]) or any(len(rec["layers"][lid]) != len(batches) for lid in layer_ids):
        raise RolloutError("routing capture: the forward passes, their request lists and the MoE layers recorded "
                           "different counts")
    reqs: dict = {}
    for step, ((ids, pos), (req_ids, qsl)) in enumerate(zip(rec["steps"], batches)):
        ids, pos = np.asarray(ids).reshape(-1), np.asarray(pos).reshape(-1)
        topk = np.stack([np.asarray(rec["layers"][lid][step]) for lid in layer_ids], axis=1)
        if int(qsl[-1]) > min(len(pos), topk.shape[0]):
            raise RolloutError(f"routing capture: forward pass {step} schedules {int(qsl[-1])} tokens but recorded "
                               f"{len(pos)} positions and {topk.shape[0]} router rows")
        for i, rid in enumerate(req_ids):
            a, b = int(qsl[i]), int(qsl[i + 1])
            reqs.setdefault(rid, []).append((pos[a:b], ids[a:b], topk[a:b]))
    out = []
    for parts in reqs.values():
        parts = [x for x in parts if len(x[0])]
        n = max(int(p.max()) + 1 for p, _, _ in parts) if parts else 0
        fed = np.full(n, -1, dtype=np.int64)
        rows = np.full((n, *parts[0][2].shape[1:]), -1, dtype=np.int16) if parts else None
        ok = n > 0
        for p, i, t in parts:
            # a request's rows are consecutive positions; a recompute must feed the same tokens again
            if (np.diff(p) != 1).any() or ((fed[p] >= 0) & (fed[p] != i)).any():
                ok = False
                break
            fed[p], rows[p] = i, t
        if ok and (fed >= 0).all():
            out.append((fed, rows))
    return out


def decode_routing(rec: dict, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
                   ) -> List[Optional[np.ndarray]]:
    """The rows of positions `0 .. P + R - 2` (every position the engine fed) of each (prompt, response) from
    a decode capture (`sample_routing` splits them), or None for a sample no request matches or with an empty
    response. A request is matched by what it fed: prompt + response[:-1] (requests that fed the same tokens
    are interchangeable)."""
    by_tokens: dict = {}
    for fed, rows in decode_rows(rec):
        by_tokens.setdefault(tuple(fed.tolist()), []).append(rows)
    out: List[Optional[np.ndarray]] = []
    for prompt, resp in zip(prompts, responses):
        bucket = by_tokens.get(tuple(int(t) for t in list(prompt) + list(resp)[:-1]))
        out.append(bucket.pop(0) if bucket and len(resp) else None)
    return out


def rows_per_sequence(rec: dict, seqs: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """Map captured prefill rows back to sequences: one `[len(seq), moe_layers, topk]` array per sequence.

    `rec` (from `worker_ext.stop_capture`): `steps` = per forward pass `(input_ids, positions)`, and
    `layers[layer_id]` = per forward pass `[rows, topk]` top-k ids. A forward pass is a concatenation of
    request chunks; a chunk starts at position 0 (a new request) or continues a chunked prefill from an earlier
    pass. Where the continuation sits in its pass is up to vLLM (its persistent batch moves requests when others
    finish), so a chunk at position p continues an earlier segment of p tokens whose ids, followed by the
    chunk's, begin one of `seqs`. Completed row groups are matched to sequences by token ids; identical
    sequences are interchangeable.
    """
    layer_ids = list(rec["layer_ids"])
    if any(len(rec["layers"][lid]) != len(rec["steps"]) for lid in layer_ids):
        raise RolloutError("routing capture: MoE layers recorded a different number of forward passes than the model")
    segs: List[dict] = []
    for step, (ids, pos) in enumerate(rec["steps"]):
        ids, pos = np.asarray(ids).reshape(-1), np.asarray(pos).reshape(-1)
        per_layer = [np.asarray(rec["layers"][lid][step]) for lid in layer_ids]
        if any(a.shape[0] != len(pos) for a in per_layer):
            raise RolloutError(f"routing capture: forward pass {step} has {len(pos)} tokens but a router saw "
                               f"{[a.shape[0] for a in per_layer]} rows")
        topk = np.stack(per_layer, axis=1)  # [rows, moe_layers, topk]
        # chunk boundaries: wherever the position does not follow on from the row before
        starts = [0, *(np.flatnonzero(np.diff(pos) != 1) + 1).tolist(), len(pos)]
        earlier = len(segs)  # a continuation continues a segment of an earlier pass
        for start, end in zip(starts[:-1], starts[1:]):
            chunk = ids[start:end].tolist()
            if pos[start] == 0:
                seg = {"ids": [], "rows": []}
                segs.append(seg)
            else:
                seg = _continued(segs[:earlier], int(pos[start]), chunk, seqs)
            seg["ids"].extend(chunk)
            seg["rows"].append(topk[start:end])
    by_tokens: dict = {}
    for seg in segs:
        by_tokens.setdefault(tuple(seg["ids"]), []).append(np.concatenate(seg["rows"]))
    out = []
    for i, s in enumerate(seqs):
        bucket = by_tokens.get(tuple(int(t) for t in s))
        if not bucket:
            raise RolloutError(f"routing capture: the prefill rows of sequence {i} were not captured")
        out.append(bucket.pop(0))
    return out


def _continued(segs: List[dict], position: int, chunk: List[int], seqs: Sequence[Sequence[int]]) -> dict:
    """The segment a prefill chunk starting at `position` continues: `position` tokens long, and its ids then
    the chunk's begin one of `seqs`. Rare (one chunked request per pass at most), so a linear scan."""
    for seg in segs:
        if len(seg["ids"]) == position:
            head = seg["ids"] + chunk
            if any(len(s) >= len(head) and [int(t) for t in s[:len(head)]] == head for s in seqs):
                return seg
    raise RolloutError(f"routing capture: a prefill chunk at position {position} continues no request")


def token_groups(seqs: Sequence[Sequence[int]], budget: int) -> Iterator[List[Sequence[int]]]:
    """Consecutive groups of `seqs` of at most `budget` tokens each (a longer sequence goes alone)."""
    group: List[Sequence[int]] = []
    used = 0
    for s in seqs:
        if group and used + len(s) > budget:
            yield group
            group, used = [], 0
        group.append(s)
        used += len(s)
    if group:
        yield group
