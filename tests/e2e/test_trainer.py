"""The main job end to end: real Megatron actor + real vLLM engine on CPU, a few steps of the tiny recipe.

One uninterrupted run and one interrupted-and-resumed run of the same recipe; the resumed run must log the
same metrics for the steps after the interruption (model, optimizer, LR schedule, RNG, data position and
engine weights all come back from the checkpoint).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["sft_warmup.steps=30", "data.arithmetic_max_operand=9", "data.num_val=40", "rollout.val_sample_n=0", "rollout.router_noise=0.0", "trainer.prompts_per_step=8", "actor.ppo_mini_batch_size=4", "rollout.n=4",
         "trainer.eval_every=1", "trainer.save_every=1", "diagnostics.save_every=1"]


def train(run_dir, *overrides, nproc=1, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", UPGRPO_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tools" / "train_moe.py"), str(ROOT / "recipes" / "qwen_moe.yaml"),
           f"trainer.run_dir={run_dir}", *SHORT, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        pytest.fail(f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir):
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "step" in r}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("full") / "run"
    proc = train(d, "trainer.total_steps=3")
    return d, proc


def test_short_run_leaves_metrics_checkpoints_hf_export_and_report(full_run):
    d, proc = full_run
    m = metrics(d)
    assert [s for s in m if s >= 0] == [0, 1, 2, 3]
    for s in (1, 2, 3):
        for key in ("actor/pg_loss", "critic/score/mean", "response_length/mean", "val/acc",
                    "mismatch/routing/pair_frac", "mismatch/token_mult_prob_error", "timing_s/rollout"):
            assert key in m[s], (s, key)
    # fp32 engine and fp32 trainer on the same weights: routing and probabilities agree (the diagnostics
    # respond to what they measure: the perturbation test lives in tests/e2e/test_mismatch_responds.py)
    assert m[1]["mismatch/routing/pair_frac"] < 0.01
    assert abs(m[1]["mismatch/token_mult_prob_error"] - 1.0) < 1e-3
    ckpts = sorted((d / "checkpoints").glob("step_*"))
    assert ckpts and all((c / "COMPLETE").exists() for c in ckpts)
    assert (d / "config.yaml").exists() and (d / "samples.jsonl").exists()
    assert list((d / "diagnostics").glob("step_*.npz"))
    html = (d / "report" / "index.html").read_text()
    assert "Routing-mismatch report" in html and "data:image/png;base64," in html
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(d / "hf")
    tok = AutoTokenizer.from_pretrained(d / "hf")
    assert model.config.num_experts == 8 and len(tok) == model.config.vocab_size
    assert "val/acc after SFT warm-up" in proc.stdout + proc.stderr


def test_interrupted_and_resumed_run_logs_the_same_metrics(full_run, tmp_path):
    d_full, _ = full_run
    d = tmp_path / "run"
    train(d, "trainer.total_steps=2", "trainer.report=false", "trainer.export_hf=false")
    train(d, "trainer.total_steps=3", "trainer.report=false", "trainer.export_hf=false")  # resume=auto
    full, resumed = metrics(d_full), metrics(d)
    assert sorted(s for s in resumed if s >= 0) == [0, 1, 2, 3]  # no duplicated or missing steps
    for key in ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "val/acc", "response_length/mean"):
        assert resumed[3][key] == pytest.approx(full[3][key], rel=1e-4, abs=1e-5), key


def test_existing_run_dir_without_resume_is_refused_and_untouched(full_run):
    d, _ = full_run
    before = (d / "metrics.jsonl").read_text()
    # plain `python` (a world of one): torchrun would replace exit status 2 by its own 1 and add its traceback
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "train_moe.py"), str(ROOT / "recipes" / "qwen_moe.yaml"),
                           f"trainer.run_dir={d}", "trainer.resume=never"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (d / "metrics.jsonl").read_text() == before


@pytest.mark.distributed
def test_two_ranks_with_expert_parallelism_train_end_to_end(tmp_path):
    d = tmp_path / "ep2"
    train(d, "parallel.ep=2", "trainer.total_steps=1", "trainer.report=false", "trainer.export_hf=false",
          "sft_warmup.steps=10", nproc=2)
    m = metrics(d)
    assert 0 in m and 1 in m and "critic/score/mean" in m[1]
    assert (d / "checkpoints" / "step_000001" / "COMPLETE").exists()
