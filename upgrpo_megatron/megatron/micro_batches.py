"""Micro-batches of a batch: which rows go through the model together, and where their rows are cut.

Rows are prompt + response, right-padded to max_prompt_length + max_response_length. Positions past a
micro-batch's longest row change nothing its real tokens compute (causal attention; each token is routed on its
own: the actor's MoE layers drop no tokens), so every micro-batch is cut to its longest row.

`actor.micro_batch_tokens` > 0 also packs by length, as verl's dynamic batch size does: the rows are sorted
longest first and a micro-batch takes rows while rows x its longest row stays within that many tokens (and rows
within `actor.micro_batch_size`). A batch of mostly short responses with a few long ones then no longer pays the
longest row's length on every row. The gradient is the same sum over tokens (each loss is normalised by the
mini-batch's global counts), in another order: equal up to float rounding.

Every rank must run micro-batches of the same shapes, in the same number: the vocab-parallel log-prob reduces
over TP, and the CPU expert dispatcher all-gathers tokens over TP x EP. `plan` agrees across the job (the
most micro-batches, and per micro-batch the most rows and the longest cut of any rank); a rank fills its
micro-batch with masked dummy rows (row -1: `distributed.take_rows`).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist

from upgrpo_megatron.distributed import collective_device, take_rows

Batch = Dict[str, torch.Tensor]
# keys laid out over input positions `[batch, seq, ...]`: cut with input_ids (the rest are per response token)
SEQ_KEYS = ("input_ids", "replay")


def row_lengths(batch: Batch) -> torch.Tensor:
    """Prompt + response tokens of every row `[batch]` (a masked row counts its prompt only)."""
    return batch["prompt_lens"].long() + batch["response_mask"].sum(1).long()


def group_rows(lengths: torch.Tensor, micro_batch_size: int, max_tokens: int = 0) -> List[List[int]]:
    """Row indices of each micro-batch. `max_tokens` 0: consecutive rows, `micro_batch_size` at a time.
    Otherwise longest first, each micro-batch within `max_tokens` padded tokens and `micro_batch_size` rows (a row
    longer than `max_tokens` goes alone); rows keep their batch order inside a micro-batch."""
    n, size = len(lengths), max(1, int(micro_batch_size))
    if max_tokens <= 0:
        return [list(range(s, min(n, s + size))) for s in range(0, n, size)]
    lens = [int(x) for x in lengths]
    groups: List[List[int]] = []
    cur: List[int] = []
    for i in sorted(range(n), key=lambda i: (-lens[i], i)):
        # longest first: the group's first row is its longest
        if cur and (len(cur) == size or (len(cur) + 1) * lens[cur[0]] > max_tokens):
            groups.append(sorted(cur))
            cur = []
        cur.append(i)
    if cur:
        groups.append(sorted(cur))
    return groups


def plan(batch: Batch, micro_batch_size: int, max_tokens: int = 0) -> List[Tuple[torch.Tensor, int]]:
    """Per micro-batch: its row indices into `batch` (-1: a dummy row) and the length its rows are cut to, the
    same number of micro-batches and the same shapes on every rank (collective when the job has several)."""
    lengths = row_lengths(batch)
    width = batch["input_ids"].shape[1]
    groups = group_rows(lengths, micro_batch_size, max_tokens)
    shapes = [(len(g), int(lengths[g].max()) if g else 0) for g in groups]
    if dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([len(groups)], dtype=torch.long, device=collective_device())
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        agreed = torch.zeros(int(count.item()), 2, dtype=torch.long, device=collective_device())
        if shapes:
            agreed[: len(shapes)] = torch.tensor(shapes, dtype=torch.long)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        shapes = [tuple(int(x) for x in row) for row in agreed.cpu()]
        groups += [[] for _ in range(len(shapes) - len(groups))]
    # at least 2 positions: the logits at position p score the token at p + 1
    return [(torch.tensor(g + [-1] * (rows - len(g)), dtype=torch.long), min(width, max(2, cut)))
            for g, (rows, cut) in zip(groups, shapes)]


def per_row(batch: Batch) -> Batch:
    """The entries of `batch` that hold one row per sample (tensors whose first dimension is the batch's)."""
    n = batch["input_ids"].shape[0]
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (n,)}


def cut(batch: Batch, rows: torch.Tensor, length: int) -> Batch:
    """Rows `rows` of `batch` (-1: a masked copy of row 0), input positions cut to `length`. Entries that are
    not per row (`per_row`) are left out."""
    out = take_rows(per_row(batch), rows)
    for k in SEQ_KEYS:
        if k in out:
            out[k] = out[k][:, :length]
    return out


def micro_batches(batch: Batch, micro_batch_size: int, max_tokens: int = 0) -> Iterator[Tuple[torch.Tensor, Batch]]:
    """`(rows, micro_batch)` for every micro-batch of `plan` (collective when the job has several ranks)."""
    for rows, length in plan(batch, micro_batch_size, max_tokens):
        yield rows, cut(batch, rows, length)
