"""The RL loop. `Trainer(cfg).fit()` = optional SFT warm-up (sft.py), start the rollout engine, then for each
step `RLStep.run` (rl_step.py), eval every k steps, metrics, checkpoints; finally the HF export and the report.

The trainer owns what lives across steps: the step counter, the weight version, the count of consecutive bad
steps, signals, and checkpoints. Its `state_dict()` / `load_state_dict()` are what a checkpoint stores beside
the model and optimizer (torchtitan's `Stateful` trainer).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional

import numpy as np
import torch

from upgrpo_megatron import console
from upgrpo_megatron.distributed import (
    all_reduce_max,
    barrier,
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
        from upgrpo_megatron.megatron.parallel import (
            ParallelSizes,
            data_parallel,
            init_distributed,
            init_model_parallel,
        )
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
        self.steps_without_update = 0
        self._stop_signal: Optional[int] = None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        elif cfg.trainer.init_from:
            self._init_from(cfg.trainer.init_from)
        elif self.rank == 0:
            console.say(f"starting {self.run_dir.path} from scratch (no complete checkpoint to resume)")
        self.metrics = None
        keep_through = self.step if resume_from is not None else None
        self._saved_step: Optional[int] = keep_through
        if self.rank == 0:  # only now that every input checked out does anything in the run dir change
            from upgrpo_megatron.metrics import MetricsLogger

            self.run_dir.open(keep_through)
            self.metrics = MetricsLogger(self.run_dir.path, tensorboard=cfg.trainer.tensorboard)
            kept = self.run_dir.save_config(cfg, step=self.step)
            if kept is not None:
                console.say(f"the config differs from the run's previous one; that one is kept as {kept}")
        barrier()
        if console.log_path() is not None:  # third-party output was captured: from now on into the run dir
            console.capture_to(self.run_dir.path / "logs" / f"rank{self.rank}.log")

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
        shape = dict(tp=lay.tp, ep=lay.ep, etp=lay.etp, sequence_parallel=lay.sequence_parallel,
                     dtype=cfg.model.dtype, temperature=cfg.rollout.temperature)
        self.actor = MegatronActor(
            cfg.model, **shape,
            optim=OptimSettings(lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay, betas=tuple(a.betas),
                                grad_clip=a.grad_clip, lr_warmup_steps=a.lr_warmup_steps,
                                lr_schedule=a.lr_schedule, total_steps=cfg.trainer.total_steps),
            distributed_optimizer=cfg.parallel.use_distributed_optimizer, micro_batch_tokens=a.micro_batch_tokens,
        )
        self.reference = None
        if cfg.algorithm.log_kl_to_ref or cfg.algorithm.kl_loss_coef > 0:
            from upgrpo_megatron.megatron.reference import ReferencePolicy

            self.reference = ReferencePolicy(cfg.model, **shape)
        if cfg.model.hf_path:
            from upgrpo_megatron.convert import load_hf_into_model

            load_hf_into_model(cfg.model.hf_path, self.actor.module, cfg.model)  # refuses another top-k, vocab, ...
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
                              dp=self.dp, weights=self.weights, reference=self.reference)

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
            console.say(f"resumed from {path} at step {self.step}")

    def _init_from(self, path) -> None:
        """RL starts from another run's checkpoint (its weights only: fresh optimizer, step 0, no SFT warm-up),
        so that arms of an experiment share one post-SFT model."""
        from pathlib import Path

        from upgrpo_megatron.errors import RunDirError
        from upgrpo_megatron.megatron.checkpoint import load_checkpoint

        if not Path(path).is_dir():
            raise RunDirError(f"trainer.init_from={path}: no such checkpoint directory")
        load_checkpoint(path, self.actor.module, optimizer=None, model_cfg=self.cfg.model)
        self.sft_done = True
        if self.rank == 0:
            console.say(f"starting {self.run_dir.path} from the weights of {path} (trainer.init_from)")

    def _prepare_reference(self) -> None:
        """The reference policy = the weights RL starts from; saved once, loaded on resume."""
        if self.reference is None:
            return
        from upgrpo_megatron.megatron.reference import reference_is_saved

        path = self.run_dir.path / "reference"
        if reference_is_saved(path):
            self.reference.load(path)
        else:
            if self.step > 0 and self.rank == 0:
                console.warn(f"{path} is missing; the reference policy is taken from the resumed weights")
            self.reference.copy_from(self.actor.module)
            self.reference.save(path)

    # --------------------------------------------------------------------------------------- steps
    def start_rollout(self) -> None:
        """Start the rollout engine from the actor's current weights (collective)."""
        self.rollout.start(self.weights, self.rollout.weight_version)

    def evaluate(self) -> Dict[str, float]:
        """Accuracy on the held-out split: `val/acc` at rollout.val_temperature (greedy by default) and, with
        rollout.val_sample_n = k > 0, `val/mean@k`: the mean accuracy of k samples per problem at the training
        temperature (less noisy than one greedy answer per problem)."""
        r = self.cfg.rollout
        out = {"val/acc": self._val_accuracy(r.val_n, r.val_temperature)}
        if r.val_sample_n:
            out[f"val/mean@{r.val_sample_n}"] = self._val_accuracy(r.val_sample_n, r.temperature)
        return out

    def _val_accuracy(self, n: int, temperature: float) -> float:
        val = self.task.val_prompts()
        batch = self.rollout.generate([p.prompt_ids for p in val], n=n, temperature=temperature,
                                      seed=self.cfg.trainer.seed)
        scores = [self.task.accuracy(self.tokenizer.decode(s.response_ids, skip_special_tokens=True),
                                     val[s.prompt_index].answer) for s in batch.samples]
        return float(np.mean(scores)) if scores else float("nan")

    def rl_step(self) -> Dict[str, float]:
        """One RL step at `self.step` (already advanced); counts consecutive steps whose updates were all
        skipped and raises `TrainingStopped` from the loop once there are `actor.max_bad_steps` of them."""
        result = self.step_fn.run(self.step)
        m = result.metrics
        if result.updates:
            self.bad_steps = self.bad_steps + 1 if result.all_updates_skipped else 0
            m["actor/consecutive_bad_steps"] = float(self.bad_steps)
            self.steps_without_update = 0
            if not self.actor.weights_finite():
                raise TrainingStopped(f"the weights became non-finite in step {self.step} (a learning rate far too "
                                      f"high?); nothing was saved from it: the newest complete checkpoint in "
                                      f"{self.run_dir.checkpoints} holds the last finite weights")
        else:
            self.steps_without_update += 1
            if self.rank == 0:
                console.warn(f"step {self.step}: every group's samples were all right or all wrong, no update "
                             f"({self.steps_without_update} such steps in a row)")
        if self.rank == 0:
            from upgrpo_megatron.diagnostics.storage import append_samples

            append_samples(self.run_dir.path, self.step, result.samples)
        return m

    def _stop_reason(self) -> Optional[str]:
        n, k = self.cfg.actor.max_bad_steps, self.cfg.trainer.max_steps_without_update
        if self.bad_steps >= n:  # the loop logs this step, checkpoints and stops
            return (f"{self.bad_steps} consecutive steps had non-finite loss or gradients; stopped at step "
                    f"{self.step} with a checkpoint of the last good weights (actor.max_bad_steps={n})")
        if self.steps_without_update >= k:
            return (f"{k} steps in a row had no update: every group's samples were all right or all wrong "
                    f"(rewards all equal: is the reward or the model broken? see samples.jsonl); stopped at step "
                    f"{self.step} (trainer.max_steps_without_update={k})")
        return None

    # --------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._stop_signal is not None:  # a second signal: the user will not wait for the step to finish
            if self.rank == 0:
                print(f"\n{name} again: stopping now without a new checkpoint (the newest complete one is kept in "
                      f"{self.run_dir.checkpoints})", file=console.err(), flush=True)
            os._exit(128 + signum)  # engine processes die with this one (rollout/vllm_plugin.py)
        self._stop_signal = signum
        if self.rank == 0:
            print(f"\n{name} received: finishing the current step, then saving a checkpoint "
                  f"({name} again to stop at once)", file=console.err(), flush=True)

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
            console.say(msg)
        return True

    # --------------------------------------------------------------------------------------- fit
    def _log(self, step: int, m: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(step, m)

    def fit(self):
        prev = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.time()
        try:
            if not self.sft_done:
                from upgrpo_megatron.sft import sft_warmup

                self.sft_done = sft_warmup(self.cfg, self.actor, self.task, self.dp,
                                           log=self.metrics.log_sft if self.metrics is not None else None,
                                           stop_requested=self._stop_requested, show_progress=self.rank == 0)
            if self._stop_on_signal("during the SFT warm-up"):
                return
            self._prepare_reference()
            self.start_rollout()
            if self._stop_on_signal(f"while the rollout engine started (step {self.step})"):
                return
            logged = broadcast_object(self.metrics.steps() if self.metrics is not None else None)
            if self.step == 0 and 0 not in logged:
                m = self.evaluate()
                self._log(0, m)
                if self.rank == 0:
                    console.say(f"val/acc after SFT warm-up: {m['val/acc']:.3f}")
                self._save_checkpoint()
            if self._loop():
                self._finish(time.time() - t_start)
        finally:
            try:
                self.rollout.shutdown()
                if self.metrics is not None:
                    self.metrics.close()
            finally:
                # only now: a second Ctrl-C while the stop saves and the engine shuts down (seconds) must still
                # stop at once, not raise KeyboardInterrupt in the middle of the shutdown
                for s, h in prev.items():
                    signal.signal(s, h)

    def _loop(self) -> bool:
        """The RL steps; False when a signal stopped them (the state is saved), True when all ran."""
        from upgrpo_megatron.progress import progress
        from upgrpo_megatron.summary import eval_line, progress_fields

        t = self.cfg.trainer
        bar = progress(range(self.step, t.total_steps), desc="RL", enabled=self.rank == 0, initial=self.step,
                       total=t.total_steps)
        last_val = None
        for _ in bar:
            self.step += 1
            data_state = self.task.state_dict()
            try:
                m = self.rl_step()
            except TrainingStopped as e:
                if e.before_update:  # nothing of this step was applied yet: take back its schedule and prompts
                    self.step -= 1
                    self.actor.undo_rl_step()
                    self.task.load_state_dict(data_state)
                    self._save_checkpoint()
                    raise TrainingStopped(f"{e}; the last good state (step {self.step}) is in "
                                          f"{self.run_dir.checkpoints}") from e
                raise
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.total_steps):
                with timer(m, "eval"):
                    m.update(self.evaluate())
                last_val = m["val/acc"]
                if self.rank == 0 and hasattr(bar, "write"):
                    bar.write(eval_line(self.step, m), file=console.err())
                elif self.rank == 0:
                    console.say(eval_line(self.step, m))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(progress_fields(m, last_val), refresh=False)
            self._log(self.step, m)
            stop_reason = self._stop_reason()
            if self.step % t.save_every == 0 or self.step == t.total_steps or stop_reason:
                self._save_checkpoint()
            if stop_reason:
                raise TrainingStopped(stop_reason)
            if self._stop_on_signal(f"after step {self.step}"):
                return False
        return True

    def _finish(self, seconds: float):
        t = self.cfg.trainer
        if t.export_hf:
            from upgrpo_megatron.convert import save_hf_checkpoint

            if not self.actor.weights_finite():
                raise TrainingStopped("the final weights are not finite: no Hugging Face export written")
            weights = list(self.weights())
            if self.rank == 0:
                save_hf_checkpoint(self.cfg.model, iter(weights), self.run_dir.hf, tokenizer=self.tokenizer,
                                   overwrite=True)
        if self.rank == 0 and t.report:
            from upgrpo_megatron.diagnostics.report import render_report

            render_report(self.run_dir.path, self.run_dir.report)
        if self.rank == 0:
            from upgrpo_megatron.metrics import read_metrics
            from upgrpo_megatron.summary import final_summary

            records = [r for r in read_metrics(self.run_dir.path) if "step" in r]
            saved = self._saved_step  # step 0 too (an experiment's SFT job)
            for line in final_summary(self.run_dir.path, records, loss_mode=self.cfg.algorithm.loss_mode,
                                      steps=t.total_steps, minutes=seconds / 60, num_val=len(self.task.val_prompts()),
                                      checkpoint=self.run_dir.checkpoint(saved) if saved is not None else None,
                                      hf=self.run_dir.hf if t.export_hf else None,
                                      report=self.run_dir.report / "index.html" if t.report else None):
                console.say(line)
