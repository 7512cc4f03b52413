"""Tasks, tokenizer, datasets, prompt stream and rewards."""
import json

import pytest

from tests.unit.config.test_config import RECIPE
from upgrpo_megatron.config import load_recipe
from upgrpo_megatron.data import DatasetError, PromptDataset, PromptItem, build_task, get_reward
from upgrpo_megatron.data.arithmetic import num_problems, split_problems, verify
from upgrpo_megatron.data.math_dataset import (
    MathRow,
    dapo_answer_reward,
    load_math_rows,
    math_verify_reward,
    normalize_final_answer,
)
from upgrpo_megatron.data.tokenizer import MIN_VOCAB_SIZE, build_char_tokenizer, load_tokenizer

GT = "reward_model.ground_truth"


# ----------------------------------------------------------------------------------------------- tokenizer
def test_char_tokenizer_round_trips_through_hf_format(tmp_path):
    tok = build_char_tokenizer(32)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    again = load_tokenizer(tmp_path)
    text = "Q: 12+7=\nA: 19"
    ids = again.encode(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False) and len(ids) == len(text)
    assert again.decode(ids) == text and len(again) == 32
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    assert again.decode(ids + [again.eos_token_id, 31], skip_special_tokens=True) == text


def test_char_tokenizer_has_exactly_the_model_vocab_and_maps_unknown_chars_to_unk():
    tok = build_char_tokenizer(48)
    assert len(tok) == 48 and tok.convert_ids_to_tokens(47) == f"<reserved_{47 - MIN_VOCAB_SIZE}>"
    assert tok.encode("x", add_special_tokens=False) == [tok.unk_token_id]
    with pytest.raises(ValueError, match=f"vocab_size=8.*at least {MIN_VOCAB_SIZE}"):
        build_char_tokenizer(8)


def test_load_tokenizer_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(ValueError, match="nope does not exist"):
        load_tokenizer(tmp_path / "nope")


# ----------------------------------------------------------------------------------------------- arithmetic
def test_arithmetic_splits_are_disjoint_deterministic_and_seed_dependent():
    train, val = split_problems(20, 4096, 128, seed=3)
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert split_problems(20, 4096, 128, seed=3) == (train, val)
    assert split_problems(20, 4096, 128, seed=4)[1] != val
    assert len(val) == 128 and len(train) == 21 * 21 * 2 - 128 == num_problems(20) - 128
    assert len({p.prompt for p in train}) == len(train)


def test_arithmetic_problems_are_correct_for_every_operator():
    train, val = split_problems(12, 10_000, 10, seed=0, ops=["+", "-", "*"])
    assert {p.prompt[-1] for p in train} == {"="} and len(train) + len(val) == 3 * 13 * 13
    for p in train + val:
        a, op, b = next((p.prompt[:i], p.prompt[i], p.prompt[i + 1:-1])
                        for i in range(1, len(p.prompt)) if p.prompt[i] in "+-*")
        assert int(p.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_arithmetic_refuses_a_val_split_that_leaves_nothing_to_train():
    with pytest.raises(ValueError, match="num_val=200.*only 200"):
        split_problems(9, 10, 200, seed=0)


@pytest.mark.parametrize("response, answer, reward", [
    ("19", "19", 1.0), (" 19 ", "19", 1.0), ("19\n7+1=8", "19", 1.0), ("19<eos>junk", "19", 1.0),
    ("-3", "-3", 1.0), ("190", "19", 0.0), ("1 9", "19", 0.0), ("", "0", 0.0), ("\n19", "19", 0.0),
    ("3", "-3", 0.0),
])
def test_arithmetic_verifier_is_exact_match_of_the_first_line(response, answer, reward):
    assert verify(response, answer) == reward


def test_arithmetic_task_builds_with_the_model_vocab_and_answers_tokenize():
    cfg = load_recipe(RECIPE)
    task = build_task(cfg)
    assert len(task.tokenizer) == cfg.model.vocab_size
    item = task.val_prompts()[0]
    assert task.tokenizer.decode(item.prompt_ids) == item.text and item.text.endswith("=")
    assert task.tokenizer.decode(item.answer_ids) == item.answer
    assert task.reward(item.answer, item.answer) == 1.0 and task.accuracy("?", item.answer) == 0.0
    assert not {p.text for p in task.sft_examples()} & {p.text for p in task.val_prompts()}


def test_arithmetic_prompt_longer_than_the_limit_is_an_error_or_dropped():
    cfg = load_recipe(RECIPE, ["data.arithmetic_max_operand=99", "data.max_prompt_length=5"])
    with pytest.raises(DatasetError, match="tokens, more than data.max_prompt_length=5"):
        build_task(cfg)
    cfg.data.filter_overlong_prompts = True
    task = build_task(cfg)
    assert task.dropped_overlong > 0 and all(len(p.prompt_ids) <= 5 for p in task.sft_examples())


# ----------------------------------------------------------------------------------------------- prompt stream
def _items(n):
    return [PromptItem([i], str(i), f"p{i}", [i], index=i) for i in range(n)]


def test_prompt_stream_covers_each_epoch_once_and_reshuffles():
    ds = PromptDataset(_items(10), seed=5)
    e0, e1 = ds.next_batch(10), ds.next_batch(10)
    assert sorted(p.index for p in e0) == list(range(10)) == sorted(p.index for p in e1)
    assert [p.index for p in e0] != [p.index for p in e1] and ds.state_dict()["epoch"] == 1


def test_prompt_stream_resumes_exactly_across_an_epoch_boundary():
    a = PromptDataset(_items(37), seed=11)
    a.next_batch(30)
    state = a.state_dict()
    expected = [p.index for p in a.next_batch(50)]   # crosses two epoch boundaries
    b = PromptDataset(_items(37), seed=11)
    b.load_state_dict(dict(state))
    assert [p.index for p in b.next_batch(50)] == expected


def test_prompt_stream_refuses_a_position_saved_for_other_data():
    a = PromptDataset(_items(10), seed=1)
    with pytest.raises(DatasetError, match="over 12 prompts, this dataset has 10"):
        a.load_state_dict({"epoch": 0, "offset": 3, "seed": 1, "size": 12})


def test_task_stream_resumes_exactly():
    cfg = load_recipe(RECIPE)
    a = build_task(cfg)
    a.next_train_prompts(150)
    state = a.state_dict()
    expected = [p.text for p in a.next_train_prompts(20)]  # crosses the epoch boundary (160 problems)
    b = build_task(cfg)
    b.load_state_dict(state)
    assert [p.text for p in b.next_train_prompts(20)] == expected


# ----------------------------------------------------------------------------------------------- math datasets
GOOD = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "1+1?"}],
        "reward_model": {"ground_truth": "2"}}


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_malformed_jsonl_rows_are_reported_with_file_and_line_or_skipped(tmp_path):
    f = tmp_path / "train.jsonl"
    _write_jsonl(f, [GOOD, {"prompt": "x"}, "{not json", GOOD, {"prompt": 5, "reward_model": {"ground_truth": "1"}}])
    with pytest.raises(DatasetError, match=r"train.jsonl line 2: missing 'reward_model.ground_truth'"):
        load_math_rows([str(f)], "prompt", GT, skip_malformed=False)
    rows, skipped = load_math_rows([str(f)], "prompt", GT, skip_malformed=True)
    assert skipped == 3 and rows == [MathRow(GOOD["prompt"], "2", "math_dapo")] * 2


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: invalid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
    (json.dumps({"prompt": 5, "reward_model": {"ground_truth": "1"}}), "line 2: 'prompt': expected a non-empty string"),
    (json.dumps({"prompt": [{"text": "hi"}], "reward_model": {"ground_truth": "1"}}), "line 2: 'prompt'"),
    (json.dumps({"prompt": "x", "reward_model": {"ground_truth": None}}),
     "line 2: missing 'reward_model.ground_truth'"),
    (json.dumps({"prompt": "x", "reward_model": {"ground_truth": [1]}}),
     "line 2: 'reward_model.ground_truth': expected"),
])
def test_each_kind_of_malformed_row_names_its_problem(tmp_path, bad, message):
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [GOOD, bad])
    with pytest.raises(DatasetError, match=message) as e:
        load_math_rows([str(f)], "prompt", GT)
    assert "\n" not in str(e.value)


def test_parquet_rows_with_chat_prompts_and_malformed_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "train.parquet"
    rows = [GOOD,
            {"data_source": "x", "prompt": [{"role": "user", "content": "2+2?"}],
             "reward_model": {"ground_truth": None}},
            {"data_source": "aime", "prompt": [{"role": "user", "content": "3+3?"}],
             "reward_model": {"ground_truth": "6"}}]
    pq.write_table(pa.Table.from_pylist(rows), f)
    with pytest.raises(DatasetError, match=r"train.parquet row 2: missing 'reward_model.ground_truth'"):
        load_math_rows([str(f)], "prompt", GT)
    got, skipped = load_math_rows([str(f)], "prompt", GT, skip_malformed=True)
    assert skipped == 1 and [(r.answer, r.data_source) for r in got] == [("2", "math_dapo"), ("6", "aime")]
    assert got[1].prompt == [{"role": "user", "content": "3+3?"}]


def test_custom_keys_and_numeric_answers(tmp_path):
    f = tmp_path / "d.jsonl"
    _write_jsonl(f, [{"question": "6*7?", "answer": 42}])
    rows, _ = load_math_rows([str(f)], "question", "answer")
    assert rows == [MathRow("6*7?", "42", "")]


def test_missing_empty_unreadable_and_unsupported_files(tmp_path):
    with pytest.raises(DatasetError, match="nope.jsonl: no such dataset file"):
        load_math_rows([str(tmp_path / "nope.jsonl")], "prompt", GT)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl: the file has no rows"):
        load_math_rows([str(empty)], "prompt", GT)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="broken.parquet: not a readable parquet file"):
        load_math_rows([str(broken)], "prompt", GT)
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(DatasetError, match="unsupported dataset format"):
        load_math_rows([str(csv)], "prompt", GT)
    with pytest.raises(DatasetError, match="no dataset files"):
        load_math_rows([], "prompt", GT)


def test_an_empty_file_after_a_file_with_skipped_rows_is_still_reported(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_jsonl(a, [GOOD, "{bad"])
    b.write_text("")
    with pytest.raises(DatasetError, match="b.jsonl: the file has no rows"):
        load_math_rows([str(a), str(b)], "prompt", GT, skip_malformed=True)


def test_math_task_uses_the_tokenizer_chat_template(tmp_path):
    tok = build_char_tokenizer(32)
    tok.chat_template = ("{% for m in messages %}Q:{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}A:{% endif %}")
    tok.save_pretrained(tmp_path / "tok")
    f = tmp_path / "train.jsonl"
    _write_jsonl(f, [{"prompt": [{"role": "user", "content": "1+2="}], "reward_model": {"ground_truth": "3"}},
                     {"prompt": "4+4=", "reward_model": {"ground_truth": "8"}}])
    cfg = load_recipe(RECIPE, ["data.task=math", f"data.train_files=[{f}]", f"data.tokenizer_path={tmp_path / 'tok'}",
                               "data.reward=dapo_answer", f"data.answer_key={GT}"])
    task = build_task(cfg)
    texts = sorted(p.text for p in task.sft_examples())
    assert texts == ["4+4=", "Q:1+2=\nA:"]
    assert task.reward("Answer: 3", "3") == 1.0 and task.accuracy("Answer: 4", "3") == 0.0


def test_math_task_without_a_tokenizer_is_refused():
    cfg = load_recipe(RECIPE, ["data.task=math", "data.train_files=[x.jsonl]"])
    with pytest.raises(DatasetError, match="needs a tokenizer"):
        build_task(cfg)


# ----------------------------------------------------------------------------------------------- rewards
@pytest.mark.parametrize("response, truth, reward", [
    ("The answer is $\\frac{1}{2}$", "0.5", 1.0),
    ("so the result is \\boxed{42}.", "42", 1.0),
    ("The answer is 3", "4", 0.0),
    ("no number here", "4", 0.0),
])
def test_math_verify_reward(response, truth, reward):
    assert math_verify_reward(response, truth) == reward


@pytest.mark.parametrize("response, truth, reward", [
    ("work...\nAnswer: 42", "42", 1.0),
    ("Answer: $\\boxed{1,000}$", "1000", 1.0),
    ("answer : x = 7 degrees", "7", 1.0),
    ("Answer: 1\n... more work\nAnswer: 2", "2", 1.0),   # the last Answer line counts
    ("Answer: 41", "42", -1.0),
    ("the result is 42", "42", -1.0),                     # no Answer line
    ("Answer: 42" + "x" * 400, "42", -1.0),               # outside the last 300 characters
])
def test_dapo_answer_reward_is_plus_or_minus_one(response, truth, reward):
    assert dapo_answer_reward(response, truth) == reward


def test_normalize_final_answer_strips_units_tex_and_thousands_separators():
    assert normalize_final_answer("\\text{5 dollars}") == "5"
    assert normalize_final_answer("\\frac12") == "\\frac{1}{2}"
    assert normalize_final_answer("12,345") == "12345"


def test_reward_registry_resolves_names_and_refuses_unknown_ones():
    assert get_reward("auto", "arithmetic")("7", "7") == 1.0
    assert get_reward("dapo_answer")("Answer: 7", "7") == 1.0
    with pytest.raises(ValueError, match="data.reward='bleu': unknown reward"):
        get_reward("bleu")
