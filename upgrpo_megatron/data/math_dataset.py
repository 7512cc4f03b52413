"""Math datasets in verl's layout (jsonl or parquet) and their graders.

Each row: `prompt` — a string or a chat list [{"role": "user", "content": ...}] — and the ground truth at
`reward_model.ground_truth` (keys configurable as dotted paths). A malformed row is reported with file and
line (`DatasetError`), or skipped and counted when `data.skip_malformed_rows` is true.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, List, Tuple

from upgrpo_megatron.errors import UpgrpoError


class DatasetError(UpgrpoError, ValueError):
    """The dataset cannot be read as asked; the message names the file and row."""


def _dig(row: dict, dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return "\n".join(str(m["content"]) for m in value)
    raise TypeError("expected a string or a list of {role, content} messages")


def _rows(path: Path):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors vary by version
            raise DatasetError(f"{path}: not a readable parquet file ({e})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row, None
        return
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError as e:
                yield i, None, f"invalid JSON ({e.msg})"


def load_math_rows(files: List[str], prompt_key: str, answer_key: str, skip_malformed: bool) -> Tuple[list, int]:
    """[(prompt_text, ground_truth)] from all files, and how many malformed rows were skipped."""
    if not files:
        raise DatasetError("data.train_files is empty")
    out, skipped = [], 0
    for name in files:
        path = Path(name)
        if not path.exists():
            raise DatasetError(f"{path}: no such dataset file")
        n_before = len(out)
        for line, row, err in _rows(path):
            problem = err
            if problem is None:
                try:
                    prompt = _prompt_text(_dig(row, prompt_key))
                    answer = str(_dig(row, answer_key))
                except KeyError as k:
                    problem = f"missing '{k.args[0]}'"
                except TypeError as t:
                    problem = f"'{prompt_key}': {t}"
            if problem is not None:
                if not skip_malformed:
                    raise DatasetError(f"{path} line {line}: {problem} (set data.skip_malformed_rows=true to skip such rows)")
                skipped += 1
                continue
            out.append((prompt, answer))
        if len(out) == n_before and not skipped:
            raise DatasetError(f"{path}: the file has no rows")
    if not out:
        raise DatasetError(f"{', '.join(files)}: no usable rows ({skipped} malformed)")
    return out, skipped


def math_verify_reward(response: str, ground_truth: str) -> float:
    """1.0 when `math-verify` finds the response's answer equal to the ground truth."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise DatasetError("data.reward=math_verify needs the 'math-verify' package: pip install 'upgrpo_megatron[math]'") from None
    try:
        gold = parse(f"${ground_truth}$")
        pred = parse(response)
        return 1.0 if verify(gold, pred) else 0.0
    except Exception:  # unparsable answers score 0, they must not stop training
        return 0.0


_ANSWER_RE = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)


def dapo_answer_reward(response: str, ground_truth: str) -> float:
    """DAPO's reward: +1 when the last 'Answer:' line matches the ground truth, else -1."""
    matches = _ANSWER_RE.findall(response)
    if not matches:
        return -1.0
    pred = matches[-1].strip().rstrip(".").replace(" ", "")
    gold = str(ground_truth).strip().replace(" ", "")
    return 1.0 if pred == gold else -1.0
