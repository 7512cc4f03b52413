"""The mismatch instruments on the real trainer (torchrun, Megatron actor, vLLM engine), three short runs:

A  T = 0.7, a 2-step LR warm-up, a KL loss to the reference policy, checkpoints every step
B  router noise on the engine's routers and pi_old taken from the engine (bypass mode)
C  the same noise with R3 (the engine's routing replayed by the trainer)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["sft_warmup.steps=30", "data.arithmetic_max_operand=9", "data.num_val=40", "rollout.val_sample_n=0",
         "trainer.prompts_per_step=8", "actor.ppo_mini_batch_size=4", "rollout.n=4",
         "trainer.eval_every=0", "trainer.report=false", "trainer.export_hf=false", "trainer.tensorboard=false"]
LR = 3e-4


def train(run_dir, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", UPGRPO_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "tools" / "train_moe.py"), str(ROOT / "recipes" / "qwen_moe.yaml"), f"trainer.run_dir={run_dir}",
           f"actor.lr={LR}", *SHORT, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"training failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "step" in r}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    d = tmp_path_factory.mktemp("instruments") / "a"
    m = train(d, "rollout.router_noise=0.0", "rollout.temperature=0.7", "actor.lr_warmup_steps=2",
              "algorithm.kl_loss_coef=0.05", "trainer.total_steps=2", "trainer.save_every=1",
              "trainer.keep_checkpoints=3")
    return d, m


def _weights(ckpt):
    import torch

    from upgrpo_megatron.convert.megatron_io import MegatronCheckpointReader

    # the reader gives a SwiGLU linear_fc1 as its [gate, up] row blocks: join them into one tensor
    return {k: torch.cat(v) if isinstance(v, list) else v for k, v in MegatronCheckpointReader(ckpt).iter_canonical()}


def test_the_first_rl_update_trains_at_the_warm_up_rate_and_changes_the_weights(run_a):
    d, m = run_a
    # warm-up counts RL steps: step 1 of 2 trains at lr / 2, step 2 at lr (the SFT warm-up does not use it up)
    assert m[1]["actor/lr"] == pytest.approx(LR / 2) and m[2]["actor/lr"] == pytest.approx(LR)
    before, after = _weights(d / "checkpoints" / "step_000000"), _weights(d / "checkpoints" / "step_000001")
    assert before.keys() == after.keys()
    changed = max(float((before[k] - after[k]).abs().max()) for k in before)
    assert changed > 1e-6, "the first RL step left every weight unchanged"


def test_the_kl_to_the_reference_policy_is_logged_and_grows_once_the_actor_moves(run_a):
    d, m = run_a
    assert (d / "reference" / "COMPLETE").exists()
    assert m[1]["actor/kl_coef"] == 0.05 and m[1]["actor/kl_loss"] >= 0
    assert m[2]["actor/kl_loss"] > m[1]["actor/kl_loss"] and m[2]["actor/kl_loss"] > 0


def test_at_temperature_0_7_the_engine_and_the_trainer_score_the_same_distribution(run_a):
    _, m = run_a
    assert m[1]["mismatch/abs_log_prob_diff_mean"] < 1e-4


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    d = tmp_path_factory.mktemp("instruments") / "b"
    return train(d, "rollout.router_noise=1.0", "algorithm.old_log_prob=rollout", "trainer.total_steps=1",
                 "trainer.save_every=1")


def test_router_noise_makes_the_engine_route_differently_and_bypass_mode_puts_it_in_the_ratio(run_b):
    m = run_b[1]
    assert m["mismatch/routing/pair_frac"] > 0.02  # measured ~0.18 at sigma = 1 on the tiny recipe
    assert m["mismatch/abs_log_prob_diff_mean"] > 1e-3
    # pi_old = the engine's log-probs: the ratio differs from 1 already in the first update
    assert abs(m["actor/ppo_kl"]) > 1e-5
    assert m["rollout/staleness"] == 0.0
    assert m["rollout/routing_replayed_frac"] == 0.0  # all routing captured during generation, none replayed



@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration")
    env = dict(os.environ, OMP_NUM_THREADS="1", UPGRPO_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "calibrate_router_noise.py"),
                           str(ROOT / "recipes" / "qwen_moe.yaml"), "sft_warmup.steps=100", "data.num_val=40",
                           "--sigmas", "0", "0.1", "0.3", "1.0", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"calibration failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out, json.loads((out / "calibration.json").read_text())


def test_the_measured_pair_mismatch_rises_monotonically_with_the_router_noise_from_zero(calibration):
    _, rows = calibration
    mis = [r["pair_mismatch"] for r in rows]
    assert mis[0] == 0.0 and all(b > a for a, b in zip(mis, mis[1:])), mis
    # the ratio the bypass loss uses for A <= 0 tokens (at theta = pi_old it is w): its variance rises with the noise
    # (one batch per level: the trend, not every neighbouring pair, is what a test can hold it to)
    var_neg = [r["w_var_neg"] for r in rows]
    assert var_neg[0] < 1e-9 < var_neg[1] < var_neg[-1] and max(var_neg) == max(var_neg[2:]), var_neg


def test_up_grpo_gradient_of_a_positive_tokens_ignores_the_mismatch_while_dapo_feels_it(calibration):
    """On the recorded tensors of each noise level, with pi_old = the engine's log-probs (bypass mode) and the
    sequence-sum aggregation (gradient of a token = its own term / number of sequences): UP-GRPO's gradient on an
    A > 0 token is -A / n whatever the noise; the clipped loss's is -A r / n, r = pi_trainer / pi_rollout."""
    import torch

    from upgrpo_megatron.losses import compute_policy_loss

    out, rows = calibration
    scaled = {"up_grpo": [], "vanilla": []}  # gradient / (-A / n) on the A > 0 tokens, per noise level
    for mode in scaled:
        for r in rows:
            t = torch.load(out / f"sigma_{r['sigma']:g}.pt", weights_only=True)
            lp = t["trainer_log_prob"].double().requires_grad_(True)
            loss, _ = compute_policy_loss(t["rollout_log_prob"].double(), lp, t["advantages"].double(),
                                          t["response_mask"], loss_mode=mode, loss_agg_mode="seq-mean-token-sum")
            loss.backward()
            n = int((t["response_mask"].sum(1) > 0).sum())
            pos = (t["advantages"] > 0) & (t["response_mask"] > 0)
            scaled[mode].append(lp.grad[pos] / (-t["advantages"][pos].double() / n))
    for g in scaled["up_grpo"]:
        assert torch.allclose(g, torch.ones_like(g), rtol=1e-10), "UP-GRPO's A > 0 gradient depends on pi_old"
    spread = [float(g.std()) for g in scaled["vanilla"]]
    assert spread[0] < 1e-5 and spread[-1] > 1e-3, spread  # r ~ 1 without noise, spread out with it


@pytest.fixture(scope="module")
def run_c(tmp_path_factory):
    d = tmp_path_factory.mktemp("instruments") / "c"
    return train(d, "rollout.router_noise=1.0", "algorithm.router_replay=R3", "trainer.total_steps=1")


def test_r3_in_the_trainer_replays_the_engines_routing_and_closes_most_of_the_log_prob_gap(run_b, run_c):
    # same seed and noise as run B, so the same rollouts; B's pi_old routes freely, C's replays the engine's
    # routing at every position the engine computed (prompt included)
    free, r3 = run_b[1], run_c[1]
    assert r3["mismatch/routing/pair_frac"] == pytest.approx(free["mismatch/routing/pair_frac"])  # own routing
    print(f"\nmean |log-prob gap| engine vs pi_old: free {free['mismatch/abs_log_prob_diff_mean']:.3g}, "
          f"R3 {r3['mismatch/abs_log_prob_diff_mean']:.3g}")
    assert r3["mismatch/abs_log_prob_diff_mean"] < 0.5 * free["mismatch/abs_log_prob_diff_mean"]
