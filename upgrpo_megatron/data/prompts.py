"""Tokenized prompts and a resumable, shuffled stream over them.

`PromptDataset.next_batch(k)` returns the next k items of a stream that reshuffles every epoch with a
permutation derived from (seed, epoch) alone, so `state_dict()` = {epoch, offset, seed, size} is all a
checkpoint needs to continue with exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from upgrpo_megatron.data.errors import DatasetError


class PromptStateError(DatasetError):
    """A saved stream position does not fit this dataset (different size)."""


@dataclass(frozen=True)
class PromptItem:
    prompt_ids: List[int]   # [prompt_len] token ids, no special tokens added
    answer: str             # ground truth given to the reward function
    text: str               # the prompt as text (for samples.jsonl)
    answer_ids: List[int]   # [answer_len] token ids of the answer (supervised warm-up targets)
    index: int = -1         # position in its split
    data_source: str = ""


class PromptDataset:
    """A fixed list of `PromptItem`s with a resumable shuffled position."""

    def __init__(self, items: Sequence[PromptItem], seed: int, shuffle: bool = True):
        if not items:
            raise DatasetError("the prompt dataset is empty")
        self.items = list(items)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.items))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def next_batch(self, k: int) -> List[PromptItem]:
        """The next k prompts of the stream; crossing an epoch boundary starts the next epoch's shuffle."""
        out: List[PromptItem] = []
        while len(out) < k:
            if self.offset >= len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(out), len(self._order) - self.offset)
            out += [self.items[i] for i in self._order[self.offset : self.offset + take]]
            self.offset += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        size = state.get("size", len(self.items))
        if size != len(self.items):
            raise PromptStateError(f"the checkpoint's prompt stream was over {size} prompts, this dataset has "
                                   f"{len(self.items)}: resume with the same data settings")
        self.seed, self.epoch, self.offset = int(state["seed"]), int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
