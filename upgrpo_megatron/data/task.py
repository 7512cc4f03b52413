"""A task = tokenizer + train stream + held-out prompts + reward, whatever the data source.

`build_task(cfg)` gives the trainer one object: the synthetic arithmetic task (the tiny default, with its own
character tokenizer of exactly `model.vocab_size` ids) or math datasets in verl's layout (with the model's
tokenizer from `data.tokenizer_path` or `model.hf_path`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from upgrpo_megatron.data.errors import DatasetError
from upgrpo_megatron.data.math_dataset import MathRow, load_math_rows, prompt_text
from upgrpo_megatron.data.prompts import PromptDataset, PromptItem
from upgrpo_megatron.data.rewards import get_reward, is_correct, resolve_reward_name


class Task:
    def __init__(self, tokenizer, train: Sequence[PromptItem], val: Sequence[PromptItem], reward: str, seed: int,
                 task: str = "arithmetic", skipped_rows: int = 0, dropped_overlong: int = 0):
        self.tokenizer = tokenizer
        self.reward_name = resolve_reward_name(reward, task)
        self._reward = get_reward(reward, task)
        self.skipped_rows = skipped_rows          # malformed rows skipped (data.skip_malformed_rows)
        self.dropped_overlong = dropped_overlong  # prompts dropped (data.filter_overlong_prompts)
        if not train:
            raise DatasetError("the training set is empty")
        self.train = PromptDataset(train, seed=seed)
        self.val = list(val)

    # the trainer's interface
    def next_train_prompts(self, k: int) -> List[PromptItem]:
        """The next k prompts of the shuffled training stream (resumable exactly, see `state_dict`)."""
        return self.train.next_batch(k)

    def val_prompts(self) -> List[PromptItem]:
        return self.val

    def sft_examples(self) -> List[PromptItem]:
        return self.train.items

    def reward(self, response: str, answer: str) -> float:
        return float(self._reward(response, answer))

    def is_correct(self, reward: float) -> bool:
        """The verifier's verdict behind a reward (rewards are > 0 exactly when the response is correct)."""
        return is_correct(reward)

    def accuracy(self, response: str, answer: str) -> float:
        """1.0 if the response is correct, else 0.0 (for val/acc: DAPO's reward is +1/-1, not 1/0)."""
        return 1.0 if is_correct(self.reward(response, answer)) else 0.0

    def state_dict(self) -> dict:
        return self.train.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state)


def encode_prompts(tokenizer, rows: Sequence[MathRow], max_prompt_length: int, split: str, *,
                   apply_chat_template: bool = True, drop_overlong: bool = False):
    """Tokenize rows into `PromptItem`s; a prompt over `max_prompt_length` tokens is an error naming it, or
    dropped and counted with `drop_overlong`. Chat-list prompts use the tokenizer's chat template when it
    has one (with the generation prompt appended), else their contents joined by newlines."""
    items, dropped = [], 0
    use_template = apply_chat_template and getattr(tokenizer, "chat_template", None)
    for i, row in enumerate(rows):
        text = prompt_text(row.prompt)
        if use_template and not isinstance(row.prompt, str):
            text = tokenizer.apply_chat_template(row.prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_prompt_length:
            if drop_overlong:
                dropped += 1
                continue
            raise DatasetError(f"{split} prompt {i} has {len(ids)} tokens, more than data.max_prompt_length="
                               f"{max_prompt_length} (set data.filter_overlong_prompts=true to drop such prompts)")
        items.append(PromptItem(ids, row.answer, text, tokenizer.encode(row.answer, add_special_tokens=False),
                                index=len(items), data_source=row.data_source))
    return items, dropped


def build_task(cfg, run_dir: Optional[str] = None) -> Task:
    """The task the recipe describes. `run_dir` is unused for now (reserved for caching tokenized data)."""
    d = cfg.data
    if d.task == "arithmetic":
        from upgrpo_megatron.data.arithmetic import split_problems
        from upgrpo_megatron.data.tokenizer import build_char_tokenizer

        try:
            tok = build_char_tokenizer(cfg.model.vocab_size)
            train, val = split_problems(d.arithmetic_max_operand, d.num_train, d.num_val, d.seed, d.arithmetic_ops)
        except ValueError as e:
            raise DatasetError(str(e)) from None
        rows = lambda ps: [MathRow(p.prompt, p.answer, "arithmetic") for p in ps]  # noqa: E731
        kw = dict(apply_chat_template=False, drop_overlong=d.filter_overlong_prompts)
        train_items, dropped = encode_prompts(tok, rows(train), d.max_prompt_length, "train", **kw)
        val_items, dropped_val = encode_prompts(tok, rows(val), d.max_prompt_length, "val", **kw)
        return Task(tok, train_items, val_items, d.reward, d.seed, task="arithmetic",
                    dropped_overlong=dropped + dropped_val)

    from upgrpo_megatron.data.tokenizer import load_tokenizer

    tok_path = d.tokenizer_path or cfg.model.hf_path
    if not tok_path:
        raise DatasetError("data.task=math needs a tokenizer: set data.tokenizer_path or model.hf_path")
    try:
        tok = load_tokenizer(tok_path)
    except (OSError, ValueError) as e:
        raise DatasetError(f"tokenizer {tok_path}: {str(e).splitlines()[0]}") from None
    train, skipped = load_math_rows(d.train_files, d.prompt_key, d.answer_key, d.skip_malformed_rows)
    val, skipped_val = (load_math_rows(d.val_files, d.prompt_key, d.answer_key, d.skip_malformed_rows)
                        if d.val_files else ([], 0))
    kw = dict(apply_chat_template=d.apply_chat_template, drop_overlong=d.filter_overlong_prompts)
    train_items, dropped = encode_prompts(tok, train, d.max_prompt_length, "train", **kw)
    val_items, dropped_val = encode_prompts(tok, val, d.max_prompt_length, "val", **kw)
    return Task(tok, train_items, val_items, d.reward, d.seed, task="math", skipped_rows=skipped + skipped_val,
                dropped_overlong=dropped + dropped_val)
