"""End-to-end RL step on the tiny task: our Trainer (Megatron actor + vLLM engine) vs TRL's `GRPOTrainer`.

Same model (the tiny Qwen3-MoE of recipes/qwen_moe.yaml, with the same weights: TRL starts from the HF export
our engine starts from, after our SFT warm-up), same task (synthetic arithmetic, the same reward function),
same step: P prompts x n samples, responses up to 8 tokens, temperature 1, 4 optimizer updates of P/4 prompts
each, lr 1e-3, clip 0.2/0.28, token-mean loss, no KL, no dynamic sampling (TRL has none). One "RL step" of
TRL is one generation cycle (`steps_per_generation` = 4 optimizer steps). TRL generates with transformers
`generate` (no vLLM on CPU), which is what a user would run here. Both measured in one run of this script
(TRL in a child process, so neither sees the other's distributed/env state), median and spread after warm-up.

From the same run of our trainer (steps alternating diagnostics on / off, so drift cancels out):
  - `rl_diagnostics_share`: diagnostics cost as % of a step (target <= 3 %),
  - `rl_weight_sync_share`: `timing_s/weight_sync` as % of a step (target <= 5 %).
For the share entries `theirs` is the target and ratio = target / ours (> 1: within the target).

    python bench/rl_step.py            # 16 prompts x 8 samples (the recipe's step)
    python bench/rl_step.py --tiny     # 4 prompts x 4 samples, a short smoke run (starts the vLLM engine)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import record  # noqa: E402

FULL = dict(prompts=16, n=8, mini=4, sft_steps=150, warmup=2, steps=20, trl_warmup=1, trl_cycles=8)
TINY = dict(prompts=4, n=4, mini=2, sft_steps=5, warmup=1, steps=2, trl_warmup=1, trl_cycles=2)
LR, CLIP_LOW, CLIP_HIGH, SEED = 1e-3, 0.2, 0.28, 1
TARGETS = {"diagnostics": 3.0, "weight_sync": 5.0}  # % of an RL step, from the issue


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "repeats": len(xs)}


# ----------------------------------------------------------------------------------------------- ours
def run_ours(c, run_dir: Path, profile=None):
    """Our Trainer on the tiny recipe; returns per-step wall times and timing_s/* metrics, and the HF dir the
    engine started from (the same weights TRL starts from)."""
    os.environ.setdefault("UPGRPO_NO_PROGRESS", "1")
    from upgrpo_megatron.config import load_recipe
    from upgrpo_megatron.trainer import Trainer

    cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml", [
        f"trainer.run_dir={run_dir}", f"sft_warmup.steps={c['sft_steps']}",
        f"trainer.prompts_per_step={c['prompts']}", f"rollout.n={c['n']}", f"actor.ppo_mini_batch_size={c['mini']}",
        "algorithm.dynamic_sampling=false", "trainer.eval_every=0", "trainer.save_every=1000000",
        "trainer.tensorboard=false", "trainer.report=false", "trainer.export_hf=false",
        f"trainer.total_steps={c['warmup'] + c['steps'] + 1}", f"actor.lr={LR}", f"trainer.seed={SEED}",
    ])
    tr = Trainer(cfg)
    tr.sft_warmup()
    t0 = time.perf_counter()
    tr._start_engine()
    engine_start_s = time.perf_counter() - t0
    # the routing-drift part of the diagnostics runs inside the update (a callback per micro-batch, then one
    # reduction): time it where it runs, so its share comes from the same step as the step's wall time
    drift_s = [0.0]

    def timed(fn):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                drift_s[0] += time.perf_counter() - t0
        return call

    d = tr.diagnostics
    collector, d.finish_drift = d.drift_collector, timed(d.finish_drift)
    d.drift_collector = lambda epoch: timed(collector(epoch))
    steps = []
    try:
        for i in range(c["warmup"] + c["steps"]):
            drift_s[0] = 0.0
            diag_on = i % 2 == 0  # alternate: the paired comparison sees the same drift of response lengths
            tr.cfg.diagnostics.enabled = diag_on
            tr.step += 1
            t0 = time.perf_counter()
            m = tr.rl_step()
            wall = time.perf_counter() - t0
            if i >= c["warmup"]:
                steps.append({"wall": wall, "diag": diag_on, "drift_s": drift_s[0], **{k: v for k, v in m.items() if k.startswith("timing_s/")},
                              "response_length/mean": m.get("response_length/mean"),
                              "critic/score/mean": m.get("critic/score/mean")})
            print(f"[rl_step] ours step {i}: {wall:.2f}s diagnostics={'on' if diag_on else 'off'} "
                  f"score={m.get('critic/score/mean', float('nan')):.3f}", flush=True)
        if profile:  # one more step under torch.profiler (the trainer's process; the engine runs in its own)
            import torch
            from torch.profiler import ProfilerActivity, profile as torch_profile

            tr.cfg.diagnostics.enabled = True
            tr.step += 1
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                tr.rl_step()
            Path(profile).parent.mkdir(parents=True, exist_ok=True)
            Path(profile).write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
            print(f"[rl_step] profile of one step written to {profile}", flush=True)
    finally:
        tr.engine.shutdown()
    tr.cfg.diagnostics.enabled = True
    return steps, run_dir / "engine_init", engine_start_s


# ----------------------------------------------------------------------------------------------- TRL
def run_trl(c, hf_dir: Path, out: Path) -> None:
    """Child process: TRL GRPOTrainer on the same model, task and step shape; writes per-cycle seconds."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from upgrpo_megatron.config import load_recipe
    from upgrpo_megatron.data import build_task

    cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml")
    task = build_task(cfg)
    per_update = c["mini"] * c["n"]              # completions per optimizer step
    spg = c["prompts"] // c["mini"]              # optimizer steps per generation = per RL step
    cycles = c["trl_warmup"] + c["trl_cycles"]
    items = task.train.items
    rows = [{"prompt": items[i % len(items)].text, "answer": items[i % len(items)].answer}
            for i in range(cycles * c["prompts"])]

    def arithmetic_reward(completions, answer, **kw):
        return [task.reward(t, a) for t, a in zip(completions, answer)]

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(out.parent / "trl_out"), use_cpu=True, bf16=False, fp16=False, seed=SEED,
        per_device_train_batch_size=per_update, gradient_accumulation_steps=1, steps_per_generation=spg,
        num_generations=c["n"], max_completion_length=cfg.data.max_response_length, temperature=1.0,
        top_p=1.0, top_k=0, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, num_iterations=1, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
        loss_type="dapo", scale_rewards="group", max_steps=cycles * spg, save_strategy="no",
        report_to="none", logging_steps=cycles * spg, dataloader_num_workers=0, disable_dropout=True,
        shuffle_dataset=False,  # logging_steps: one log at the end, the averages over all steps
    )
    marks = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **k):
            if state.global_step % spg == 0:
                marks.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic_reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Marks()])
    trainer.train()
    cycle_s = [b - a for a, b in zip(marks, marks[1:])]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    out.write_text(json.dumps({"cycle_s": cycle_s, "threads": torch.get_num_threads(),
                               "completion_length_mean": statistics.mean(lengths) if lengths else None,
                               "reward_mean": statistics.mean(rewards) if rewards else None,
                               "trl": __import__("trl").__version__}))


def trl_in_child(c, hf_dir: Path, tmp: Path, tiny: bool) -> dict:
    out = tmp / "trl.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    cmd = [sys.executable, __file__, "--trl-child", str(hf_dir), "--out", str(out), *(["--tiny"] if tiny else [])]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    ap.add_argument("--profile", default=None, help="also write a torch.profiler table of one of our steps here")
    ap.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    c = TINY if a.tiny else FULL
    if a.trl_child:
        run_trl(c, Path(a.trl_child), Path(a.out))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("rl_step: TRL is not installed (pip install -e '.[dev]' brings it): nothing measured", file=sys.stderr)
        return 1
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_rl_step_"))
    steps, hf_dir, engine_start_s = run_ours(c, tmp / "run", a.profile)
    theirs = trl_in_child(c, hf_dir, tmp, a.tiny)

    cyc = theirs["cycle_s"][c["trl_warmup"]:]
    walls = [s["wall"] for s in steps]
    on = [s for s in steps if s["diag"]]
    off = [s for s in steps if not s["diag"]]
    ours_s, theirs_s = summary([s["wall"] for s in on]), summary(cyc)  # ours as shipped: diagnostics on
    config = {"prompts": c["prompts"], "n": c["n"], "updates_per_step": c["prompts"] // c["mini"],
              "max_response_length": 8, "model": "qwen_moe.yaml (h128 L2 E8 k2)", "trl": theirs["trl"],
              "threads": torch.get_num_threads()}
    sfx = "_tiny" if a.tiny else ""
    record("rl_step_vs_trl" + sfx, ours_s["median"], theirs_s["median"], theirs_s["median"] / ours_s["median"],
           "s/step", config,
           {"ours_s": ours_s, "theirs_s": theirs_s, "engine_start_s": engine_start_s,
            "ours_step_s_all": [s["wall"] for s in on], "theirs_cycle_s_all": cyc,
            "min_ratio": theirs_s["min"] / ours_s["min"],
            "ours_timing_s_median": {k: statistics.median(s[k] for s in on if k in s)
                                     for k in sorted({k for s in on for k in s if k.startswith("timing_s/")})},
            "ours_response_length_mean": statistics.mean(s["response_length/mean"] for s in steps),
            "theirs_completion_length_mean": theirs.get("completion_length_mean"),
            "ours_score_mean": statistics.mean(s["critic/score/mean"] for s in steps),
            "theirs_reward_mean": theirs.get("reward_mean"),
            "note": "ours: Trainer.rl_step() with vLLM rollout, diagnostics and weight sync; theirs: one "
                    "GRPOTrainer generation cycle (transformers generate + 4 optimizer steps)"},
           path=a.results)

    # diagnostics share, per step with diagnostics on: the timed rollout_vs_train call + the routing-drift
    # callbacks and reduction inside the update, over that step's wall time. The whole-step A/B difference
    # (steps with diagnostics off) is kept as a cross-check; on a loaded machine it is dominated by noise.
    med = lambda rows, k: statistics.median(r.get(k, 0.0) for r in rows)  # noqa: E731
    shares = [100 * (s.get("timing_s/diagnostics", 0.0) + s["drift_s"]) / s["wall"] for s in on]
    diag_pct = statistics.median(shares)
    ab_pct = 100 * (med(on, "wall") - med(off, "wall")) / med(off, "wall")
    update_ab_pct = 100 * (med(on, "timing_s/update") - med(off, "timing_s/update")) / med(off, "timing_s/update")
    record("rl_diagnostics_share" + sfx, diag_pct, TARGETS["diagnostics"], TARGETS["diagnostics"] / max(diag_pct, 1e-9),
           "% of step", {**config, "theirs": "target"},
           {"pct": summary(shares), "diagnostics_call_s": summary([s.get("timing_s/diagnostics", 0.0) for s in on]),
            "drift_s": summary([s["drift_s"] for s in on]), "step_on_s": summary([s["wall"] for s in on]),
            "step_off_s": summary([s["wall"] for s in off]), "whole_step_ab_pct": ab_pct,
            "update_ab_pct": update_ab_pct}, path=a.results)
    sync = [100 * s["timing_s/weight_sync"] / s["wall"] for s in steps]
    sync_pct = statistics.median(sync)
    record("rl_weight_sync_share" + sfx, sync_pct, TARGETS["weight_sync"], TARGETS["weight_sync"] / max(sync_pct, 1e-9),
           "% of step", {**config, "theirs": "target"},
           {"weight_sync_s": summary([s["timing_s/weight_sync"] for s in steps]), "pct": summary(sync),
            "step_s": summary(walls)}, path=a.results)
    print(f"rl_step: ours {ours_s['median']:.2f}s/step (min {ours_s['min']:.2f}, max {ours_s['max']:.2f}), TRL "
          f"{theirs_s['median']:.2f}s/step (min {theirs_s['min']:.2f}, max {theirs_s['max']:.2f}): "
          f"{theirs_s['median'] / ours_s['median']:.2f}x; diagnostics {diag_pct:.1f}% of a step "
          f"(whole-step A/B {ab_pct:+.1f}%), weight sync {sync_pct:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
