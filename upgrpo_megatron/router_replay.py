"""Router replay strategies (`algorithm.router_replay`): which routing the actor uses for pi_old and the update.

    none  the trainer routes freely in every pass (pi_old pass records its routing for the diagnostics)
    R2    "routing replay" (as in slime/verl): the update replays the routing the trainer chose at pi_old, so
          the update's ratio compares the same experts (routing drift during the update is removed)
    R3    "rollout routing replay" (Ma et al. 2025): pi_old and the update replay the routing the ROLLOUT
          ENGINE chose at every position it computed (prompt + response but the last response token, which
          scores nothing and keeps the trainer's routing), so train and inference compute the same experts

A strategy prepares this rank's batch for the pi_old pass and says which key the update replays. It talks to
the actor only through `full_routing` and `compute_log_prob` (tensors `[batch, seq, moe_layers, topk]`).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

Batch = Dict[str, torch.Tensor]


class NoReplay:
    name = "none"
    update_key: Optional[str] = None  # the batch key the update replays (None: route freely)
    records_drift = True              # the update's own routing can be recorded and compared with pi_old's
    needs_prompt_routing = False      # the engine's routing of the prompt positions (rollout_prompt_routing)

    def old_log_prob(self, actor, local: Batch, micro_batch_size: int) -> Batch:
        """pi_old pass: log-prob, entropy and the trainer's routing of every response token."""
        return actor.compute_log_prob(local, micro_batch_size, record_routing=True)


class ReplayTrainerRouting(NoReplay):
    name = "R2"
    update_key = "replay"
    records_drift = False

    def old_log_prob(self, actor, local: Batch, micro_batch_size: int) -> Batch:
        # one pass: pi_old and the routing of every position, which the update then replays
        old = actor.compute_log_prob(local, micro_batch_size, record_routing=True, keep_full_routing=True)
        local["replay"] = old.pop("full_routing")
        return old


class ReplayRolloutRouting(NoReplay):
    name = "R3"
    update_key = "replay"
    records_drift = False
    needs_prompt_routing = True  # the batch must carry rollout_prompt_routing

    def old_log_prob(self, actor, local: Batch, micro_batch_size: int) -> Batch:
        # two passes: the trainer's own routing (recorded for the diagnostics, and kept where the engine has none),
        # then pi_old under the engine's routing
        old = actor.compute_log_prob(local, micro_batch_size, record_routing=True, keep_full_routing=True)
        local["replay"] = merge_rollout_routing(old.pop("full_routing"), local)
        replayed = actor.compute_log_prob(local, micro_batch_size, record_routing=False, replay_key="replay")
        old["log_prob"] = replayed["log_prob"]
        return old


ROUTER_REPLAY = {s.name: s for s in (NoReplay, ReplayTrainerRouting, ReplayRolloutRouting)}


def get_router_replay(name: str) -> NoReplay:
    if name not in ROUTER_REPLAY:
        raise ValueError(f"algorithm.router_replay={name!r}: choose one of {', '.join(ROUTER_REPLAY)}")
    return ROUTER_REPLAY[name]()


def merge_rollout_routing(full: torch.Tensor, local: Batch) -> torch.Tensor:
    """R3: the rollout engine's routing at every position it computed, the trainer's own elsewhere.

    full: `[batch, seq, moe_layers, topk]` trainer routing of every input position; local["rollout_routing"]:
    `[batch, response_len, moe_layers, topk]`, row t = input position prompt_len - 1 + t; optional
    local["rollout_prompt_routing"]: `[batch, prompt_width, moe_layers, topk]`, row j = position j <
    prompt_len - 1. -1 marks a position not captured: it keeps the trainer's routing (so does every position
    when a sample's routing is missing)."""
    out = full.clone()
    prompt_rr = local.get("rollout_prompt_routing")
    for i in range(out.shape[0]):
        p = int(local["prompt_lens"][i])
        m = int(local["response_mask"][i].sum())
        parts = [(p - 1, local["rollout_routing"][i, :m])] if m else []
        if prompt_rr is not None and p > 1:
            parts.append((0, prompt_rr[i, : p - 1]))
        for start, rr in parts:
            ok = (rr >= 0).flatten(1).all(-1)  # positions whose every layer was captured
            out[i, start : start + len(rr)][ok] = rr[ok].to(out.dtype)
    return out
