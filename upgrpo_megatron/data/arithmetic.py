"""The synthetic, exactly verifiable task of the default recipe: "12+7=" -> "19".

Every problem `a OP b` with operands in [0, max_operand] and OP in `ops` has an integer index; a seeded
shuffle of the indices gives the held-out split (the first `num_val`) and the training split (the next
`num_train`), so the two never overlap and the same seed always gives the same splits. Problems are decoded
from their index on demand, so large operand ranges cost no enumeration.
The reward is 1.0 when the response's first line is exactly the answer, else 0.0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    prompt: str   # "12+7="
    answer: str   # "19"


def num_problems(max_operand: int, ops: Sequence[str] = ("+", "-")) -> int:
    return len(ops) * (max_operand + 1) ** 2


def problem_at(index: int, max_operand: int, ops: Sequence[str] = ("+", "-")) -> Problem:
    """The index-th problem of the grid enumerated a-major, then b, then the operator."""
    a, rest = divmod(index, (max_operand + 1) * len(ops))
    b, op = divmod(rest, len(ops))
    sym = ops[op]
    return Problem(f"{a}{sym}{b}=", str(OPS[sym](a, b)))


def split_problems(max_operand: int, num_train: int, num_val: int, seed: int,
                   ops: Sequence[str] = ("+", "-")) -> Tuple[List[Problem], List[Problem]]:
    """(train, val): disjoint, deterministic for a seed. Val takes `num_val` problems first; train takes up
    to `num_train` of the rest (fewer when the grid is smaller)."""
    unknown = [o for o in ops if o not in OPS]
    if unknown or not ops:
        raise ValueError(f"data.arithmetic_ops={list(ops)}: choose from {', '.join(OPS)}")
    total = num_problems(max_operand, ops)
    if num_val >= total:
        raise ValueError(f"data.num_val={num_val}: only {total} arithmetic problems exist with "
                         f"data.arithmetic_max_operand={max_operand} and ops {''.join(ops)} (none left to train on)")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    val = [problem_at(i, max_operand, ops) for i in order[:num_val]]
    train = [problem_at(i, max_operand, ops) for i in order[num_val : num_val + num_train]]
    return train, val


EOS_TEXTS = ("<eos>",)


def verify(response_text: str, answer: str) -> float:
    """1.0 when the response's first line (cut at an end-of-sequence marker if one was decoded) equals the
    answer exactly, surrounding spaces ignored; else 0.0. "19", " 19\\n..." score 1; "190", "19 0", "" score 0."""
    text = response_text
    for eos in EOS_TEXTS:
        text = text.split(eos, 1)[0]
    first = text.split("\n", 1)[0].strip()
    return 1.0 if first == answer.strip() else 0.0


arithmetic_reward = verify  # the name the reward registry uses
