"""One RL step, top to bottom:

    prompts -> rollout (vLLM: responses, rollout log-probs, rollout routing)           engine_link.py
    -> rewards -> group advantages (+ DAPO dynamic sampling, overlong shaping)           losses/advantages.py
    -> pi_old: log-probs, entropy, trainer routing (router replay strategy)              megatron/actor.py
    -> diagnostics: train vs rollout routing, ratios per expert                          diagnostics/step.py
    -> update: epochs x mini-batches x micro-batches, the policy loss                     losses/policy.py
    -> weight sync actor -> engine                                                       engine_link.py

`RLStep` is handed its collaborators explicitly (actor, rollout client, task, diagnostics, router replay,
data-parallel group) and returns a `StepResult`; it keeps no state between steps.

Batch bookkeeping: every rank holds the whole step batch (the rollout client gives every rank the same
batch); each data-parallel rank computes on its rows of every mini-batch (`distributed.dp_rows`), padded with
masked dummy rows so all ranks run the same number of equally shaped micro-batches. Per-token results are
gathered back over DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

from upgrpo_megatron import faults
from upgrpo_megatron.distributed import DataParallel, dp_rows, gather_rows, take_rows, timer
from upgrpo_megatron.errors import TrainingStopped

Batch = Dict[str, torch.Tensor]


@dataclass
class StepResult:
    metrics: Dict[str, float]
    updates: int = 0          # optimizer updates attempted this step (0: dynamic sampling kept nothing)
    skipped_updates: int = 0  # of which skipped for a non-finite loss or gradient
    samples: List[dict] = field(default_factory=list)  # a few (prompt, response, reward, answer) rows to log

    @property
    def all_updates_skipped(self) -> bool:
        return self.updates > 0 and self.skipped_updates >= self.updates


class RLStep:
    def __init__(self, cfg, *, actor, rollout, task, diagnostics, replay, dp: DataParallel, weights,
                 reference=None):
        self.cfg, self.actor, self.rollout, self.task = cfg, actor, rollout, task
        self.diagnostics, self.replay, self.dp, self.weights = diagnostics, replay, dp, weights
        self.reference = reference  # ReferencePolicy or None

    def run(self, step: int) -> StepResult:
        cfg, m = self.cfg, {}
        m["actor/lr"] = self.actor.begin_rl_step()  # the schedule counts RL steps
        # actor updates the engine's weights lag behind (syncs happen after steps k, 2k, ...)
        m["rollout/staleness"] = float((step - 1) % cfg.rollout.sync_every)
        # 1. prompts and rollouts
        prompts = self.task.next_train_prompts(cfg.trainer.prompts_per_step)
        with timer(m, "rollout"):
            rollout = self.rollout.generate([p.prompt_ids for p in prompts], n=cfg.rollout.n,
                                            temperature=cfg.rollout.temperature,
                                            seed=cfg.trainer.seed * 100003 + step)
        if rollout.samples and rollout.samples[0].routing is not None:  # how much routing the fallback gave
            m["rollout/routing_replayed_frac"] = sum(s.routing_replayed for s in rollout.samples) / len(rollout)
        if rollout.weight_version != self.rollout.weight_version:
            raise TrainingStopped(f"rollout used weight version {rollout.weight_version}, actor is at "
                                  f"{self.rollout.weight_version}: the weight sync did not reach the engine")
        # 2. rewards, 3. advantages
        texts, scores, rewards = self._rewards(prompts, rollout, m, step)
        correct = torch.tensor([float(self.task.is_correct(float(x))) for x in scores])
        keep, adv = self._advantages(rewards, correct, rollout, m)
        samples = self._samples(prompts, rollout, texts, scores)
        if not keep:  # every group was all-right or all-wrong: nothing to learn from this step
            self._sync(m, step)
            return StepResult(m, samples=samples)
        from upgrpo_megatron.rollout.batch import training_batch

        batch = training_batch(rollout, [p.prompt_ids for p in prompts], keep, adv,
                               max_prompt_length=cfg.data.max_prompt_length,
                               max_response_length=cfg.data.max_response_length,
                               pad_token_id=self.task.tokenizer.pad_token_id,
                               num_moe_layers=self.actor.num_moe_layers, topk=cfg.model.moe_router_topk,
                               prompt_routing=self.replay.needs_prompt_routing)
        rollout.drop_routing()  # the batch's tensors hold it now: one copy, not two (sizing.step_batch_bytes)
        # 4. pi_old, 5. diagnostics, 6. update, 7. weight sync
        with timer(m, "old_log_prob"):
            self._old_log_prob(batch)
        if self.reference is not None:
            with timer(m, "ref_log_prob"):
                self._ref_log_prob(batch)
        diag = None
        if cfg.diagnostics.enabled:  # trainer pi_old vs the engine: before pi_old's source is chosen
            with timer(m, "diagnostics"):
                diag = self.diagnostics.rollout_vs_train(batch, step=step)
                m.update(diag)
        if cfg.correction.mode != "none":
            m.update(self._correction(batch))
        if cfg.algorithm.old_log_prob == "rollout":
            # bypass mode (verl rollout correction, slime --use-rollout-logprobs): the loss's ratio is
            # pi_theta / pi_rollout, so the train-inference mismatch enters it
            batch["old_log_prob"] = batch["rollout_log_prob"]
        with timer(m, "update"):
            updates, skipped = self._update(batch, step, m, collect_drift=diag is not None)
        faults.maybe_corrupt_weights(self.actor.module, step)
        if diag is not None:
            m.update(self.diagnostics.finish_drift(step=step))
        self._sync(m, step)
        return StepResult(m, updates=updates, skipped_updates=skipped, samples=samples)

    # ------------------------------------------------------------------------------------------ pieces
    def _rewards(self, prompts, rollout, m, step: int = 0):
        from upgrpo_megatron.losses import overlong_reward_penalty

        cfg, alg = self.cfg, self.cfg.algorithm
        with timer(m, "reward"):
            texts = [self.task.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in rollout.samples]
            scores = faults.maybe_zero_rewards(torch.tensor([self.task.reward(t, prompts[s.prompt_index].answer)
                                                             for t, s in zip(texts, rollout.samples)],
                                                            dtype=torch.float32), step)
            lengths = torch.tensor([len(s.response_ids) for s in rollout.samples], dtype=torch.float32)
            rewards = scores.clone()
            if alg.overlong_buffer_len > 0:
                rewards = rewards + overlong_reward_penalty(
                    lengths, max_response_length=cfg.data.max_response_length, buffer_len=alg.overlong_buffer_len,
                    penalty_factor=alg.overlong_penalty_factor)
        m.update({"critic/score/mean": scores.mean().item(), "critic/rewards/mean": rewards.mean().item(),
                  "response_length/mean": lengths.mean().item(), "response_length/max": lengths.max().item(),
                  "response_length/clip_ratio": (lengths >= cfg.data.max_response_length).float().mean().item()})
        return texts, scores, rewards

    def _advantages(self, rewards, correct, rollout, m):
        from upgrpo_megatron.losses import compute_grpo_advantages, dynamic_sampling_filter

        alg = self.cfg.algorithm
        group = torch.tensor([s.prompt_index for s in rollout.samples])
        adv = compute_grpo_advantages(rewards, group, norm_by_std=alg.norm_adv_by_std)
        keep = torch.arange(len(rollout.samples))
        if alg.dynamic_sampling:
            # DAPO filters on the verifier's verdict, not on the shaped reward: length penalties would keep an
            # all-wrong group alive and give its shortest wrong answer A > 0
            keep, n_dropped = dynamic_sampling_filter(correct, group)
            m["dapo/dropped_groups"] = float(n_dropped)
        keep = [int(i) for i in keep]
        m["dapo/kept_samples"] = float(len(keep))
        return keep, adv

    def _samples(self, prompts, rollout, texts, scores) -> List[dict]:
        k = self.cfg.trainer.samples_per_step
        return [{"prompt": prompts[s.prompt_index].text, "response": t, "reward": float(r),
                 "answer": prompts[s.prompt_index].answer}
                for s, t, r in list(zip(rollout.samples, texts, scores))[:k]]

    def _old_log_prob(self, batch: Batch) -> None:
        """pi_old log-probs, entropy and trainer routing of every row (this rank computes its rows)."""
        n, dp = batch["input_ids"].shape[0], self.dp
        rows = dp_rows(n, dp.rank, dp.size)
        local = take_rows(batch, rows)
        old = self.replay.old_log_prob(self.actor, local, self.cfg.actor.micro_batch_size)
        batch["old_log_prob"] = gather_rows(old["log_prob"], n, dp.size, dp.group)
        batch["old_entropy"] = gather_rows(old["entropy"], n, dp.size, dp.group)
        batch["routing"] = gather_rows(old["routing"], n, dp.size, dp.group)
        if "replay" in local:
            batch["replay"] = gather_rows(local["replay"], n, dp.size, dp.group)
        batch.pop("rollout_prompt_routing", None)  # R3 has merged it into "replay": not carried into the update

    def _correction(self, batch: Batch) -> Dict[str, float]:
        """Per-token weights from the engine-vs-trainer ratio w = pi_old(trainer) / pi_rollout, or from the two
        routings (correction.mode); they multiply the per-token policy loss."""
        from upgrpo_megatron.losses import apply_correction

        c = self.cfg.correction
        options = {"tis": dict(cap=c.tis_cap), "icepop": dict(low=c.icepop_low, high=c.icepop_high),
                   "seq_mask_is": dict(low=c.seq_low, high=c.seq_high),
                   "routing_mask": dict(min_layers=c.routing_min_layers, alpha=c.routing_weight,
                                        only_negative=c.routing_only_negative)}[c.mode]
        weights, metrics = apply_correction(
            c.mode, batch["response_mask"], trainer_log_prob=batch["old_log_prob"],
            rollout_log_prob=batch["rollout_log_prob"], train_routing=batch["routing"],
            rollout_routing=batch["rollout_routing"], advantages=batch["advantages"], **options)
        batch["correction_weight"] = weights
        return {f"correction/{k}": v for k, v in metrics.items()}

    def _ref_log_prob(self, batch: Batch) -> None:
        n, dp = batch["input_ids"].shape[0], self.dp
        rows = dp_rows(n, dp.rank, dp.size)
        act = self.cfg.actor
        ref = self.reference.log_prob(take_rows(batch, rows), act.micro_batch_size, act.micro_batch_tokens)
        batch["ref_log_prob"] = gather_rows(ref, n, dp.size, dp.group)

    def _loss_fn(self, step: int, normaliser: Dict[str, float]):
        from upgrpo_megatron.losses import agg_loss, compute_policy_loss, kl_penalty

        alg = self.cfg.algorithm

        def loss_fn(mb, log_prob, entropy):
            loss, lm = compute_policy_loss(
                mb["old_log_prob"], log_prob, mb["advantages"], mb["response_mask"], loss_mode=alg.loss_mode,
                clip_ratio_low=alg.clip_ratio_low, clip_ratio_high=alg.clip_ratio_high,
                clip_ratio_c=alg.clip_ratio_c, loss_agg_mode=alg.loss_agg_mode,
                token_weights=mb.get("correction_weight"), **normaliser)
            # pg_loss is logged per token of this micro-batch (the aggregated loss is scaled by the global count)
            local_tokens = float(mb["response_mask"].sum())
            scale = normaliser["global_token_count"] / local_tokens if local_tokens else 0.0
            out = {"actor/pg_loss": loss.item() * scale,
                   **{f"actor/{k}" if "/" not in k else k: v for k, v in lm.items()}}
            if alg.entropy_coeff:
                loss = loss - alg.entropy_coeff * agg_loss(entropy, mb["response_mask"], alg.loss_agg_mode,
                                                           **normaliser)
            if "ref_log_prob" in mb:  # KL(pi_theta || pi_ref), logged always, in the loss with kl_loss_coef > 0
                kl = kl_penalty(log_prob, mb["ref_log_prob"], alg.kl_loss_type)
                kl_loss = agg_loss(kl, mb["response_mask"], alg.loss_agg_mode, **normaliser)
                out["actor/kl_loss"] = kl_loss.item() * scale
                out["actor/kl_coef"] = alg.kl_loss_coef
                if alg.kl_loss_coef:
                    loss = loss + alg.kl_loss_coef * kl_loss
            tok = mb["response_mask"].sum().clamp(min=1)
            out["actor/entropy"] = ((entropy.detach() * mb["response_mask"]).sum() / tok).item()
            return faults.corrupt_loss(loss, log_prob, step), out

        return loss_fn

    def _update(self, batch: Batch, step: int, m: Dict[str, float], *, collect_drift: bool):
        """epochs x mini-batches (whole groups) x micro-batches; one optimizer update per mini-batch."""
        from upgrpo_megatron.megatron.actor import split_micro_batches

        cfg, act, dp = self.cfg, self.cfg.actor, self.dp
        groups = batch["group"].unique()
        n_mini = max(1, math.ceil(len(groups) / act.ppo_mini_batch_size))
        collected: Dict[str, list] = {}
        g = torch.Generator().manual_seed(cfg.trainer.seed * 7919 + step)
        drift_on = collect_drift and cfg.diagnostics.routing_drift
        n_update = 0
        for epoch in range(act.ppo_epochs):
            order = groups[torch.randperm(len(groups), generator=g)]
            for chunk in torch.tensor_split(order, n_mini):
                mini_rows = torch.nonzero(torch.isin(batch["group"], chunk)).flatten()
                mini = {k: v[mini_rows] for k, v in batch.items()}
                local_rows = dp_rows(len(mini_rows), dp.rank, dp.size)
                local = take_rows(mini, local_rows)
                drift = self.diagnostics.drift_collector(epoch) if drift_on else None
                sm = self.actor.train_step(
                    split_micro_batches(local, torch.arange(len(local_rows)), act.micro_batch_size,
                                        act.micro_batch_tokens),
                    self._loss_fn(step, _normaliser(mini["response_mask"])),
                    replay_key=self.replay.update_key,
                    record_routing=drift is not None and self.replay.records_drift,
                    on_micro_batch=drift,
                )
                for k, v in sm.items():
                    collected.setdefault(k, []).append(v)
                    if n_update > 0 and k in LATE_METRICS:  # r == 1 in the first update (pi_old = pi_theta)
                        collected.setdefault(f"late/{k}", []).append(v)
                n_update += 1
        for k, v in collected.items():
            vals = [x for x in v if x is not None and math.isfinite(x)]
            m[k] = float(np.mean(vals)) if vals else float("nan")
        skipped = collected.get("actor/skipped_step", [])
        m["actor/skipped_steps"] = float(sum(skipped))
        m["actor/updates"] = float(len(skipped))
        return len(skipped), int(sum(skipped))

    def _sync(self, m: Dict[str, float], step: int) -> None:
        """Sync the engine every `rollout.sync_every` steps; in between it keeps generating from stale weights."""
        if step % self.cfg.rollout.sync_every == 0:
            with timer(m, "weight_sync"):
                self.rollout.sync(self.weights)


# update metrics that are trivial in a step's first update when pi_old is the trainer's (r == 1 there): also
# logged over the later updates only, as late/<name>
LATE_METRICS = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl", "up/pos_ratio_above_clip_frac",
                "pos/ratio_above_clip_frac", "neg/pg_clipfrac", "ratio/pos_var", "ratio/neg_var")


def _normaliser(mask: torch.Tensor) -> Dict[str, float]:
    """Global (mini-batch, all DP ranks) token and sequence counts: summing micro-batch losses then equals
    the one-big-batch loss."""
    return {"global_token_count": float(mask.sum()), "global_seq_count": float((mask.sum(1) > 0).sum())}

