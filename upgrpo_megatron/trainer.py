"""The RL loop, top to bottom. One `fit()` = optional SFT warm-up, then for each step:

    prompts -> rollout (vLLM: responses, rollout log-probs, rollout routing)
    -> rewards -> group advantages (+ DAPO dynamic sampling, overlong shaping)
    -> actor.compute_log_prob (pi_old log-probs, entropy, trainer routing via RouterReplay RECORD)
    -> diagnostics (train vs rollout routing, ratios per expert)
    -> actor update (epochs x mini-batches x micro-batches; loss from losses/; routing drift vs pi_old)
    -> weight sync actor -> vLLM -> eval every k steps -> metrics -> checkpoint.

Engine placement: one vLLM engine, driven by global rank 0, generates the whole step's rollouts; the batch
is broadcast and each data-parallel rank trains on its own rows (rows r, r + dp, ...). All ranks join the
weight gather (a collective over TP/EP groups); rank 0 streams the HF-named tensors into the engine.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from upgrpo_megatron.errors import RunDirError, TrainingStopped


# ----------------------------------------------------------------------------------------------- helpers
@contextmanager
def timer(metrics: Dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    metrics[f"timing_s/{name}"] = metrics.get(f"timing_s/{name}", 0.0) + time.perf_counter() - t0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if _rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rng_state() -> dict:
    """RNG states as tensors and plain numbers only, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pad_right(rows: List[List[int]], pad: int, length: Optional[int] = None) -> torch.Tensor:
    length = length or max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(length, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:length], dtype=torch.long)
    return out


def dry_run(cfg, world_size: Optional[int]) -> str:
    """Validate a recipe for a given world size; the layout and a per-GPU memory estimate, as text."""
    from upgrpo_megatron.config import estimate_memory, format_layout_and_memory, validate_layout

    world = world_size or getattr(cfg.trainer, "world_size_hint", None) or 1
    layout = validate_layout(cfg, world)
    return format_layout_and_memory(cfg, layout, estimate_memory(cfg, layout))


# ----------------------------------------------------------------------------------------------- trainer
def lock_run_dir(d: Path):
    """Hold an exclusive lock on RUN_DIR/.lock for the life of this process, so that two trainers never
    write one run (a second start, a forgotten job). The kernel drops the lock when the process dies, even
    by SIGKILL, so a crashed run never leaves a stale lock behind."""
    import fcntl

    f = open(d / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"trainer.run_dir={d} is in use by {holder}; stop that run first or choose another "
                          f"trainer.run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f


class Trainer:
    def __init__(self, cfg):
        from upgrpo_megatron.config import save_resolved, validate_layout
        from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel

        self.cfg = cfg
        if not torch.cuda.is_available():  # before anything touches the run directory
            from upgrpo_megatron.config import validate_for_cpu_engine

            validate_for_cpu_engine(cfg)
        rank, world = init_distributed(cfg.parallel.backend)
        self.layout = validate_layout(cfg, world)
        self.rank, self.world = rank, world
        self.run_dir = Path(cfg.trainer.run_dir)
        self.resume_from = self._prepare_run_dir()
        seed_everything(cfg.trainer.seed)
        init_model_parallel(
            ParallelSizes(tp=self.layout.tp, ep=self.layout.ep, etp=self.layout.etp, pp=1,
                          sequence_parallel=self.layout.sequence_parallel),
            seed=cfg.trainer.seed, backend=cfg.parallel.backend,
        )
        from megatron.core import parallel_state as ps

        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()

        self._build_data()
        self._build_actor()
        from upgrpo_megatron.diagnostics.step import StepDiagnostics

        d = cfg.diagnostics
        self.diagnostics = StepDiagnostics(self.run_dir, num_experts=cfg.model.num_experts,
                                           clip_low=cfg.algorithm.clip_ratio_low, clip_high=cfg.algorithm.clip_ratio_high,
                                           taus=d.extreme_taus, threshold=d.log_prob_diff_threshold,
                                           save_every=d.save_every, enabled_writer=rank == 0)
        self.step = 0
        self.sft_done = False
        self.weight_version = 0
        self.bad_steps = 0
        self.stop_reason: Optional[str] = None  # set by a step after which training cannot go on
        self._stop_signal: Optional[int] = None
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
        elif self.rank == 0:
            print(f"starting {self.run_dir} from scratch (no complete checkpoint to resume)", flush=True)
        from upgrpo_megatron.metrics import MetricsLogger

        # the logs keep exactly what the checkpoint covers: steps <= its step, or nothing without one (a run
        # killed before its first checkpoint starts over), so no step is ever duplicated or missing
        keep_through = self.step if self.resume_from is not None else None
        self.metrics = MetricsLogger(self.run_dir, tensorboard=cfg.trainer.tensorboard,
                                     keep_through=keep_through) if self.rank == 0 else None
        if self.rank == 0:
            from upgrpo_megatron.diagnostics.storage import truncate_run_files

            truncate_run_files(self.run_dir, keep_through)
        self._saved_step: Optional[int] = self.step if self.resume_from is not None else None
        if self.rank == 0:  # only now that every input checked out
            kept = save_resolved(cfg, self.run_dir / "config.yaml", step=self.step)
            if kept is not None:
                print(f"the config differs from the run's previous one; that one is kept as {kept}", flush=True)
        self.engine = None

    # --------------------------------------------------------------------------------------- setup
    def _prepare_run_dir(self) -> Optional[Path]:
        """Decide between a fresh run and a resume; refuse to overwrite an existing run."""
        from upgrpo_megatron.megatron.checkpoint import latest_complete_checkpoint

        resume = str(self.cfg.trainer.resume)
        d = self.run_dir
        exists = d.exists() and any(d.iterdir())
        if resume not in ("auto", "never"):
            path = Path(resume)
            if not path.exists():
                raise RunDirError(f"trainer.resume={resume}: no such checkpoint directory")
            return path
        # rank 0 decides (it may restore an interrupted re-save); the other ranks take its answer
        ckpt = latest_complete_checkpoint(d / "checkpoints") if exists and self.rank == 0 else None
        ckpt = broadcast_object(ckpt)
        if resume == "never" and exists:
            raise RunDirError(f"run directory {d} already exists and is not empty; set trainer.resume=auto to "
                              f"continue it or choose another trainer.run_dir")
        if self.rank == 0:
            try:
                d.mkdir(parents=True, exist_ok=True)
                probe = d / f".write-test-{os.getpid()}"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise RunDirError(f"trainer.run_dir={d} is not writable: {e.strerror}") from None
            self._lock = lock_run_dir(d)
        if dist.is_initialized():
            dist.barrier()
        return ckpt

    def _build_data(self):
        from upgrpo_megatron.data import build_task

        self.task = build_task(self.cfg, self.run_dir)
        self.tokenizer = self.task.tokenizer
        if len(self.tokenizer) > self.cfg.model.vocab_size:
            from upgrpo_megatron.config import ConfigError

            raise ConfigError(f"model.vocab_size={self.cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{len(self.tokenizer)} tokens")

    def _build_actor(self):
        from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings

        a, t = self.cfg.actor, self.cfg.trainer
        self.actor = MegatronActor(
            self.cfg.model, tp=self.layout.tp, ep=self.layout.ep, etp=self.layout.etp,
            sequence_parallel=self.layout.sequence_parallel, dtype=self.cfg.model.dtype,
            optim=OptimSettings(lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay, betas=tuple(a.betas),
                                grad_clip=a.grad_clip, lr_warmup_steps=a.lr_warmup_steps,
                                lr_schedule=a.lr_schedule, total_steps=t.total_steps),
        )
        if self.cfg.model.hf_path:
            from upgrpo_megatron.convert import load_hf_into_model

            load_hf_into_model(self.cfg.model.hf_path, self.actor.module)

    # --------------------------------------------------------------------------------------- weights
    def _hf_weights(self):
        """Stream (hf_name, tensor) of the actor's full weights; collective over all ranks."""
        from upgrpo_megatron.convert import megatron_to_hf_stream
        from upgrpo_megatron.megatron.sharding import iter_full_params

        return megatron_to_hf_stream(self.cfg.model, iter_full_params(self.actor.module))

    def _start_engine(self):
        """Export the current weights once as an HF directory and start vLLM on rank 0."""
        from upgrpo_megatron.convert import save_hf_checkpoint

        hf_dir = self.run_dir / "engine_init"
        weights = list(self._hf_weights())  # collective: every rank iterates
        if self.rank == 0:
            if hf_dir.exists():
                shutil.rmtree(hf_dir)
            save_hf_checkpoint(self.cfg.model, iter(weights), hf_dir, tokenizer=self.tokenizer)
            from upgrpo_megatron.rollout import RolloutEngine

            r = self.cfg.rollout
            self.engine = RolloutEngine(
                str(hf_dir), dtype={"fp32": "float32", "bf16": "bfloat16"}.get(r.dtype, r.dtype),
                seed=self.cfg.trainer.seed,
                max_model_len=self.cfg.data.max_prompt_length + self.cfg.data.max_response_length,
                kv_cache_gib=r.kv_cache_gib, enforce_eager=r.enforce_eager, capture_routing=r.capture_routing,
            )
            # the engine starts from the weights just exported: on resume that is the checkpoint's version
            self.engine.weight_version = self.weight_version
        del weights

    def _sync_weights(self, metrics):
        with timer(metrics, "weight_sync"):
            stream = self._hf_weights()
            self.weight_version += 1
            if self.rank == 0:
                self.engine.update_weights(stream, version=self.weight_version)
            else:
                for _ in stream:  # take part in the gathers
                    pass

    # --------------------------------------------------------------------------------------- rollout
    def _generate(self, prompt_ids: List[List[int]], *, n: int, temperature: float, seed: int):
        r, d = self.cfg.rollout, self.cfg.data
        out = None
        if self.rank == 0:
            from upgrpo_megatron.rollout import RolloutError

            try:
                out = self.engine.generate(
                    prompt_ids, n=n, temperature=temperature, top_p=r.top_p if temperature > 0 else 1.0,
                    top_k=r.top_k if temperature > 0 else -1, max_tokens=d.max_response_length,
                    stop_token_ids=[self.tokenizer.eos_token_id], seed=seed,
                )
            except RolloutError as e:
                out = e
        out = broadcast_object(out)
        if isinstance(out, Exception):
            raise TrainingStopped(f"rollout engine failed: {out}")
        return out

    def evaluate(self) -> Dict[str, float]:
        """Greedy accuracy on the held-out split."""
        val = self.task.val_prompts()
        r = self.cfg.rollout
        batch = self._generate([p.prompt_ids for p in val], n=r.val_n, temperature=r.val_temperature,
                               seed=self.cfg.trainer.seed)
        scores = [self.task.accuracy(self.tokenizer.decode(s.response_ids, skip_special_tokens=True), val[s.prompt_index].answer)
                  for s in batch.samples]
        return {"val/acc": float(np.mean(scores)) if scores else float("nan")}

    # --------------------------------------------------------------------------------------- SFT
    def sft_warmup(self):
        """Short supervised warm-up on (prompt, answer): accuracy starts above 0, below the ceiling."""
        s = self.cfg.sft_warmup
        if s.steps <= 0 or self.sft_done:
            return
        from upgrpo_megatron.megatron.actor import split_micro_batches
        from upgrpo_megatron.progress import progress

        saved_lr = [g["lr"] for g in self.actor.optimizer.param_groups]
        rng = np.random.default_rng(self.cfg.trainer.seed)
        examples = self.task.sft_examples()
        for it in progress(range(s.steps), desc="SFT warm-up", enabled=self.rank == 0):
            if self._stop_requested():
                return
            rows = rng.choice(len(examples), size=s.batch_size, replace=len(examples) < s.batch_size)
            rows = [examples[i] for i in rows][self.dp_rank :: self.dp_size]
            eos = self.tokenizer.eos_token_id
            seqs = [e.prompt_ids + e.answer_ids + [eos] for e in rows]
            R = max(len(e.answer_ids) + 1 for e in rows)
            resp_mask = torch.zeros(len(rows), R)
            for i, e in enumerate(rows):
                resp_mask[i, : len(e.answer_ids) + 1] = 1
            batch = {"input_ids": pad_right(seqs, self.tokenizer.pad_token_id),
                     "prompt_lens": torch.tensor([len(e.prompt_ids) for e in rows]), "response_mask": resp_mask}
            total = self._global_sum(resp_mask.sum())

            def loss_fn(mb, lp, ent):
                loss = -(lp * mb["response_mask"]).sum() / total
                return loss, {"sft/loss": loss.item() * total / mb["response_mask"].sum().clamp(min=1).item()}

            for g in self.actor.optimizer.param_groups:
                g["lr"] = s.lr
            m = self.actor.train_step(split_micro_batches(batch, torch.arange(len(rows)), self.cfg.actor.micro_batch_size), loss_fn)
            if self.metrics is not None and (it % 10 == 0 or it == s.steps - 1):
                self.metrics.log(-s.steps + it, {"sft/loss": m.get("sft/loss"), "sft/grad_norm": m["actor/grad_norm"]})
        for g, lr in zip(self.actor.optimizer.param_groups, saved_lr):
            g["lr"] = lr
        self.sft_done = True

    def _global_sum(self, x: torch.Tensor) -> float:
        """Sum over data-parallel ranks (the normaliser that makes micro-batching and DP exact)."""
        from megatron.core import parallel_state as ps

        t = torch.tensor([float(x)], dtype=torch.float64)
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        return float(t.item())

    # --------------------------------------------------------------------------------------- RL step
    def rl_step(self) -> Dict[str, float]:
        from upgrpo_megatron.rl_step import run_rl_step

        return run_rl_step(self)

    def record_samples(self, prompts, rollout, texts, scores):
        from upgrpo_megatron.diagnostics.step import append_samples

        k = self.cfg.trainer.samples_per_step
        rows = [{"prompt": prompts[s.prompt_index].text, "response": t, "reward": float(r),
                 "answer": prompts[s.prompt_index].answer} for s, t, r in list(zip(rollout.samples, texts, scores))[:k]]
        append_samples(self.run_dir, self.step, rows)

    # --------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self):
        from upgrpo_megatron.megatron.checkpoint import prune_checkpoints, save_checkpoint

        if self._saved_step == self.step:  # nothing changed since (e.g. a signal right after a periodic save)
            return

        extra = {"step": self.step, "sft_done": self.sft_done, "weight_version": self.weight_version,
                 "scheduler": self.actor.scheduler.state_dict(), "rng": rng_state(),
                 "data": self.task.state_dict()}
        path = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        save_checkpoint(path, self.actor.module, optimizer=self.actor.optimizer, extra_state=extra,
                        model_cfg=self.cfg.model, tokenizer=self.tokenizer if self.rank == 0 else None)
        self._saved_step = self.step
        if self.rank == 0:
            prune_checkpoints(self.run_dir / "checkpoints", keep=self.cfg.trainer.keep_checkpoints)

    def _load_checkpoint(self, path: Path):
        from upgrpo_megatron.megatron.checkpoint import load_checkpoint

        extra = load_checkpoint(path, self.actor.module, optimizer=self.actor.optimizer, model_cfg=self.cfg.model)
        self.step = int(extra["step"])
        self.sft_done = bool(extra.get("sft_done", True))
        self.weight_version = int(extra.get("weight_version", 0))
        self.actor.scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        self.task.load_state_dict(extra["data"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # --------------------------------------------------------------------------------------- fit
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT (ranks must stop at the same point)."""
        flag = torch.tensor([0.0 if self._stop_signal is None else float(self._stop_signal)])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self._stop_signal is None:
            self._stop_signal = int(flag.item())
        return flag.item() > 0

    def _stop_on_signal(self, where: str) -> bool:
        """After a signal: save the state (when there is one to save) and say so. Returns True to stop."""
        if not self._stop_requested():
            return False
        name = signal.Signals(self._stop_signal).name
        if self.sft_done:
            self._save_checkpoint()
            msg = (f"stopped by {name} {where}; checkpoint "
                   f"{self.run_dir / 'checkpoints' / f'step_{self.step:06d}'} saved, resume with trainer.resume=auto")
        else:
            msg = (f"stopped by {name} during the SFT warm-up; nothing to checkpoint yet "
                   f"(a restart repeats the warm-up)")
        if self.rank == 0:
            print(msg, flush=True)
        return True

    def fit(self):
        t = self.cfg.trainer
        prev = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        t_start = time.time()
        try:
            self.sft_warmup()
            if self._stop_on_signal("during the SFT warm-up"):
                return
            self._start_engine()
            if self._stop_on_signal(f"while the rollout engine started (step {self.step})"):
                return
            logged = broadcast_object(self.metrics.steps() if self.metrics is not None else None)
            if self.step == 0 and 0 not in logged:
                m = self.evaluate()
                if self.metrics is not None:
                    self.metrics.log(0, m)
                self.initial_val = m["val/acc"]
                if self.rank == 0:
                    print(f"val/acc after SFT warm-up: {m['val/acc']:.3f}", flush=True)
                self._save_checkpoint()
            from upgrpo_megatron.progress import progress

            for _ in progress(range(self.step, t.total_steps), desc="RL", enabled=self.rank == 0,
                              initial=self.step, total=t.total_steps):
                self.step += 1
                try:
                    m = self.rl_step()
                except TrainingStopped as e:
                    if getattr(e, "before_update", False):  # nothing of this step was applied yet
                        self.step -= 1
                        self._save_checkpoint()
                        raise TrainingStopped(f"{e}; the last good state (step {self.step}) is in "
                                              f"{self.run_dir / 'checkpoints'}") from e
                    raise
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.total_steps):
                    with timer(m, "eval"):
                        m.update(self.evaluate())
                if self.metrics is not None:
                    self.metrics.log(self.step, m)
                if self.step % t.save_every == 0 or self.step == t.total_steps or self.stop_reason:
                    self._save_checkpoint()
                if self.stop_reason:
                    raise TrainingStopped(self.stop_reason)
                if self._stop_on_signal(f"after step {self.step}"):
                    return
            self._finish(time.time() - t_start)
        finally:
            for s, h in prev.items():
                signal.signal(s, h)
            if self.engine is not None:
                self.engine.shutdown()
            if self.metrics is not None:
                self.metrics.close()

    def _finish(self, seconds: float):
        t = self.cfg.trainer
        if t.export_hf:
            from upgrpo_megatron.convert import save_hf_checkpoint

            weights = list(self._hf_weights())
            if self.rank == 0:
                save_hf_checkpoint(self.cfg.model, iter(weights), self.run_dir / "hf", tokenizer=self.tokenizer,
                                   overwrite=True)
        if self.rank == 0 and t.report:
            from upgrpo_megatron.diagnostics.report import render_report

            render_report(self.run_dir, self.run_dir / "report")
        if self.rank == 0:
            from upgrpo_megatron.metrics import read_metrics

            vals = [r["val/acc"] for r in read_metrics(self.run_dir) if r.get("val/acc") is not None]
            if vals:
                print(f"done in {seconds / 60:.1f} min: val/acc {vals[0]:.3f} after SFT warm-up -> "
                      f"{vals[-1]:.3f} after {t.total_steps} RL steps (peak {max(vals):.3f}); run dir {self.run_dir}",
                      flush=True)
