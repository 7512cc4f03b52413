"""One RL step, in the order of DESIGN.md's data flow. Called by `Trainer.rl_step`.

Batch bookkeeping: every rank holds the whole step batch (it is broadcast from the engine's rank); each
data-parallel rank computes on its rows of every mini-batch (rows r, r + dp, ...), padded with masked dummy
rows so that all ranks run the same number of equally shaped micro-batches (MoE dispatch and TP/SP are
collectives inside the forward pass). Per-token results are all-gathered back over DP.
"""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from upgrpo_megatron import faults
from upgrpo_megatron.trainer import TrainingStopped, pad_right, timer


def _dp_rows(n: int, dp_rank: int, dp_size: int) -> torch.Tensor:
    """This rank's rows of n, padded to ceil(n / dp) with -1 (a masked dummy row)."""
    per = math.ceil(n / dp_size) if n else 0
    rows = list(range(dp_rank, n, dp_size))
    return torch.tensor(rows + [-1] * (per - len(rows)), dtype=torch.long)


def _take(batch: Dict[str, torch.Tensor], rows: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Rows of the batch; row -1 becomes a copy of row 0 with its response mask zeroed."""
    safe = rows.clamp(min=0)
    out = {k: v[safe] for k, v in batch.items()}
    dummy = rows < 0
    if dummy.any():
        out["response_mask"] = out["response_mask"].clone()
        out["response_mask"][dummy] = 0
    return out


def _gather_dp(t: torch.Tensor, rows: torch.Tensor, n: int, tr) -> torch.Tensor:
    """Inverse of the DP row split: every rank gets the full `[n, ...]` tensor."""
    from megatron.core import parallel_state as ps

    if tr.dp_size == 1:
        return t[: n]
    parts = [torch.empty_like(t) for _ in range(tr.dp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_data_parallel_group())
    out = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
    for r, p in enumerate(parts):
        rws = _dp_rows(n, r, tr.dp_size)
        keep = rws >= 0
        out[rws[keep]] = p[keep]
    return out


def build_batch(tr, prompts, rollout, advantages_per_sample: torch.Tensor, keep: List[int]) -> Dict[str, torch.Tensor]:
    """Tensors for the kept samples: prompt+response ids, masks, advantages, rollout log-probs and routing."""
    R = tr.cfg.data.max_response_length
    samples = [rollout.samples[i] for i in keep]
    seqs = [prompts[s.prompt_index].prompt_ids + list(s.response_ids) for s in samples]
    S = tr.cfg.data.max_prompt_length + R
    input_ids = pad_right(seqs, tr.tokenizer.pad_token_id, length=S)
    n = len(samples)
    mask = torch.zeros(n, R)
    rollout_lp = torch.zeros(n, R)
    L, k = tr.actor.num_moe_layers, tr.cfg.model.moe_router_topk
    rollout_routing = torch.full((n, R, L, k), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        m = len(s.response_ids)
        mask[i, :m] = 1
        rollout_lp[i, :m] = torch.as_tensor(s.log_probs[:m], dtype=torch.float32)
        if s.routing is not None and len(s.routing):
            rollout_routing[i, :m] = torch.as_tensor(np.asarray(s.routing)[:m], dtype=torch.long)
    adv = advantages_per_sample[keep].unsqueeze(1).expand(n, R) * mask
    return {
        "input_ids": input_ids,
        "prompt_lens": torch.tensor([len(prompts[s.prompt_index].prompt_ids) for s in samples]),
        "response_mask": mask,
        "advantages": adv.contiguous(),
        "rollout_log_prob": rollout_lp,
        "rollout_routing": rollout_routing,
        "group": torch.tensor([s.prompt_index for s in samples]),
    }


def run_rl_step(tr) -> Dict[str, float]:
    from upgrpo_megatron.losses import (
        compute_grpo_advantages,
        compute_policy_loss,
        dynamic_sampling_filter,
        overlong_reward_penalty,
    )

    cfg, m = tr.cfg, {}
    alg, act = cfg.algorithm, cfg.actor
    n = cfg.rollout.n

    # 1. prompts and rollouts ------------------------------------------------------------------------------
    prompts = tr.task.next_train_prompts(cfg.trainer.prompts_per_step)
    with timer(m, "rollout"):
        try:
            rollout = tr._generate([p.prompt_ids for p in prompts], n=n, temperature=cfg.rollout.temperature,
                                   seed=cfg.trainer.seed * 100003 + tr.step)
        except TrainingStopped as e:
            e.before_update = True  # the actor is still at the previous step's (checkpointable) state
            raise
    if rollout.weight_version != tr.weight_version:
        raise TrainingStopped(f"rollout used weight version {rollout.weight_version}, actor is at "
                              f"{tr.weight_version}: the weight sync did not reach the engine")

    # 2. rewards (+ DAPO overlong shaping) ------------------------------------------------------------------
    with timer(m, "reward"):
        texts = [tr.tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in rollout.samples]
        scores = torch.tensor([tr.task.reward(t, prompts[s.prompt_index].answer)
                               for t, s in zip(texts, rollout.samples)], dtype=torch.float32)
        lengths = torch.tensor([len(s.response_ids) for s in rollout.samples], dtype=torch.float32)
        rewards = scores.clone()
        if alg.overlong_buffer_len > 0:
            rewards = rewards + overlong_reward_penalty(lengths, max_response_length=cfg.data.max_response_length,
                                                        buffer_len=alg.overlong_buffer_len,
                                                        penalty_factor=alg.overlong_penalty_factor)
    group = torch.tensor([s.prompt_index for s in rollout.samples])
    m.update({"critic/score/mean": scores.mean().item(), "critic/rewards/mean": rewards.mean().item(),
              "response_length/mean": lengths.mean().item(), "response_length/max": lengths.max().item(),
              "response_length/clip_ratio": (lengths >= cfg.data.max_response_length).float().mean().item()})

    # 3. group advantages (+ DAPO dynamic sampling) ---------------------------------------------------------
    adv = compute_grpo_advantages(rewards, group, norm_by_std=alg.norm_adv_by_std)
    keep = torch.arange(len(rollout.samples))
    if alg.dynamic_sampling:
        keep, n_dropped = dynamic_sampling_filter(rewards, group)
        m["dapo/dropped_groups"] = float(n_dropped)
    keep = [int(i) for i in keep]
    m["dapo/kept_samples"] = float(len(keep))
    if not keep:  # every group was all-right or all-wrong: nothing to learn from this step
        tr._sync_weights(m)
        return m

    batch = build_batch(tr, prompts, rollout, adv, keep)
    N = batch["input_ids"].shape[0]
    mb_size = act.micro_batch_size

    # 4. pi_old: log-probs, entropy, trainer routing (RouterReplay RECORD) -----------------------------------
    with timer(m, "old_log_prob"):
        rows = _dp_rows(N, tr.dp_rank, tr.dp_size)
        local = _take(batch, rows)
        if alg.router_replay == "R3":
            full = tr.actor.full_routing(local["input_ids"], mb_size)
            local["replay"] = _merge_rollout_routing(full, local)
        old = tr.actor.compute_log_prob(local, mb_size, record_routing=True)
        if alg.router_replay == "R3":
            replayed = tr.actor.compute_log_prob(local, mb_size, record_routing=False, replay_key="replay")
            old["log_prob"] = replayed["log_prob"]
        if alg.router_replay == "R2":
            local["replay"] = tr.actor.full_routing(local["input_ids"], mb_size)
        batch["old_log_prob"] = _gather_dp(old["log_prob"], rows, N, tr)
        batch["old_entropy"] = _gather_dp(old["entropy"], rows, N, tr)
        batch["routing"] = _gather_dp(old["routing"], rows, N, tr)
        if "replay" in local:
            batch["replay"] = _gather_dp(local["replay"], rows, N, tr)

    # 5. diagnostics: train vs rollout routing, probability gap, ratios per expert ---------------------------
    diag = None
    if cfg.diagnostics.enabled:
        with timer(m, "diagnostics"):
            diag = tr.diagnostics.rollout_vs_train(batch, step=tr.step)
            m.update(diag)

    # 6. policy update: epochs x mini-batches x micro-batches ----------------------------------------------
    def loss_fn(mb, log_prob, entropy, normaliser):
        loss, lm = compute_policy_loss(
            mb["old_log_prob"], log_prob, mb["advantages"], mb["response_mask"], loss_mode=alg.loss_mode,
            clip_ratio_low=alg.clip_ratio_low, clip_ratio_high=alg.clip_ratio_high,
            clip_ratio_c=alg.clip_ratio_c, loss_agg_mode=alg.loss_agg_mode, **normaliser)
        # pg_loss is logged per token of this micro-batch (the aggregated loss is scaled by the global count)
        local_tokens = float(mb["response_mask"].sum())
        scale = normaliser["global_token_count"] / local_tokens if local_tokens else 0.0
        out = {"actor/pg_loss": loss.item() * scale, **{f"actor/{k}" if "/" not in k else k: v for k, v in lm.items()}}
        if alg.entropy_coeff:
            from upgrpo_megatron.losses import agg_loss

            ent = agg_loss(entropy, mb["response_mask"], alg.loss_agg_mode, **normaliser)
            loss = loss - alg.entropy_coeff * ent
        tok = mb["response_mask"].sum().clamp(min=1)
        out["actor/entropy"] = ((entropy.detach() * mb["response_mask"]).sum() / tok).item()
        return faults.corrupt_loss(loss, log_prob, tr.step), out

    groups = batch["group"].unique()
    n_mini = max(1, math.ceil(len(groups) / act.ppo_mini_batch_size))
    update_metrics: Dict[str, list] = {}
    g = torch.Generator().manual_seed(cfg.trainer.seed * 7919 + tr.step)
    with timer(m, "update"):
        for epoch in range(act.ppo_epochs):
            order = groups[torch.randperm(len(groups), generator=g)]
            for chunk in torch.tensor_split(order, n_mini):
                mini_rows = torch.nonzero(torch.isin(batch["group"], chunk)).flatten()
                mini = {k: v[mini_rows] for k, v in batch.items()}
                normaliser = _normaliser(mini["response_mask"], alg.loss_agg_mode)
                local_rows = _dp_rows(len(mini_rows), tr.dp_rank, tr.dp_size)
                local = _take(mini, local_rows)
                from upgrpo_megatron.megatron.actor import split_micro_batches

                drift = tr.diagnostics.drift_collector(epoch) if diag is not None and cfg.diagnostics.routing_drift else None
                sm = tr.actor.train_step(
                    split_micro_batches(local, torch.arange(len(local_rows)), mb_size),
                    lambda mb, lp, ent: loss_fn(mb, lp, ent, normaliser),
                    replay_key="replay" if alg.router_replay in ("R2", "R3") else None,
                    record_routing=drift is not None and alg.router_replay == "none",
                    on_micro_batch=drift,
                )
                for k, v in sm.items():
                    update_metrics.setdefault(k, []).append(v)
    for k, v in update_metrics.items():
        vals = [x for x in v if x is not None and math.isfinite(x)]
        m[k] = float(np.mean(vals)) if vals else float("nan")
    m["actor/skipped_steps"] = float(sum(update_metrics.get("actor/skipped_step", [0.0])))
    m["actor/updates"] = float(len(update_metrics.get("actor/skipped_step", [])))  # 0: dynamic sampling kept nothing
    if diag is not None:
        m.update(tr.diagnostics.finish_drift(step=tr.step))
    if m["actor/skipped_steps"] >= len(update_metrics.get("actor/skipped_step", [1])):
        tr.bad_steps += 1
        if tr.bad_steps >= act.max_bad_steps:  # the loop logs this step, checkpoints and stops
            tr.stop_reason = (f"{tr.bad_steps} consecutive steps had non-finite loss or gradients; stopped at "
                              f"step {tr.step} with a checkpoint of the last good weights (actor.max_bad_steps="
                              f"{act.max_bad_steps})")
    else:
        tr.bad_steps = 0
    m["actor/consecutive_bad_steps"] = float(tr.bad_steps)

    # 7. weight sync actor -> engine --------------------------------------------------------------------------
    tr._sync_weights(m)
    if tr.rank == 0:
        tr.record_samples(prompts, rollout, texts, scores)
    return m


def _merge_rollout_routing(full: torch.Tensor, local: Dict[str, torch.Tensor]) -> torch.Tensor:
    """R3: the rollout engine's routing at response positions, the trainer's own at prompt positions."""
    out = full.clone()
    R = local["response_mask"].shape[1]
    for i in range(out.shape[0]):
        p = int(local["prompt_lens"][i])
        m = int(local["response_mask"][i].sum())
        if m:
            rr = local["rollout_routing"][i, :m]
            valid = (rr >= 0).all()
            if valid:
                out[i, p : p + m] = rr
    return out


def _normaliser(mask: torch.Tensor, agg_mode: str) -> Dict[str, float]:
    """Global (mini-batch, all DP ranks) token and sequence counts: summing micro-batch losses then equals
    the one-big-batch loss."""
    return {"global_token_count": float(mask.sum()), "global_seq_count": float((mask.sum(1) > 0).sum())}
