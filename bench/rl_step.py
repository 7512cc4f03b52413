"""End-to-end RL step on the tiny task: our Trainer (Megatron actor + vLLM engine) vs TRL's `GRPOTrainer`.

Same model (the tiny Qwen3-MoE of recipes/qwen_moe.yaml, with the same weights: TRL starts from the HF export
our engine starts from, after our SFT warm-up), same task (synthetic arithmetic, the same reward function),
same step: P prompts x n samples, responses up to 8 tokens, temperature 1, 4 optimizer updates of P/4 prompts
each, lr 1e-3 (--medium: 1e-6), clip 0.2/0.28, token-mean loss, no KL, no dynamic sampling (TRL has none).
One "RL step" of TRL is one generation cycle (`steps_per_generation` = 4 optimizer steps). TRL generates with
transformers `generate` (no vLLM on CPU), which is what a user would run here. TRL runs in a child process (so neither
sees the other's distributed/env state) that waits, through a TCP store, for this process to start each of its
cycles: after warm-up, each round is one of our steps then one TRL cycle (A B A B ...), and the ratio is the
median of the pairwise ratios with their min-max (`bench.common`).

From the same run of our trainer (a step with diagnostics off follows each paired step, so drift cancels out):
  - `rl_diagnostics_share`: diagnostics cost as % of a step (target <= 3 %),
  - `rl_weight_sync_share`: `timing_s/weight_sync` as % of a step (target <= 5 %).
For the share entries `theirs` is the target and ratio = target / ours (> 1: within the target).

    python bench/rl_step.py            # 16 prompts x 8 samples (the recipe's step)
    python bench/rl_step.py --medium   # the same step at hidden 512, 4 layers, 16 experts, 64-token responses
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

from bench.common import Pairs, load_avg, record  # noqa: E402

FULL = dict(prompts=16, n=8, mini=4, sft_steps=150, warmup=2, pairs=6, trl_warmup=1, overrides=[], lr=1e-3)
TINY = dict(prompts=4, n=4, mini=2, sft_steps=5, warmup=1, pairs=2, trl_warmup=1, overrides=[], lr=1e-3)
# the medium size, where generation dominates: hidden 512, 4 layers, 16 experts, responses up to 64 tokens.
# No SFT warm-up: both start from the same random init (responses ~20 tokens, EOS about 1 token in 32). lr 1e-6
# keeps both policies there: at 1e-3 they drifted apart (ours to 59 tokens a response, TRL's to 24), so the two
# steps no longer did the same work. The KV cache is what `--dry-run` says holds the step's 128 sequences at once
# (0.125 GiB at this size; the recipe's 0.0625 held 64, and the rest waited).
MEDIUM = dict(FULL, sft_steps=0, pairs=5, lr=1e-6, overrides=[
    "model.hidden_size=512", "model.num_layers=4", "model.num_attention_heads=8", "model.num_query_groups=4",
    "model.ffn_hidden_size=1024", "model.moe_ffn_hidden_size=256", "model.num_experts=16",
    "data.max_response_length=64", "rollout.kv_cache_gib=0.125"])
CLIP_LOW, CLIP_HIGH, SEED = 0.2, 0.28, 1
TARGETS = {"diagnostics": 3.0, "weight_sync": 5.0}  # % of an RL step, from the issue


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "repeats": len(xs)}


# ----------------------------------------------------------------------------------------------- ours
class Ours:
    """Our Trainer on the tiny recipe after its SFT warm-up, with the engine started: `step(diag_on)` runs one
    RL step and returns its wall time and timing_s/* metrics. The HF dir the engine started from is
    `hf_dir` (the same weights TRL starts from)."""

    def __init__(self, c, run_dir: Path):
        os.environ.setdefault("UPGRPO_NO_PROGRESS", "1")
        from upgrpo_megatron.config import load_recipe
        from upgrpo_megatron.trainer import Trainer

        total = c["warmup"] + 2 * c["pairs"] + 2
        cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml", [
            f"trainer.run_dir={run_dir}", f"sft_warmup.steps={c['sft_steps']}",
            f"trainer.prompts_per_step={c['prompts']}", f"rollout.n={c['n']}", f"actor.ppo_mini_batch_size={c['mini']}",
            "algorithm.dynamic_sampling=false", "trainer.eval_every=0", "trainer.save_every=1000000",
            "trainer.tensorboard=false", "trainer.report=false", "trainer.export_hf=false",
            f"trainer.total_steps={total}", f"actor.lr={c['lr']}", f"trainer.seed={SEED}",
            "algorithm.log_kl_to_ref=false",  # TRL's default (beta = 0) has no reference model either
            *c["overrides"]])
        self.tr = tr = Trainer(cfg)
        m = cfg.model
        self.model_desc = (f"qwen_moe.yaml (h{m.hidden_size} L{m.num_layers} E{m.num_experts} k{m.moe_router_topk}"
                           f"{', random init' if c['sft_steps'] == 0 else ''})")
        from upgrpo_megatron.convert import save_hf_checkpoint
        from upgrpo_megatron.sft import sft_warmup

        tr.sft_done = sft_warmup(cfg, tr.actor, tr.task, tr.dp, log=None, stop_requested=lambda: False,
                                 show_progress=False)
        t0 = time.perf_counter()
        tr.start_rollout()
        self.engine_start_s = time.perf_counter() - t0
        self.hf_dir = run_dir / "hf_after_sft"  # TRL starts from the same weights
        save_hf_checkpoint(cfg.model, tr.weights(), self.hf_dir, tokenizer=tr.tokenizer)
        # the routing-drift part of the diagnostics runs inside the update (a callback per micro-batch, then one
        # reduction): time it where it runs, so its share comes from the same step as the step's wall time
        self.drift_s = 0.0
        d = tr.diagnostics
        collector, d.finish_drift = d.drift_collector, self._timed(d.finish_drift)
        d.drift_collector = lambda epoch: self._timed(collector(epoch))

    def _timed(self, fn):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.drift_s += time.perf_counter() - t0
        return call

    def step(self, diag_on: bool) -> dict:
        tr = self.tr
        self.drift_s = 0.0
        tr.cfg.diagnostics.enabled = diag_on
        tr.step += 1
        t0 = time.perf_counter()
        m = tr.rl_step()
        wall = time.perf_counter() - t0
        print(f"[rl_step] ours step {tr.step}: {wall:.2f}s diagnostics={'on' if diag_on else 'off'} "
              f"score={m.get('critic/score/mean', float('nan')):.3f}", flush=True)
        return {"wall": wall, "diag": diag_on, "drift_s": self.drift_s,
                **{k: v for k, v in m.items() if k.startswith("timing_s/")},
                "response_length/mean": m.get("response_length/mean"), "critic/score/mean": m.get("critic/score/mean")}

    def profile(self, path) -> None:
        """One more step under torch.profiler (the trainer's process; with the engine core in it at world size 1, the
        table holds the generation too)."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        self.tr.cfg.diagnostics.enabled = True
        self.tr.step += 1
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            self.tr.rl_step()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        print(f"[rl_step] profile of one step written to {path}", flush=True)

    def close(self) -> None:
        self.tr.rollout.shutdown()
        self.tr.cfg.diagnostics.enabled = True


# ----------------------------------------------------------------------------------------------- TRL
def run_trl(c, hf_dir: Path, out: Path, control: str) -> None:
    """Child process: TRL GRPOTrainer on the same model, task and step shape. Each generation cycle starts when
    the parent sets `trl/go/<i>` in the TCP store at `control`; its seconds are reported as `trl/done/<i>`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from upgrpo_megatron.config import load_recipe
    from upgrpo_megatron.data import build_task

    cfg = load_recipe(ROOT / "recipes" / "qwen_moe.yaml", c["overrides"])
    task = build_task(cfg)
    per_update = c["mini"] * c["n"]              # completions per optimizer step
    spg = c["prompts"] // c["mini"]              # optimizer steps per generation = per RL step
    cycles = c["trl_warmup"] + c["pairs"]
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
        top_p=1.0, top_k=0, learning_rate=c["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, num_iterations=1, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
        loss_type="dapo", scale_rewards="group", max_steps=cycles * spg, save_strategy="no",
        report_to="none", logging_steps=cycles * spg, dataloader_num_workers=0, disable_dropout=True,
        shuffle_dataset=False,  # logging_steps: one log at the end, the averages over all steps
    )
    import datetime

    import torch.distributed as dist

    host, port = control.rsplit(":", 1)
    store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(minutes=60))
    cycle = {"i": 0, "t0": 0.0}

    def start(i):
        store.wait([f"trl/go/{i}"])
        cycle.update(i=i, t0=time.perf_counter())

    class Lockstep(TrainerCallback):
        def on_train_begin(self, *a, **k):
            start(0)

        def on_step_end(self, args, state, control, **k):
            if state.global_step % spg == 0:  # a generation cycle ends here; the next one generates first
                store.set(f"trl/done/{cycle['i']}", str(time.perf_counter() - cycle["t0"]))
                if cycle["i"] + 1 < cycles:
                    start(cycle["i"] + 1)

    trainer = GRPOTrainer(model=model, reward_funcs=[arithmetic_reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Lockstep()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    out.write_text(json.dumps({"threads": torch.get_num_threads(),
                               "completion_length_mean": statistics.mean(lengths) if lengths else None,
                               "reward_mean": statistics.mean(rewards) if rewards else None,
                               "trl": __import__("trl").__version__}))


class TrlChild:
    """The TRL child process, one generation cycle per `cycle(i)` (it waits for the go in between)."""

    def __init__(self, c, hf_dir: Path, tmp: Path, size_flag: list):
        import datetime

        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(minutes=60))
        self.out = tmp / "trl.json"
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
        cmd = [sys.executable, __file__, "--trl-child", str(hf_dir), "--out", str(self.out),
               "--control", f"127.0.0.1:{self.store.port}", *size_flag]
        self.proc = subprocess.Popen(cmd, env=env)

    def cycle(self, i: int) -> float:
        import datetime

        self.store.set(f"trl/go/{i}", "1")
        while True:  # poll, so that a child that died is reported instead of waited for
            try:
                self.store.wait([f"trl/done/{i}"], datetime.timedelta(seconds=2))
                return float(self.store.get(f"trl/done/{i}"))
            except RuntimeError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the TRL child exited with {self.proc.returncode}") from None

    def finish(self) -> dict:
        if self.proc.wait(timeout=1800):
            raise RuntimeError(f"the TRL child exited with {self.proc.returncode}")
        return json.loads(self.out.read_text())


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--medium", action="store_true", help="the medium size (hidden 512, L4, E16, 64-token responses)")
    ap.add_argument("--results", default=None, help="results.json to merge into (default bench/results.json)")
    ap.add_argument("--profile", default=None, help="also write a torch.profiler table of one of our steps here")
    ap.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--control", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    c = TINY if a.tiny else MEDIUM if a.medium else FULL
    size_flag = ["--tiny"] if a.tiny else ["--medium"] if a.medium else []
    if a.trl_child:
        run_trl(c, Path(a.trl_child), Path(a.out), a.control)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("rl_step: TRL is not installed (pip install -e '.[dev]' brings it): nothing measured", file=sys.stderr)
        return 1
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_rl_step_"))
    ours = Ours(c, tmp / "run")
    trl_child = None
    try:
        trl_child = TrlChild(c, ours.hf_dir, tmp, size_flag)
        for _ in range(c["warmup"]):
            ours.step(True)
        for i in range(c["trl_warmup"]):
            trl_child.cycle(i)
        load = load_avg()
        steps, cyc = [], []
        for r in range(c["pairs"]):  # A B A B: our step (as shipped: diagnostics on), then a TRL cycle
            steps.append(ours.step(True))
            cyc.append(trl_child.cycle(c["trl_warmup"] + r))
            print(f"[rl_step] pair {r}: ours {steps[-1]['wall']:.2f}s, TRL {cyc[-1]:.2f}s", flush=True)
            steps.append(ours.step(False))  # for the diagnostics A/B, not paired with TRL
        theirs = trl_child.finish()
        if a.profile:
            ours.profile(a.profile)
    finally:
        if trl_child is not None and trl_child.proc.poll() is None:
            trl_child.proc.terminate()
        ours.close()
    engine_start_s = ours.engine_start_s

    walls = [s["wall"] for s in steps]
    on = [s for s in steps if s["diag"]]
    off = [s for s in steps if not s["diag"]]
    pairs = Pairs([s["wall"] for s in on], cyc, load_start=load)  # ours as shipped: diagnostics on
    ours_s, theirs_s = summary([s["wall"] for s in on]), summary(cyc)
    config = {"prompts": c["prompts"], "n": c["n"], "updates_per_step": c["prompts"] // c["mini"],
              "max_response_length": ours.tr.cfg.data.max_response_length, "model": ours.model_desc,
              "trl": theirs["trl"], "threads": torch.get_num_threads(), "lr": c["lr"],
              "kv_cache_gib": ours.tr.cfg.rollout.kv_cache_gib,
              "micro_batch_tokens": ours.tr.cfg.actor.micro_batch_tokens}
    sfx = "_tiny" if a.tiny else "_medium" if a.medium else ""
    record("rl_step_vs_trl" + sfx, ours_s["median"], theirs_s["median"], None, "s/step", config,
           {"ours_s": ours_s, "theirs_s": theirs_s, "engine_start_s": engine_start_s,
            "ours_timing_s_median": {k: statistics.median(s[k] for s in on if k in s)
                                     for k in sorted({k for s in on for k in s if k.startswith("timing_s/")})},
            "ours_response_length_mean": statistics.mean(s["response_length/mean"] for s in steps),
            "theirs_completion_length_mean": theirs.get("completion_length_mean"),
            "ours_score_mean": statistics.mean(s["critic/score/mean"] for s in steps),
            "theirs_reward_mean": theirs.get("reward_mean"),
            "note": "ours: Trainer.rl_step() with vLLM rollout, diagnostics and weight sync; theirs: one "
                    "GRPOTrainer generation cycle (transformers generate + 4 optimizer steps)"},
           path=a.results, pairs=pairs)

    # diagnostics share, per step with diagnostics on: the timed rollout_vs_train call + the routing-drift
    # callbacks and reduction inside the update, over that step's wall time (one pair per step: the share vs
    # the target). The whole-step A/B difference (the step with diagnostics off that follows each) is kept as
    # a cross-check; on a loaded machine it is dominated by noise.
    med = lambda rows, k: statistics.median(r.get(k, 0.0) for r in rows)  # noqa: E731
    shares = [100 * (s.get("timing_s/diagnostics", 0.0) + s["drift_s"]) / s["wall"] for s in on]
    ab_pct = 100 * (med(on, "wall") - med(off, "wall")) / med(off, "wall")
    update_ab_pct = 100 * (med(on, "timing_s/update") - med(off, "timing_s/update")) / med(off, "timing_s/update")
    share_pairs = Pairs(shares, [TARGETS["diagnostics"]] * len(shares), load_start=load)
    record("rl_diagnostics_share" + sfx, statistics.median(shares), TARGETS["diagnostics"], None, "% of step",
           {**config, "theirs": "target"},
           {"pct": summary(shares), "diagnostics_call_s": summary([s.get("timing_s/diagnostics", 0.0) for s in on]),
            "drift_s": summary([s["drift_s"] for s in on]), "step_on_s": summary([s["wall"] for s in on]),
            "step_off_s": summary([s["wall"] for s in off]), "whole_step_ab_pct": ab_pct,
            "update_ab_pct": update_ab_pct}, path=a.results, pairs=share_pairs)
    sync = [100 * s["timing_s/weight_sync"] / s["wall"] for s in steps]
    sync_pairs = Pairs(sync, [TARGETS["weight_sync"]] * len(sync), load_start=load)
    record("rl_weight_sync_share" + sfx, statistics.median(sync), TARGETS["weight_sync"], None, "% of step",
           {**config, "theirs": "target"},
           {"weight_sync_s": summary([s["timing_s/weight_sync"] for s in steps]), "pct": summary(sync),
            "step_s": summary(walls)}, path=a.results, pairs=sync_pairs)
    print(f"rl_step: ours {ours_s['median']:.2f}s/step, TRL {theirs_s['median']:.2f}s/step (medians): "
          f"{pairs.describe()}; diagnostics {share_pairs.describe()} of the target's share "
          f"(whole-step A/B {ab_pct:+.1f}%), weight sync {sync_pairs.describe()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
