"""Reward functions by name: the recipe's `data.reward` picks one, the trainer calls it per response.

A reward function maps (decoded response text, ground-truth answer) -> float. Every reward here is
positive exactly when the response is correct, so `is_correct(reward) = reward > 0` gives accuracy for any of
them (DAPO's reward is +1/-1, the others 1/0).
"""

from __future__ import annotations

from typing import Callable, Dict

from upgrpo_megatron.data.arithmetic import verify as arithmetic_exact
from upgrpo_megatron.data.math_dataset import dapo_answer_reward, math_verify_reward

RewardFn = Callable[[str, str], float]

REWARDS: Dict[str, RewardFn] = {
    "arithmetic_exact": arithmetic_exact,   # exact first line (synthetic arithmetic)
    "math_verify": math_verify_reward,      # symbolic equivalence via the math-verify package, 1/0
    "dapo_answer": dapo_answer_reward,      # DAPO's "Answer:" line grader, +1/-1
}

# data.reward=auto picks the task's natural grader
DEFAULT_REWARD = {"arithmetic": "arithmetic_exact", "math": "math_verify"}


def register_reward(name: str, fn: RewardFn) -> None:
    """Add a reward under a new name (for experiments): `data.reward=<name>` then selects it."""
    if name in REWARDS:
        raise ValueError(f"reward '{name}' is already registered")
    REWARDS[name] = fn


def get_reward(name: str, task: str = "arithmetic") -> RewardFn:
    """The reward function for `data.reward` (resolving 'auto' by task)."""
    key = DEFAULT_REWARD.get(task, "math_verify") if name == "auto" else name
    if key not in REWARDS:
        raise ValueError(f"data.reward='{name}': unknown reward (choose one of auto, {', '.join(REWARDS)})")
    return REWARDS[key]


def resolve_reward_name(name: str, task: str) -> str:
    return DEFAULT_REWARD.get(task, "math_verify") if name == "auto" else name


def is_correct(reward: float) -> bool:
    return reward > 0
