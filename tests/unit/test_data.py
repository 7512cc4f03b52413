"""Tasks, tokenizer, datasets and rewards."""
import json

import pytest

from upgrpo_megatron.config import load_recipe
from upgrpo_megatron.data import DatasetError, build_task
from upgrpo_megatron.data.arithmetic import arithmetic_reward, split_problems
from upgrpo_megatron.data.math_dataset import dapo_answer_reward, load_math_rows, math_verify_reward
from upgrpo_megatron.data.tokenizer import build_char_tokenizer, load_tokenizer
from tests.unit.test_config import RECIPE


def test_char_tokenizer_round_trips_through_hf_format(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    ids = again.encode("12+7=", add_special_tokens=False)
    assert len(ids) == 5 and again.decode(ids) == "12+7=" and len(again) == 32
    assert again.decode(ids + [again.eos_token_id], skip_special_tokens=True) == "12+7="


def test_arithmetic_splits_are_disjoint_and_deterministic():
    train, val = split_problems(20, 4096, 128, seed=3)
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert split_problems(20, 4096, 128, seed=3) == (train, val)
    assert len(val) == 128 and len(train) == 21 * 21 * 2 - 128


def test_arithmetic_reward_is_exact_match():
    assert arithmetic_reward("19", "19") == 1.0 and arithmetic_reward(" 19 ", "19") == 1.0
    assert arithmetic_reward("190", "19") == 0.0 and arithmetic_reward("", "0") == 0.0


def test_train_stream_resumes_exactly():
    cfg = load_recipe(RECIPE)
    a = build_task(cfg)
    a.next_train_prompts(700)
    state = a.state_dict()
    expected = [p.text for p in a.next_train_prompts(100)]  # crosses an epoch boundary (754 problems)
    b = build_task(cfg)
    b.load_state_dict(state)
    assert [p.text for p in b.next_train_prompts(100)] == expected


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_malformed_rows_are_reported_with_file_and_line_or_skipped(tmp_path):
    f = tmp_path / "train.jsonl"
    good = {"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}}
    _write_jsonl(f, [good, {"prompt": "x"}, "{not json", good])
    with pytest.raises(DatasetError, match=r"train.jsonl line 2: missing 'reward_model.ground_truth'"):
        load_math_rows([str(f)], "prompt", "reward_model.ground_truth", skip_malformed=False)
    rows, skipped = load_math_rows([str(f)], "prompt", "reward_model.ground_truth", skip_malformed=True)
    assert rows == [("1+1?", "2"), ("1+1?", "2")] and skipped == 2


def test_parquet_rows_and_missing_or_empty_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "reward_model": {"ground_truth": "4"}}]), f)
    assert load_math_rows([str(f)], "prompt", "reward_model.ground_truth", False)[0] == [("2+2?", "4")]
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_math_rows([str(tmp_path / "nope.jsonl")], "prompt", "reward_model.ground_truth", False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="no rows"):
        load_math_rows([str(empty)], "prompt", "reward_model.ground_truth", False)


def test_math_rewards():
    assert math_verify_reward("The answer is $\\frac{1}{2}$", "0.5") == 1.0
    assert math_verify_reward("The answer is 3", "4") == 0.0
    assert dapo_answer_reward("work...\nAnswer: 42", "42") == 1.0
    assert dapo_answer_reward("Answer: 41", "42") == -1.0 and dapo_answer_reward("no answer", "42") == -1.0
