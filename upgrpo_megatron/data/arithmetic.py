"""The synthetic, exactly verifiable task of the default recipe: "a+b=" / "a-b=" -> the number.

All problems with operands in [0, max_operand] are enumerated and split deterministically (by seed) into
disjoint train and held-out sets. The reward is 1.0 for an exact answer, else 0.0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def all_problems(max_operand: int) -> List[Problem]:
    out = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            out.append(Problem(f"{a}+{b}=", str(a + b)))
            out.append(Problem(f"{a}-{b}=", str(a - b)))
    return out


def split_problems(max_operand: int, num_train: int, num_val: int, seed: int):
    """(train, val): disjoint, deterministic for a seed; val first takes num_val problems."""
    problems = all_problems(max_operand)
    random.Random(seed).shuffle(problems)
    if num_val >= len(problems):
        raise ValueError(f"data.num_val={num_val}: only {len(problems)} arithmetic problems exist with "
                         f"data.arithmetic_max_operand={max_operand}")
    val = problems[:num_val]
    train = problems[num_val : num_val + num_train]
    return train, val


def arithmetic_reward(response: str, answer: str) -> float:
    """Exact match of the response (up to end of sequence, surrounding whitespace ignored)."""
    return 1.0 if response.strip() == answer.strip() else 0.0
