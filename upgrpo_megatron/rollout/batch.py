"""What a rollout returns, and how it becomes the trainer's padded tensors. Pure Python/torch: no vLLM.

A `RolloutBatch` holds samples ordered prompt-major, then sample index: sample `i * n + j` is the j-th
response to prompt i. Every batch records the `weight_version` the engine held when it generated, so a
trainer can refuse rollouts from stale weights.

Rollout routing convention: `RolloutSample.routing[t]` is the top-k expert ids the engine chose, in every
MoE layer, at the INPUT position whose logits score response token t: position `prompt_len - 1 + t` of
`prompt + response` (the last prompt position for the first token). The trainer scores the same positions
when it scores `prompt + response` in one forward pass and records its routing there, so "a token's routing"
is, on both sides, the routing of the computation that produced its log-prob: what the train-vs-rollout
mismatch, the per-expert ratio statistics, the routing_mask correction and R3 replay use. The engine feeds
every one of these positions (the last response token is sampled, never fed, and scores nothing).
`RolloutSample.prompt_routing` holds the engine's routing of the remaining prompt positions, so R3 can replay
the engine's routing at every position the engine computed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from upgrpo_megatron.distributed import strided_indices
from upgrpo_megatron.errors import UpgrpoError

# Expert ids everywhere in a step's batch (the engine's, the trainer's, the replayed): 16 bits hold any expert
# count a recipe may ask for (config/validate.py refuses more than MAX_EXPERTS) at a quarter of int64's bytes;
# megatron's router gets int64 only for the micro-batch it replays (`MegatronActor._replay_indices`).
ROUTING_DTYPE = torch.int16


class RolloutError(UpgrpoError, RuntimeError):
    """The rollout engine cannot do what was asked (bad prompt, unsupported model, engine died). One line."""


@dataclass
class RolloutSample:
    """One response. `routing`: `[response_len, moe_layers, topk]` expert ids at the positions that score the
    response (int16, `ROUTING_DTYPE`, to keep large batches small in memory and in transfers),
    or None when capture is off; `prompt_routing`: `[prompt_len - 1, moe_layers, topk]`, the engine's routing of
    the other prompt positions (0 .. prompt_len - 2), set with `routing` (R3 replays both)."""

    prompt_index: int
    sample_index: int
    response_ids: List[int]
    log_probs: List[float]  # engine log-prob of each sampled token, [response_len]
    finish_reason: str  # "stop" (a stop token, included in response_ids) | "length"
    routing: Optional[np.ndarray] = None
    prompt_routing: Optional[np.ndarray] = None
    routing_replayed: bool = False  # routing from the replay prefill (decode / native capture missed it)


@dataclass
class RolloutBatch:
    samples: List[RolloutSample] = field(default_factory=list)
    weight_version: int = 0
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.samples)

    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)

    def drop_routing(self) -> None:
        """Forget every sample's routing (once `training_batch` has copied it into the step's tensors)."""
        for s in self.samples:
            s.routing = s.prompt_routing = None


def pad_rollout_batch(batch: RolloutBatch, response_len: Optional[int] = None, pad_token_id: int = 0,
                      num_moe_layers: Optional[int] = None, topk: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Pad a batch into the trainer's tensors.

    Returns
      responses         `[batch, response_len]` int64 (pad_token_id after the end)
      response_mask     `[batch, response_len]` int64 (1 = real response token)
      rollout_log_prob  `[batch, response_len]` float32 (0 on padding)
      rollout_routing   `[batch, response_len, moe_layers, topk]` int16 (-1 on padding); only when the samples
                        carry routing (or num_moe_layers/topk are given: then all -1 where absent)
      prompt_index      `[batch]` int64
    `response_len` defaults to the longest response; longer responses are an error (not silently cut).
    """
    samples = batch.samples
    longest = max((len(s.response_ids) for s in samples), default=0)
    R = longest if response_len is None else int(response_len)
    if longest > R:
        i = next(k for k, s in enumerate(samples) if len(s.response_ids) > R)
        raise RolloutError(f"sample {i} has {len(samples[i].response_ids)} response tokens, more than response_len={R}")
    B = len(samples)
    out = {
        "responses": torch.full((B, R), int(pad_token_id), dtype=torch.long),
        "response_mask": torch.zeros(B, R, dtype=torch.long),
        "rollout_log_prob": torch.zeros(B, R, dtype=torch.float32),
        "prompt_index": torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
    }
    shapes = {tuple(np.shape(s.routing)[1:]) for s in samples if s.routing is not None}
    if len(shapes) > 1:
        raise RolloutError(f"samples carry routing of different shapes {sorted(shapes)}")
    if shapes:
        L, k = shapes.pop()
    elif num_moe_layers is not None and topk is not None:
        L, k = int(num_moe_layers), int(topk)
    else:
        L = k = None
    if L is not None:
        out["rollout_routing"] = torch.full((B, R, L, k), -1, dtype=ROUTING_DTYPE)
    for i, s in enumerate(samples):
        m = len(s.response_ids)
        if len(s.log_probs) != m:
            raise RolloutError(f"sample {i} has {m} response tokens but {len(s.log_probs)} log-probs")
        out["responses"][i, :m] = torch.as_tensor(s.response_ids, dtype=torch.long)
        out["response_mask"][i, :m] = 1
        out["rollout_log_prob"][i, :m] = torch.as_tensor(s.log_probs, dtype=torch.float32)
        if L is not None and s.routing is not None:
            if np.shape(s.routing)[0] != m:
                raise RolloutError(f"sample {i} has {m} response tokens but routing for {np.shape(s.routing)[0]}")
            out["rollout_routing"][i, :m] = torch.as_tensor(np.asarray(s.routing)).to(ROUTING_DTYPE)
    return out


def shard_prompts(num_prompts: int, rank: int, world_size: int) -> List[int]:
    """The global prompt indices data-parallel rank `rank` generates: rank::world_size (the trainer's row split)."""
    return strided_indices(num_prompts, rank, world_size)


def pad_right(rows: Sequence[Sequence[int]], pad: int, length: Optional[int] = None) -> torch.Tensor:
    """Token-id rows right-padded (or cut) to `length` (default: the longest), `[len(rows), length]` int64."""
    length = length or max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(length, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r[:length]), dtype=torch.long)
    return out


def training_batch(batch: RolloutBatch, prompt_ids: Sequence[Sequence[int]], keep: Sequence[int],
                   advantages: torch.Tensor, *, max_prompt_length: int, max_response_length: int, pad_token_id: int,
                   num_moe_layers: int, topk: int, prompt_routing: bool = False) -> Dict[str, torch.Tensor]:
    """The actor's tensors for the kept samples `keep` of a rollout (see `megatron/actor.py` for the layout).

    prompt_ids: token ids of every prompt, indexed by `RolloutSample.prompt_index`; advantages: `[len(batch)]`
    per sample. Returns input_ids `[n, max_prompt_length + max_response_length]` (prompt + response, right
    padded), prompt_lens `[n]`, response_mask / advantages / rollout_log_prob `[n, R]` float32,
    rollout_routing `[n, R, moe_layers, topk]` int16 (-1 where not captured) and group `[n]` (the prompt index); with
    `prompt_routing`, rollout_prompt_routing `[n, max_prompt_length, moe_layers, topk]` int16: row j = the
    engine's routing of prompt position j < prompt_len - 1 (-1 elsewhere and where not captured)."""
    kept = RolloutBatch([batch.samples[i] for i in keep], batch.weight_version)
    t = pad_rollout_batch(kept, response_len=max_response_length, pad_token_id=pad_token_id,
                          num_moe_layers=num_moe_layers, topk=topk)
    prompts = [list(prompt_ids[s.prompt_index]) for s in kept.samples]
    mask = t["response_mask"].to(torch.float32)
    out = {
        "input_ids": pad_right([p + list(s.response_ids) for p, s in zip(prompts, kept.samples)], pad_token_id,
                               length=max_prompt_length + max_response_length),
        "prompt_lens": torch.tensor([len(p) for p in prompts]),
        "response_mask": mask,
        "advantages": (advantages[list(keep)].unsqueeze(1) * mask).contiguous(),
        "rollout_log_prob": t["rollout_log_prob"],
        "rollout_routing": t["rollout_routing"],
        "group": t["prompt_index"],
    }
    if prompt_routing:
        pr = torch.full((len(prompts), max_prompt_length, num_moe_layers, topk), -1, dtype=ROUTING_DTYPE)
        for i, s in enumerate(kept.samples):
            if s.prompt_routing is not None and len(s.prompt_routing):
                rows = np.asarray(s.prompt_routing)
                if rows.shape[1:] != (num_moe_layers, topk) or len(rows) > max_prompt_length:
                    raise RolloutError(f"sample {keep[i]}: prompt routing of shape {list(rows.shape)}, expected "
                                       f"[< {max_prompt_length}, {num_moe_layers}, {topk}]")
                pr[i, : len(rows)] = torch.as_tensor(rows).to(ROUTING_DTYPE)
        out["rollout_prompt_routing"] = pr
    return out


def merge_rank_batches(batches: Sequence[RolloutBatch], num_prompts: int) -> RolloutBatch:
    """Merge per-rank batches (rank r generated prompts `shard_prompts(num_prompts, r, world)`, numbering them
    0.. locally) into one batch in global order: prompt-major, then sample index. All ranks must have
    generated with the same weight version."""
    world = len(batches)
    versions = {b.weight_version for b in batches}
    if len(versions) > 1:
        raise RolloutError(f"data-parallel engines hold different weight versions {sorted(versions)}")
    merged: List[RolloutSample] = []
    for r, b in enumerate(batches):
        own = shard_prompts(num_prompts, r, world)
        for s in b.samples:
            if s.prompt_index >= len(own):
                raise RolloutError(f"rank {r} returned prompt_index {s.prompt_index} but holds {len(own)} prompts")
            merged.append(dataclasses.replace(s, prompt_index=own[s.prompt_index]))
    merged.sort(key=lambda s: (s.prompt_index, s.sample_index))
    return RolloutBatch(merged, versions.pop() if versions else 0, max((b.seconds for b in batches), default=0.0))
