"""Math datasets in verl's layout (jsonl or parquet) and their graders.

Each row: `prompt` — a string or a chat list [{"role": "user", "content": ...}] — the ground truth at
`reward_model.ground_truth`, and optionally `data_source` (keys configurable as dotted paths). A malformed
row is a `DatasetError` naming file and line (jsonl) or row (parquet), or is skipped and counted when
`data.skip_malformed_rows` is true.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple, Union

from upgrpo_megatron.data.errors import DatasetError

Prompt = Union[str, List[dict]]


class MathRow(NamedTuple):
    prompt: Prompt         # the text, or the chat messages as stored
    answer: str            # the ground truth, as a string
    data_source: str = ""  # verl's per-row source name (for per-source validation metrics)


def _dig(row: dict, dotted: str) -> Any:
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            raise KeyError(dotted)
        node = node[part]
    return node


def _check_prompt(value: Any) -> Prompt:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise TypeError("expected a non-empty string or a list of {role, content} messages")


def prompt_text(prompt: Prompt) -> str:
    """Plain text of a prompt (chat messages joined by newlines) for logs and tokenizers without a template."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _rows(path: Path) -> Iterator[Tuple[str, Optional[dict], Optional[str]]]:
    """(where, row, problem) for every row: where is 'line N' (jsonl) or 'row N' (parquet, 1-based)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's error classes vary by version; all mean "not readable"
            raise DatasetError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"row {i}", row, None
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"{path}: unsupported dataset format (use .jsonl or .parquet)")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {i}", None, f"invalid JSON ({e.msg})"
                continue
            yield f"line {i}", row, None if isinstance(row, dict) else "expected a JSON object"


def load_math_rows(files: List[str], prompt_key: str = "prompt", answer_key: str = "reward_model.ground_truth",
                   skip_malformed: bool = False, source_key: str = "data_source") -> Tuple[List[MathRow], int]:
    """All rows of all files, and how many malformed rows were skipped."""
    if not files:
        raise DatasetError("no dataset files given (data.train_files / data.val_files)")
    out: List[MathRow] = []
    skipped = 0
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise DatasetError(f"{path}: no such dataset file")
        seen = 0
        for where, row, problem in _rows(path):
            seen += 1
            if problem is None:
                try:
                    prompt = _check_prompt(_dig(row, prompt_key))
                    answer = _dig(row, answer_key)
                    if isinstance(answer, (list, dict)):
                        raise TypeError(f"'{answer_key}': expected a string or number, got {type(answer).__name__}")
                    source = row.get(source_key, "") if isinstance(row.get(source_key, ""), str) else ""
                except KeyError as k:
                    problem = f"missing '{k.args[0]}'"
                except TypeError as t:
                    problem = str(t) if str(t).startswith("'") else f"'{prompt_key}': {t}"
            if problem is not None:
                if not skip_malformed:
                    raise DatasetError(f"{path} {where}: {problem} "
                                       "(set data.skip_malformed_rows=true to skip such rows)")
                skipped += 1
                continue
            out.append(MathRow(prompt, str(answer).strip(), source))
        if seen == 0:
            raise DatasetError(f"{path}: the file has no rows")
    if not out:
        raise DatasetError(f"{', '.join(files)}: no usable rows ({skipped} malformed)")
    return out, skipped


# ----------------------------------------------------------------------------------------------- graders
def math_verify_reward(response: str, ground_truth: str) -> float:
    """1.0 when `math-verify` finds the response's final answer equal to the ground truth, else 0.0."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise DatasetError("data.reward=math_verify needs the 'math-verify' package: "
                           "pip install 'upgrpo_megatron[math]'") from None
    try:
        gold = parse(ground_truth if "$" in ground_truth or "\\boxed" in ground_truth else f"${ground_truth}$")
        pred = parse(response)
        return 1.0 if pred and verify(gold, pred) else 0.0
    except Exception:  # an unparsable answer scores 0; it must not stop training
        return 0.0


# DAPO's grader (verl `verl/utils/reward_score/math_dapo.py`, `compute_score` with strict_box_verify=False):
# look at the last 300 characters, take the last "Answer: ..." line, normalise it and the ground truth the
# Minerva way, compare as strings; +1 when equal, -1 otherwise (also when there is no Answer line).
_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_TAIL_CHARS = 300
# textual noise removed before comparing (units, "a"/"an", TeX spacing and wrappers)
_REPLACE = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
            (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_UNITS = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
          "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
          "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
          "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
          ",\\!", "{,}", '"', "\\dots"]


def normalize_final_answer(answer: str) -> str:
    """Minerva-style normalisation used by DAPO's grader: '\\boxed{1,000} dollars' -> '1000'."""
    s = answer.split("=")[-1]
    for before, after in _REPLACE:
        s = s.replace(before, after)
    for unit in _UNITS:
        s = s.replace(unit, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", s)          # keep only the first $...$ span
    for wrapper in ("text", "textbf", "overline"):
        s = re.sub(r"(\\" + wrapper + r"\{)(.*?)(\})", r"\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", s)
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)          # \frac12 -> \frac{1}{2}
    s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)                  # \sqrt2 -> \sqrt{2}
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def dapo_answer_reward(response: str, ground_truth: str) -> float:
    """DAPO's reward: +1.0 when the last 'Answer:' line (within the last 300 characters) matches the ground
    truth after normalisation, else -1.0."""
    matches = _ANSWER_RE.findall(response[-_TAIL_CHARS:])
    if not matches:
        return -1.0
    return 1.0 if normalize_final_answer(matches[-1]) == normalize_final_answer(str(ground_truth)) else -1.0
