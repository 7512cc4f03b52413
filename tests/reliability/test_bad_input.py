"""Bad input, as users give it: each case ends with exactly one `error:` line that names the setting, file or
row, a non-zero exit (2), no traceback, and nothing overwritten — an existing run directory handed to every
case keeps every byte.

Cases marked `dry` are caught by `--dry-run` (recipe validation); the others run the real trainer start-up
(plain `python tools/train_moe.py`, a world of one) up to the point where the input is refused.
"""
import hashlib
import json
import os
import shutil
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


def snapshot(d: Path, dirs: bool = False) -> dict:
    """Every file's bytes (the run-dir lock a trainer takes while it checks its input is not data), and with
    `dirs` every folder (a tool must not even create its output directory when it refuses the input)."""
    out = {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
           if p.is_file() and p.name != ".lock"}
    if dirs:
        out.update({str(p.relative_to(d)): "dir" for p in d.rglob("*") if p.is_dir()})
    return out


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
    _tool_inputs(d)
    return d


def _tool_inputs(d: Path) -> None:
    """Inputs the four tools are handed wrongly: latin-1 bytes where UTF-8 text goes, a directory where a
    file goes (file-where-a-directory-goes uses precious_run/notes.txt)."""
    shutil.copytree(d / "other_hf", d / "latin1_hf")
    text = json.dumps(json.loads((d / "other_hf" / "config.json").read_text()), indent=2)
    text = text.replace("{\n", '{\n  "_name_or_path": "caf\u00e9",\n', 1)  # line 2, written in latin-1
    (d / "latin1_hf" / "config.json").write_bytes(text.encode("latin-1"))
    shutil.copytree(d / "other_hf", d / "config_dir_hf")
    (d / "config_dir_hf" / "config.json").unlink()
    (d / "config_dir_hf" / "config.json").mkdir()
    shutil.copytree(d / "other_ckpt", d / "latin1_ckpt")
    marker = d / "latin1_ckpt" / "COMPLETE"  # JSON checksums, read before anything else of a checkpoint
    lines = marker.read_bytes().split(b"\n")
    marker.write_bytes(b"\n".join(lines[:2] + [lines[2] + b" \xe9"] + lines[3:]))  # line 3
    (d / "latin1_run").mkdir()
    rows = '{"step": 0}\n{"step": 1, "note": "caf\u00e9"}\n'
    (d / "latin1_run" / "metrics.jsonl").write_bytes(rows.encode("latin-1"))


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
    ("missing_dataset", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/nope.jsonl]",
                         "data.val_files=[@WS/nope.jsonl]"],
     "nope.jsonl", False),
    ("empty_dataset", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/empty.jsonl]",
                       "data.val_files=[@WS/empty.jsonl]"],
     "empty.jsonl", False),
    ("malformed_row", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/bad_rows.jsonl]",
                       "data.val_files=[@WS/bad_rows.jsonl]"], "bad_rows.jsonl line 3", False),
    ("row_without_answer", ["data.task=math", "data.tokenizer_path=@WS/tok", "data.train_files=[@WS/no_answer.jsonl]",
                            "data.val_files=[@WS/no_answer.jsonl]"], "no_answer.jsonl line 1", False),
    ("checkpoint_of_another_model", ["trainer.resume=@WS/other_ckpt", "trainer.run_dir=@WS/empty_run"],
     "is for another model", False),
    ("resume_another_runs_checkpoint_into_a_run", ["trainer.resume=@WS/other_ckpt"], "holds a run of its own",
     False),
    ("corrupt_safetensors", ["model.hf_path=@WS/corrupt_hf"], "model.safetensors", False),
    # every architecture field is compared, not only the shapes (a top-k that differs would load silently)
    ("hf_model_of_another_architecture", ["model.hf_path=@WS/other_hf"],
     "other_hf/config.json: vocab_size=96 does not match the recipe's model.vocab_size=32", False),
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
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1 and message in err[0], (err, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    assert snapshot(ws) == before  # nothing written, nothing overwritten (the run dir included)
    assert not Path("/proc/upgrpo_run").exists()


# the four tools: (id, tool, args (@WS = the workspace), expected text in the error line)
TOOL_CASES = [
    ("hf_config_not_utf8", "convert_hf_to_megatron.py", ["--hf", "@WS/latin1_hf", "--out", "@WS/new"],
     "latin1_hf/config.json line 2: not UTF-8 text (byte 0xe9)"),
    ("hf_config_is_a_directory", "convert_hf_to_megatron.py", ["--hf", "@WS/config_dir_hf", "--out", "@WS/new"],
     "config_dir_hf/config.json is a directory, expected a file"),
    ("hf_is_a_file", "convert_hf_to_megatron.py", ["--hf", "@WS/precious_run/notes.txt", "--out", "@WS/new"],
     "--hf @WS/precious_run/notes.txt is a file, expected a directory"),
    ("import_out_is_a_file", "convert_hf_to_megatron.py",
     ["--hf", "@WS/other_hf", "--out", "@WS/precious_run/notes.txt"],
     "--out @WS/precious_run/notes.txt exists and is a file, expected a directory"),
    ("tp_zero", "convert_hf_to_megatron.py", ["--hf", "@WS/other_hf", "--out", "@WS/new", "--tp", "0"],
     "--tp 0: must be greater than 0"),
    ("ep_zero", "convert_hf_to_megatron.py", ["--hf", "@WS/other_hf", "--out", "@WS/new", "--ep", "0"],
     "--ep 0: must be greater than 0"),
    ("ep_negative", "convert_hf_to_megatron.py", ["--hf", "@WS/other_hf", "--out", "@WS/new", "--ep", "-2"],
     "--ep -2: must be greater than 0"),
    ("checkpoint_is_a_file", "convert_megatron_to_hf.py",
     ["--checkpoint", "@WS/precious_run/notes.txt", "--out", "@WS/new"],
     "--checkpoint @WS/precious_run/notes.txt is a file, expected a directory"),
    ("checkpoint_marker_not_utf8", "convert_megatron_to_hf.py", ["--checkpoint", "@WS/latin1_ckpt", "--out", "@WS/new"],
     "latin1_ckpt/COMPLETE line 3: not UTF-8 text (byte 0xe9)"),
    ("export_out_is_a_file", "convert_megatron_to_hf.py", ["--checkpoint", "@WS/other_ckpt", "--out", "@WS/notes_out"],
     "--out @WS/notes_out exists and is a file"),
    ("export_shard_size_zero", "convert_megatron_to_hf.py",
     ["--checkpoint", "@WS/other_ckpt", "--out", "@WS/new", "--max-shard-gb", "0"], "--max-shard-gb 0.0: must be"),
    ("report_run_is_a_file", "routing_report.py", ["@WS/precious_run/notes.txt"],
     "RUN_DIR @WS/precious_run/notes.txt is a file, expected a run directory"),
    ("report_metrics_not_utf8", "routing_report.py", ["@WS/latin1_run", "--out", "@WS/new"],
     "latin1_run/metrics.jsonl line 2: not UTF-8 text (byte 0xe9)"),
    ("report_out_is_a_file", "routing_report.py", ["@WS/precious_run", "--out", "@WS/notes_out"],
     "--out @WS/notes_out exists and is a file"),
    ("compare_run_is_a_file", "compare_runs.py", ["@WS/precious_run", "@WS/precious_run/notes.txt", "--out", "@WS/new"],
     "RUN_DIR @WS/precious_run/notes.txt is a file, expected a run directory"),
    ("compare_metrics_not_utf8", "compare_runs.py", ["@WS/precious_run", "@WS/latin1_run", "--out", "@WS/new"],
     "latin1_run/metrics.jsonl line 2: not UTF-8 text (byte 0xe9)"),
    ("compare_out_is_a_file", "compare_runs.py", ["@WS/precious_run", "--out", "@WS/notes_out"],
     "--out @WS/notes_out exists and is a file"),
]


def _tool_error_line(proc) -> str:
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err) == 1, (err, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("case, tool, args, message", TOOL_CASES, ids=[c[0] for c in TOOL_CASES])
def test_tool_bad_input_is_one_clear_line_exit_2_and_nothing_is_written(ws, case, tool, args, message):
    (ws / "notes_out").write_text("a file where an output directory goes\n")
    before = snapshot(ws, dirs=True)
    proc = cli(*[a.replace("@WS", str(ws)) for a in args], tool=tool)
    assert message.replace("@WS", str(ws)) in _tool_error_line(proc)
    assert snapshot(ws, dirs=True) == before  # no output directory made, no input touched


@pytest.fixture(scope="module")
def unreadable(ws):
    """A world-traversable copy of an HF model, a checkpoint and a run, each with one file or folder nobody
    may read, and how to run a tool as a user the permissions hold for (root reads everything)."""
    import tempfile

    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: no user for whom a file can be unreadable")
    d = Path(tempfile.mkdtemp(prefix="upgrpo_unreadable_"))
    try:
        for name in ("other_hf", "other_ckpt", "precious_run"):
            shutil.copytree(ws / name, d / name)
        shutil.copytree(d / "other_hf", d / "locked_hf")
        for f in d.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        d.chmod(0o777)  # the tools may create their output here (and the test checks they do not)
        (d / "mpl").mkdir()
        (d / "mpl").chmod(0o777)  # matplotlib's cache for the report tools
        (d / "other_hf" / "config.json").chmod(0)
        (d / "other_ckpt" / "metadata.json").chmod(0)
        (d / "precious_run" / "metrics.jsonl").chmod(0)
        (d / "locked_hf").chmod(0)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        yield d, prefix
    finally:
        (d / "locked_hf").chmod(0o755)
        shutil.rmtree(d, ignore_errors=True)


UNREADABLE_CASES = [  # (id, tool, args (@D = the unreadable workspace), expected text)
    ("hf_config", "convert_hf_to_megatron.py", ["--hf", "@D/other_hf", "--out", "@D/new"],
     "@D/other_hf/config.json: cannot read it (Permission denied)"),
    ("hf_dir", "convert_hf_to_megatron.py", ["--hf", "@D/locked_hf", "--out", "@D/new"],
     "--hf @D/locked_hf: cannot read the directory (Permission denied)"),
    ("checkpoint_file", "convert_megatron_to_hf.py", ["--checkpoint", "@D/other_ckpt", "--out", "@D/new"],
     "@D/other_ckpt/metadata.json: cannot read it (Permission denied)"),
    ("report_metrics", "routing_report.py", ["@D/precious_run", "--out", "@D/new"],
     "@D/precious_run/metrics.jsonl: cannot read it (Permission denied)"),
    ("compare_metrics", "compare_runs.py", ["@D/precious_run", "--out", "@D/new"],
     "@D/precious_run/metrics.jsonl: cannot read it (Permission denied)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, tool, args, message", UNREADABLE_CASES, ids=[c[0] for c in UNREADABLE_CASES])
def test_tool_unreadable_input_is_one_clear_line_exit_2(unreadable, case, tool, args, message):
    d, prefix = unreadable
    env = dict(ENV, PYTHONPATH=str(ROOT), MPLCONFIGDIR=str(d / "mpl"))
    args = [a.replace("@D", str(d)) for a in args]
    proc = subprocess.run([*prefix, sys.executable, str(ROOT / "tools" / tool), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert message.replace("@D", str(d)) in _tool_error_line(proc)
    assert not (d / "new").exists()


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
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "is in use by pid 4242 on node7" in err[0]
    assert (run / "metrics.jsonl").read_text() == '{"step": 0}\n'
