"""Data: tasks (synthetic arithmetic, verl-layout math datasets), tokenizer, prompt stream, rewards.

    from upgrpo_megatron.data import build_task
    task = build_task(cfg)                      # Task: tokenizer, train stream, val prompts, reward
    prompts = task.next_train_prompts(16)       # [PromptItem(prompt_ids, answer, text, answer_ids, index)]
    r = task.reward(response_text, prompts[0].answer)
"""

from upgrpo_megatron.data.errors import DatasetError
from upgrpo_megatron.data.prompts import PromptDataset, PromptItem
from upgrpo_megatron.data.rewards import REWARDS, get_reward
from upgrpo_megatron.data.task import Task, build_task

__all__ = ["DatasetError", "PromptDataset", "PromptItem", "REWARDS", "Task", "build_task", "get_reward"]
