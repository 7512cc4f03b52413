"""torchrun worker: megatron-core RouterReplay in our actor (the R2/R3 mechanism), at one layout.

Writes JSON to --out with what test_router_replay.py checks: replaying the trainer's own routing changes
nothing; replaying another routing changes the log-probs and the experts used; the same expert sets in
another top-k order give the same result (gate weights come from the trainer's logits); the router still
learns under replay.
"""
import argparse
import json

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--tp", type=int, default=1)
ap.add_argument("--ep", type=int, default=1)
ap.add_argument("--out", required=True)
a = ap.parse_args()

from upgrpo_megatron.config import load_recipe  # noqa: E402
from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings, split_micro_batches  # noqa: E402
from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel  # noqa: E402

cfg = load_recipe("recipes/qwen_moe.yaml")
init_distributed("gloo")
init_model_parallel(ParallelSizes(tp=a.tp, ep=a.ep, sequence_parallel=a.tp > 1), seed=3)
actor = MegatronActor(cfg.model, tp=a.tp, ep=a.ep, sequence_parallel=a.tp > 1, optim=OptimSettings(lr=1e-2))
g = torch.Generator().manual_seed(0)
B, P, R = 4, 6, 6
ids = torch.randint(3, cfg.model.vocab_size, (B, P + R), generator=g)
batch = {"input_ids": ids, "prompt_lens": torch.full((B,), P), "response_mask": torch.ones(B, R)}
E, K = cfg.model.num_experts, cfg.model.moe_router_topk

base = actor.compute_log_prob(batch, 8, record_routing=True, keep_full_routing=True)
own = base.pop("full_routing")                                        # [B, S, L, k] the trainer's routing
replay_own = actor.compute_log_prob({**batch, "replay": own}, 8, record_routing=False, replay_key="replay")
swapped = own.flip(-1)                                                # same expert sets, other top-k order
replay_swapped = actor.compute_log_prob({**batch, "replay": swapped}, 8, record_routing=False, replay_key="replay")
other = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(own[..., 0].numel())]).view_as(own)
replay_other = actor.compute_log_prob({**batch, "replay": other}, 8, record_routing=False, replay_key="replay")


def router_weights():
    return {n: p.detach().clone() for n, p in actor.module.named_parameters() if "router" in n}


before = router_weights()
m = actor.train_step(split_micro_batches({**batch, "replay": other}, torch.arange(B), 8),
                     lambda mb, lp, ent: (-(lp * mb["response_mask"]).mean(), {}), replay_key="replay")
after = router_weights()
resp_own = own[:, P - 1 : P - 1 + R]  # the positions that score the response
res = {
    "routing_matches_record": bool(torch.equal(base["routing"], resp_own)),
    "own_max_diff": float((replay_own["log_prob"] - base["log_prob"]).abs().max()),
    "swapped_max_diff": float((replay_swapped["log_prob"] - base["log_prob"]).abs().max()),
    "other_max_diff": float((replay_other["log_prob"] - base["log_prob"]).abs().max()),
    "other_changed_frac": float(
        (other[:, P - 1 : P - 1 + R].sort(-1).values != resp_own.sort(-1).values).any(-1).float().mean()
    ),
    "router_params": len(before),
    "router_update": max(float((after[n] - before[n]).abs().max()) for n in before) if before else 0.0,
    "skipped": m.get("actor/skipped_step"),
}
if torch.distributed.get_rank() == 0:
    json.dump(res, open(a.out, "w"))
