"""Bad input, as users give it: each case ends with exactly one `error:` line that names the setting, file or
row, a non-zero exit (2), no traceback, and nothing overwritten — an existing run directory handed to every
case keeps every byte.

Cases marked `dry` are caught by `--dry-run` (recipe validation); the others run the real trainer start-up
(plain `python tools/train_moe.py`, a world of one) up to the point where the input is refused.
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.worker_convert import make_tiny_hf

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "qwen_moe.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", UPGRPO_NO_PROGRESS="1")


def cli(*args, tool="train_moe.py"):
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def snapshot(d: Path) -> dict:
    """Every file's bytes (the run-dir lock a trainer takes while it checks its input is not data)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: an existing run (results, no checkpoint: resume=auto refuses it, resume=fresh would move it
    aside — but only once every input has checked out), data files."""
    d = tmp_path_factory.mktemp("bad_input")
    run = d / "precious_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "val/acc": 0.5}\n{"step": 1, "val/acc": 0.6}\n')
    (run / "config.yaml").write_text("model: {hidden_size: 128}\n")
    (run / "notes.txt").write_text("three days of work\n")
    from upgrpo_megatron.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(32)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(d / "tok")
    (d / "empty.jsonl").write_text("")
    good = {"prompt": [{"role": "user", "content": "1+1"}], "reward_model": {"ground_truth": "2"}}
    (d / "bad_rows.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n")
    (d / "no_answer.jsonl").write_text(json.dumps({"prompt": "1+1"}) + "\n")
    (d / "recipe_syntax.yaml").write_text("inherit: " + str(RECIPE) + "\nactor: {lr: [1e-3\n")
    (d / "recipe_type.yaml").write_text("inherit: " + str(RECIPE) + "\nrollout:\n  n: eight\n")
    # an HF model of another shape, and a Megatron checkpoint converted from it
    other = d / "other_hf"
    make_tiny_hf("qwen3_moe", other)
    (d / "corrupt_hf").mkdir()
    for f in other.iterdir():
        (d / "corrupt_hf" / f.name).write_bytes(f.read_bytes())
    st = d / "corrupt_hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 3])
    proc = cli("--hf", other, "--out", d / "other_ckpt", tool="convert_hf_to_megatron.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


# (id, args (WS = the workspace, RUN = the existing run), expected text in the error line, dry)
CASES = [
    ("unknown_key", ["actor.lrr=1"], "unknown key 'actor.lrr'", True),
    ("unknown_key_suggestion", ["rollout.temprature=0.5"], "did you mean 'rollout.temperature'", True),
    ("wrong_type_override", ["actor.lr=fast"], "actor.lr in override 'actor.lr=fast': expected a number", True),
    ("wrong_type_in_file", ["@WS/recipe_type.yaml"], "rollout.n", True),
    ("yaml_syntax", ["@WS/recipe_syntax.yaml"], "recipe_syntax.yaml", True),
    ("override_without_value", ["actor.lr"], "expected dotted.key=value", True),
    ("negative_size", ["trainer.prompts_per_step=-4"], "trainer.prompts_per_step=-4", True),
    ("zero_size", ["rollout.n=0"], "rollout.n=0", True),
    ("world_not_divisible", ["parallel.tp=3", "--world-size", "4"], "parallel.tp=3", True),
    ("experts_not_divisible_by_ep", ["parallel.ep=3", "--world-size", "3"], "model.num_experts=8", True),
    ("heads_not_divisible_by_tp", ["parallel.tp=8", "--world-size", "8"], "model.num_attention_heads=4", True),
    ("vocab_not_divisible_by_tp", ["model.vocab_size=33", "parallel.tp=2", "--world-size", "2"],
     "model.vocab_size=33", True),
    ("head_dim_cpu_engine", ["model.head_dim=32"], "model.head_dim=32", False),
    ("missing_dataset", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/nope.jsonl]", "data.val_files=[@WS/nope.jsonl]"],
     "nope.jsonl", False),
    ("empty_dataset", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/empty.jsonl]", "data.val_files=[@WS/empty.jsonl]"],
     "empty.jsonl", False),
    ("malformed_row", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/bad_rows.jsonl]",
                       "data.val_files=[@WS/bad_rows.jsonl]"], "bad_rows.jsonl line 3", False),
    ("row_without_answer", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/no_answer.jsonl]",
                            "data.val_files=[@WS/no_answer.jsonl]"], "no_answer.jsonl line 1", False),
    ("checkpoint_of_another_model", ["trainer.resume=@WS/other_ckpt"], "is for another model", False),
    ("corrupt_safetensors", ["model.hf_path=@WS/corrupt_hf"], "model.safetensors", False),
    ("run_dir_exists_without_resume", ["trainer.resume=never"], "already exists", False),
    ("results_without_checkpoint", ["trainer.resume=auto"], "holds results (RL-step metrics", False),
    ("run_dir_not_writable", ["trainer.run_dir=/proc/upgrpo_run"], "trainer.run_dir=/proc/upgrpo_run is not writable",
     False),
    ("missing_resume_path", ["trainer.resume=@WS/no_such_ckpt"], "no_such_ckpt", False),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, args, message, dry", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_exit_2_and_nothing_is_overwritten(ws, case, args, message, dry):
    run = ws / "precious_run"
    before = snapshot(ws)
    args = [a.replace("@WS", str(ws)) for a in args]
    recipe = next((a for a in args if a.endswith(".yaml")), str(RECIPE))
    args = [a for a in args if a != recipe]
    if not any(a.startswith("trainer.run_dir=") for a in args):
        args.append(f"trainer.run_dir={run}")
    if not any(a.startswith("trainer.resume=") for a in args):
        args.append("trainer.resume=fresh")  # the refusal must come from the input, not from the run dir
    proc = cli(recipe, *args, *(["--dry-run"] if dry else []))
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1 and message in err[0], (err, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert snapshot(ws) == before  # nothing written, nothing overwritten (the run dir included)
    assert not Path("/proc/upgrpo_run").exists()


@pytest.mark.slow
def test_debug_shows_the_traceback(ws):
    proc = cli(RECIPE, "model.head_dim=32", f"trainer.run_dir={ws / 'precious_run'}", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "model.head_dim=32" in proc.stderr


@pytest.mark.slow
def test_a_run_directory_in_use_by_another_trainer_is_refused(ws):
    import fcntl

    run = ws / "busy_run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    with open(run / ".lock", "a+") as held:  # what a live trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        proc = cli(RECIPE, f"trainer.run_dir={run}")
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "is in use by pid 4242 on node7" in err[0]
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n'
