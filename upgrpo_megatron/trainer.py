"""The RL loop. `Trainer(cfg).fit()` = optional SFT warm-up (sft.py), start the rollout engine, then for each
step `RLStep.run` (rl_step.py), eval every k steps, metrics, checkpoints; finally the HF export and the report.

The trainer owns what lives across steps: the step counter, the weight version, the count of consecutive bad
steps, signals, and checkpoints. Its `state_dict()` / `load_state_dict()` are what a checkpoint stores beside
the model and optimizer (torchtitan's `Stateful` trainer).
"""

from __future__ import annotations

import signal
import time
from typing import Dict, Optional

import numpy as np
import torch

from upgrpo_megatron.distributed import (
    all_reduce_max,
    broadcast_object,
    rng_state,
    seed_everything,
    set_rng_state,
    timer,
)
from upgrpo_megatron.errors import TrainingStopped


class Trainer:
    def __init__(self, cfg):
        from upgrpo_megatron.config import validate_layout
        from upgrpo_megatron.megatron.parallel import ParallelSizes, data_parallel, init_distributed, init_model_parallel
        from upgrpo_megatron.run_dir import RunDir

        self.cfg = cfg
        if not torch.cuda.is_available():  # before anything touches the run directory
            from upgrpo_megatron.config import validate_for_cpu_engine

            validate_for_cpu_engine(cfg)
        self.rank, self.world = init_distributed(cfg.parallel.backend)
        self.layout = validate_layout(cfg, self.world)
        self.run_dir = RunDir(cfg.trainer.run_dir, rank=self.rank)
        resume_from = self.run_dir.prepare(str(cfg.trainer.resume))
        seed_everything(cfg.trainer.seed)
        lay = self.layout
        init_model_parallel(ParallelSizes(tp=lay.tp, ep=lay.ep, etp=lay.etp, pp=1,
                                          sequence_parallel=lay.sequence_parallel),
                            seed=cfg.trainer.seed, backend=cfg.parallel.backend)
        self.dp = data_parallel()
        self._build_parts()
        self.step = 0
        self.sft_done = False
        self.bad_steps = 0
        self._stop_signal: Optional[int] = None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        elif self.rank == 0:
            print(f"starting {self.run_dir.path} from scratch (no complete checkpoint to resume)", flush=True)
        self.metrics = None
        keep_through = self.step if resume_from is not None else None
        self._saved_step: Optional[int] = keep_through
        if self.rank == 0:  # only now that every input checked out
            from upgrpo_megatron.metrics import MetricsLogger

            self.run_dir.cut_logs(keep_through)
            self.metrics = MetricsLogger(self.run_dir.path, tensorboard=cfg.trainer.tensorboard)
            kept = self.run_dir.save_config(cfg, step=self.step)
            if kept is not None:
                print(f"the config differs from the run's previous one; that one is kept as {kept}", flush=True)

    def _build_parts(self):
        from upgrpo_megatron.config import ConfigError
        from upgrpo_megatron.data import build_task
        from upgrpo_megatron.diagnostics.step import StepDiagnostics
        from upgrpo_megatron.engine_link import RolloutClient, actor_hf_weights
        from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings
        from upgrpo_megatron.rl_step import RLStep
        from upgrpo_megatron.router_replay import get_router_replay

        cfg, lay = self.cfg, self.layout
        self.task = build_task(cfg, self.run_dir.path)
        self.tokenizer = self.task.tokenizer
        if len(self.tokenizer) > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{len(self.tokenizer)} tokens")
        a = cfg.actor
        self.actor = MegatronActor(
            cfg.model, tp=lay.tp, ep=lay.ep, etp=lay.etp, sequence_parallel=lay.sequence_parallel,
            dtype=cfg.model.dtype,
            optim=OptimSettings(lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay, betas=tuple(a.betas),
                                grad_clip=a.grad_clip, lr_warmup_steps=a.lr_warmup_steps,
                                lr_schedule=a.lr_schedule, total_steps=cfg.trainer.total_steps),
            distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        if cfg.model.hf_path:
            from upgrpo_megatron.convert import load_hf_into_model

            load_hf_into_model(cfg.model.hf_path, self.actor.module)
        d = cfg.diagnostics
        self.diagnostics = StepDiagnostics(self.run_dir.path, num_experts=cfg.model.num_experts,
                                           clip_low=cfg.algorithm.clip_ratio_low,
                                           clip_high=cfg.algorithm.clip_ratio_high, taus=d.extreme_taus,
                                           threshold=d.log_prob_diff_threshold, save_every=d.save_every,
                                           enabled_writer=self.rank == 0)
        self.weights = actor_hf_weights(cfg.model, self.actor.module)
        self.rollout = RolloutClient(cfg, self.tokenizer, self.run_dir.path)
        self.step_fn = RLStep(cfg, actor=self.actor, rollout=self.rollout, task=self.task,
                              diagnostics=self.diagnostics, replay=get_router_replay(cfg.algorithm.router_replay),
                              dp=self.dp, weights=self.weights)

    # --------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """What a checkpoint stores beside the model and optimizer (plain tensors and numbers only)."""
        return {"step": self.step, "sft_done": self.sft_done, "weight_version": self.rollout.weight_version,
                "scheduler": self.actor.scheduler.state_dict(), "rng": rng_state(), "data": self.task.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.sft_done = bool(state.get("sft_done", True))
        self.rollout.weight_version = int(state.get("weight_version", 0))
        self.actor.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.task.load_state_dict(state["data"])

    def _save_checkpoint(self):
        from upgrpo_megatron.megatron.checkpoint import prune_checkpoints, save_checkpoint

        if self._saved_step == self.step:  # nothing changed since (e.g. a signal right after a periodic save)
            return
        save_checkpoint(self.run_dir.checkpoint(self.step), self.actor.module, optimizer=self.actor.optimizer,
                        extra_state=self.state_dict(), model_cfg=self.cfg.model,
                        tokenizer=self.tokenizer if self.rank == 0 else None)
        self._saved_step = self.step
        if self.rank == 0:
            prune_checkpoints(self.run_dir.checkpoints, keep=self.cfg.trainer.keep_checkpoints)

    def _load_checkpoint(self, path):
        from upgrpo_megatron.megatron.checkpoint import load_checkpoint

        self.load_state_dict(load_checkpoint(path, self.actor.module, optimizer=self.actor.optimizer,
                                             model_cfg=self.cfg.model))
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # --------------------------------------------------------------------------------------- steps
    def start_rollout(self) -> None:
        """Start the rollout engine from the actor's current weights (collective)."""
        self.rollout.start(self.weights, self.rollout.weight_version)

    def evaluate(self) -> Dict[str, float]:
        """Greedy accuracy on the held-out split."""
        val, r = self.task.val_prompts(), self.cfg.rollout
        batch = self.rollout.generate([p.prompt_ids for p in val], n=r.val_n, temperature=r.val_temperature,
                                      seed=self.cfg.trainer.seed)
        scores = [self.task.accuracy(self.tokenizer.decode(s.response_ids, skip_special_tokens=True),
                                     val[s.prompt_index].answer) for s in batch.samples]
        return {"val/acc": float(np.mean(scores)) if scores else float("nan")}

    def rl_step(self) -> Dict[str, float]:
        """One RL step at `self.step` (already advanced); counts consecutive steps whose updates were all
        skipped and raises `TrainingStopped` from the loop once there are `actor.max_bad_steps` of them."""
        result = self.step_fn.run(self.step)
        m = result.metrics
        if result.updates:
            self.bad_steps = self.bad_steps + 1 if result.all_updates_skipped else 0
            m["actor/consecutive_bad_steps"] = float(self.bad_steps)
        if self.rank == 0:
            from upgrpo_megatron.diagnostics.storage import append_samples

            append_samples(self.run_dir.path, self.step, result.samples)
        return m

    def _stop_reason(self) -> Optional[str]:
        n = self.cfg.actor.max_bad_steps
        if self.bad_steps >= n:  # the loop logs this step, checkpoints and stops
            return (f"{self.bad_steps} consecutive steps had non-finite loss or gradients; stopped at step "
                    f"{self.step} with a checkpoint of the last good weights (actor.max_bad_steps={n})")
        return None

    # --------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT (ranks must stop at the same point)."""
        got = all_reduce_max(0.0 if self._stop_signal is None else float(self._stop_signal))
        if got > 0 and self._stop_signal is None:
            self._stop_signal = int(got)
        return got > 0

    def _stop_on_signal(self, where: str) -> bool:
        """After a signal: save the state (when there is one to save) and say so. Returns True to stop."""
        if not self._stop_requested():
            return False
        name = signal.Signals(self._stop_signal).name
        if self.sft_done:
            self._save_checkpoint()
            msg = (f"stopped by {name} {where}; checkpoint {self.run_dir.checkpoint(self.step)} saved, resume with "
                   f"trainer.resume=auto")
        else:
            msg = f"stopped by {name} during the SFT warm-up; nothing to checkpoint yet (a restart repeats the warm-up)"
        if self.rank == 0:
            print(msg, flush=True)
        return True

    # --------------------------------------------------------------------------------------- fit
    def _log(self, step: int, m: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(step, m)

    def fit(self):
        t = self.cfg.trainer
        prev = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.time()
        try:
            if not self.sft_done:
                from upgrpo_megatron.sft import sft_warmup

                self.sft_done = sft_warmup(self.cfg, self.actor, self.task, self.dp, log=self._log,
                                           stop_requested=self._stop_requested, show_progress=self.rank == 0)
            if self._stop_on_signal("during the SFT warm-up"):
                return
            self.start_rollout()
            if self._stop_on_signal(f"while the rollout engine started (step {self.step})"):
                return
            logged = broadcast_object(self.metrics.steps() if self.metrics is not None else None)
            if self.step == 0 and 0 not in logged:
                m = self.evaluate()
                self._log(0, m)
                if self.rank == 0:
                    print(f"val/acc after SFT warm-up: {m['val/acc']:.3f}", flush=True)
                self._save_checkpoint()
            self._loop()
            self._finish(time.time() - t_start)
        finally:
            for s, h in prev.items():
                signal.signal(s, h)
            self.rollout.shutdown()
            if self.metrics is not None:
                self.metrics.close()

    def _loop(self):
        from upgrpo_megatron.progress import progress

        t = self.cfg.trainer
        for _ in progress(range(self.step, t.total_steps), desc="RL", enabled=self.rank == 0, initial=self.step,
                          total=t.total_steps):
            self.step += 1
            try:
                m = self.rl_step()
            except TrainingStopped as e:
                if e.before_update:  # nothing of this step was applied yet
                    self.step -= 1
                    self._save_checkpoint()
                    raise TrainingStopped(f"{e}; the last good state (step {self.step}) is in "
                                          f"{self.run_dir.checkpoints}") from e
                raise
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.total_steps):
                with timer(m, "eval"):
                    m.update(self.evaluate())
            self._log(self.step, m)
            stop_reason = self._stop_reason()
            if self.step % t.save_every == 0 or self.step == t.total_steps or stop_reason:
                self._save_checkpoint()
            if stop_reason:
                raise TrainingStopped(stop_reason)
            if self._stop_on_signal(f"after step {self.step}"):
                return

    def _finish(self, seconds: float):
        t = self.cfg.trainer
        if t.export_hf:
            from upgrpo_megatron.convert import save_hf_checkpoint

            weights = list(self.weights())
            if self.rank == 0:
                save_hf_checkpoint(self.cfg.model, iter(weights), self.run_dir.hf, tokenizer=self.tokenizer,
                                   overwrite=True)
        if self.rank == 0 and t.report:
            from upgrpo_megatron.diagnostics.report import render_report

            render_report(self.run_dir.path, self.run_dir.report)
        if self.rank == 0:
            from upgrpo_megatron.metrics import read_metrics

            vals = [r["val/acc"] for r in read_metrics(self.run_dir.path) if r.get("val/acc") is not None]
            if vals:
                print(f"done in {seconds / 60:.1f} min: val/acc {vals[0]:.3f} after SFT warm-up -> "
                      f"{vals[-1]:.3f} after {t.total_steps} RL steps (peak {max(vals):.3f}); run dir "
                      f"{self.run_dir.path}", flush=True)
