"""Turn routing the engine recorded into per-sample rollout routing `[response_len, moe_layers, topk]`.

Two sources, one result (see `batch.py` for the position convention):
- native (GPU vLLM with `enable_return_routed_experts=True`): `CompletionOutput.routed_experts`,
  `[positions, moe_layers, topk]` over prompt + response; we keep rows `prompt_len .. prompt_len + R - 1`.
- replay capture (CPU): the completed sequences are re-run as one prefill with capture callbacks on the
  engine's routers (`worker_ext`); the callbacks see the engine's batch as concatenated request chunks.
  `rows_per_sequence` maps those rows back to sequences. Pure numpy: no vLLM.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

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
    request chunks; a chunk starts at position 0 (a new request) or continues a chunked prefill. vLLM's
    scheduler keeps at most one request partially prefilled, and schedules it first in the next pass, so a
    continuation belongs to the last chunk of the previous pass (checked by its length). Completed row
    groups are matched to sequences by token ids; identical sequences are interchangeable.
    """
    layer_ids = list(rec["layer_ids"])
    if any(len(rec["layers"][lid]) != len(rec["steps"]) for lid in layer_ids):
        raise RolloutError("routing capture: MoE layers recorded a different number of forward passes than the model")
    segs: List[dict] = []
    last_prev: Optional[dict] = None
    for step, (ids, pos) in enumerate(rec["steps"]):
        ids, pos = np.asarray(ids).reshape(-1), np.asarray(pos).reshape(-1)
        per_layer = [np.asarray(rec["layers"][lid][step]) for lid in layer_ids]
        if any(a.shape[0] != len(pos) for a in per_layer):
            raise RolloutError(f"routing capture: forward pass {step} has {len(pos)} tokens but a router saw "
                               f"{[a.shape[0] for a in per_layer]} rows")
        topk = np.stack(per_layer, axis=1)  # [rows, moe_layers, topk]
        start, last = 0, None
        while start < len(pos):
            end = start + 1
            while end < len(pos) and pos[end] == pos[end - 1] + 1:
                end += 1
            if pos[start] == 0:
                seg = {"ids": [], "rows": []}
                segs.append(seg)
            elif start == 0 and last_prev is not None and len(last_prev["ids"]) == pos[start]:
                seg = last_prev
            else:
                raise RolloutError(f"routing capture: a prefill chunk at position {int(pos[start])} "
                                   "continues no request")
            seg["ids"].extend(ids[start:end].tolist())
            seg["rows"].append(topk[start:end])
            last = seg
            start = end
        last_prev = last
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
