"""Turn routing the engine recorded into per-sample rollout routing `[response_len, moe_layers, topk]`.

Two sources, one result (see `batch.py` for the position convention):
- native (GPU vLLM with `enable_return_routed_experts=True`): `CompletionOutput.routed_experts`,
  `[positions, moe_layers, topk]` over prompt + response; we keep rows `prompt_len .. prompt_len + R - 1`.
- replay capture (CPU): the completed sequences are re-run as one prefill with capture callbacks on the
  engine's routers (`worker_ext`); the callbacks see the engine's batch as concatenated request chunks.
  `rows_per_sequence` maps those rows back to sequences. Pure numpy: no vLLM.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np

from upgrpo_megatron.rollout.batch import RolloutError


def native_response_routing(routed: np.ndarray, prompt_len: int, response_len: int) -> Optional[np.ndarray]:
    """Rows of the response positions from vLLM's native `routed_experts` `[positions, layers, topk]`, or None
    when the engine did not record every response position (then the caller falls back to replay)."""
    routed = np.asarray(routed)
    if routed.ndim != 3 or routed.shape[0] < prompt_len + response_len:
        return None
    return routed[prompt_len: prompt_len + response_len].astype(np.int16)


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
