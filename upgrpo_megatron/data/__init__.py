"""Tasks: prompts + answers + a verifier, tokenized, with a resumable position in the training stream.

`build_task(cfg)` gives the trainer one object whatever the data: the synthetic arithmetic task (the tiny
default, with its own character tokenizer) or math datasets in verl's layout (with the tokenizer of the
model, `data.tokenizer_path` or `model.hf_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np

from upgrpo_megatron.data.arithmetic import arithmetic_reward, split_problems
from upgrpo_megatron.data.math_dataset import DatasetError, dapo_answer_reward, load_math_rows, math_verify_reward

REWARDS: Dict[str, Callable[[str, str], float]] = {
    "arithmetic_exact": arithmetic_reward,
    "math_verify": math_verify_reward,
    "dapo_answer": dapo_answer_reward,
}


@dataclass(frozen=True)
class PromptItem:
    prompt_ids: List[int]
    answer: str
    text: str
    answer_ids: List[int]


class Task:
    def __init__(self, tokenizer, train: List[tuple], val: List[tuple], reward: str, max_prompt_length: int,
                 seed: int, skipped: int = 0):
        self.tokenizer = tokenizer
        self.reward_name = reward
        self._reward = REWARDS[reward]
        self.skipped_rows = skipped
        self.train = self._encode(train, max_prompt_length, "train")
        self.val = self._encode(val, max_prompt_length, "val")
        if not self.train:
            raise DatasetError("the training set is empty after tokenization")
        self.seed = seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _encode(self, rows, max_len, split) -> List[PromptItem]:
        out = []
        for i, (prompt, answer) in enumerate(rows):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            if len(ids) > max_len:
                raise DatasetError(f"{split} prompt {i} has {len(ids)} tokens, more than data.max_prompt_length={max_len}")
            out.append(PromptItem(ids, answer, prompt, self.tokenizer.encode(answer, add_special_tokens=False)))
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.train))

    def next_train_prompts(self, k: int) -> List[PromptItem]:
        """The next k prompts of the shuffled stream (a new shuffle each epoch); resumable exactly."""
        out = []
        while len(out) < k:
            if self.offset >= len(self._order):
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(out), len(self._order) - self.offset)
            out += [self.train[i] for i in self._order[self.offset : self.offset + take]]
            self.offset += take
        return out

    def val_prompts(self) -> List[PromptItem]:
        return self.val

    def sft_examples(self) -> List[PromptItem]:
        return self.train

    def reward(self, response: str, answer: str) -> float:
        return self._reward(response, answer)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.offset = state["seed"], state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)


def build_task(cfg, run_dir=None) -> Task:
    d = cfg.data
    if d.task == "arithmetic":
        from upgrpo_megatron.data.tokenizer import build_char_tokenizer

        tok = build_char_tokenizer(cfg.model.vocab_size if cfg.model.vocab_size >= 22 else 32)
        train, val = split_problems(d.arithmetic_max_operand, d.num_train, d.num_val, d.seed)
        rows = lambda ps: [(p.prompt, p.answer) for p in ps]  # noqa: E731
        reward = "arithmetic_exact" if d.reward == "auto" else d.reward
        return Task(tok, rows(train), rows(val), reward, d.max_prompt_length, d.seed)
    from upgrpo_megatron.data.tokenizer import load_tokenizer

    tok_path = d.tokenizer_path or cfg.model.hf_path
    if not tok_path:
        raise DatasetError("data.task=math needs a tokenizer: set data.tokenizer_path or model.hf_path")
    tok = load_tokenizer(tok_path)
    train, skipped = load_math_rows(d.train_files, d.prompt_key, d.answer_key, d.skip_malformed_rows)
    val, skipped_val = load_math_rows(d.val_files, d.prompt_key, d.answer_key, d.skip_malformed_rows) if d.val_files else ([], 0)
    reward = "math_verify" if d.reward == "auto" else d.reward
    return Task(tok, train, val, reward, d.max_prompt_length, d.seed, skipped + skipped_val)


__all__ = ["DatasetError", "PromptItem", "REWARDS", "Task", "build_task"]
