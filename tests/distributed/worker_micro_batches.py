"""torchrun worker: micro-batches packed by length (actor.micro_batch_tokens) when the ranks' rows differ.

Each data-parallel rank gets rows of other lengths, so on its own each would pack a different number of
micro-batches of different shapes; with EP the ranks must still run the same shapes (the CPU dispatcher
all-gathers tokens over the expert group; `micro_batches.plan` agrees them).
Writes JSON to --out (rank 0): the largest difference from the full-width pass over all ranks, and the update's
outcome.
"""
import argparse
import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

ap = argparse.ArgumentParser()
ap.add_argument("--tp", type=int, default=1)
ap.add_argument("--ep", type=int, default=1)
ap.add_argument("--out", required=True)
a = ap.parse_args()

from upgrpo_megatron.config import load_recipe  # noqa: E402
from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings, split_micro_batches  # noqa: E402
from upgrpo_megatron.megatron.micro_batches import group_rows, plan  # noqa: E402
from upgrpo_megatron.megatron.parallel import ParallelSizes, init_distributed, init_model_parallel  # noqa: E402

cfg = load_recipe("recipes/qwen_moe.yaml")
init_distributed("gloo")
init_model_parallel(ParallelSizes(tp=a.tp, ep=a.ep, sequence_parallel=a.tp > 1), seed=3)
actor = MegatronActor(cfg.model, tp=a.tp, ep=a.ep, sequence_parallel=a.tp > 1, optim=OptimSettings(lr=1e-3),
                      micro_batch_tokens=40)
rank = dist.get_rank()
dp_rank = ps.get_data_parallel_rank()  # the ranks of one TP group hold the same rows, as in the trainer
g = torch.Generator().manual_seed(10 + dp_rank)  # other lengths on every data-parallel rank
B, P, R = 10, 6, 10
prompt_lens = torch.randint(2, P + 1, (B,), generator=g)
resp = torch.randint(1, 4 if dp_rank == 0 else R + 1, (B,), generator=g)  # dp rank 0: short responses only
ids = torch.zeros(B, P + R, dtype=torch.long)
mask = torch.zeros(B, R)
for i in range(B):
    n = int(prompt_lens[i] + resp[i])
    ids[i, :n] = torch.randint(3, cfg.model.vocab_size, (n,), generator=g)
    mask[i, : int(resp[i])] = 1
batch = {"input_ids": ids, "prompt_lens": prompt_lens, "response_mask": mask}

own = len(group_rows(prompt_lens + resp, 8, 40))  # this rank's packing on its own
agreed = plan(batch, 8, 40)
with torch.no_grad():
    actor.model.eval()
    ref_lp, _, ref_routing, _ = actor._forward(ids, prompt_lens, R, record_routing=True, replay_routing=None)
got = actor.compute_log_prob(batch, 8)
m = mask.bool()
stats = torch.tensor([float((got["log_prob"][m] - ref_lp[m]).abs().max()),
                      float((got["routing"][m] != ref_routing[m]).any(-1).float().mean()), float(own)])
dist.all_reduce(stats, op=dist.ReduceOp.MAX)
counts = torch.tensor([float(own)])
dist.all_reduce(counts, op=dist.ReduceOp.MIN)
out = actor.train_step(split_micro_batches(batch, torch.arange(B), 8, 40),
                       lambda mb, lp, ent: (-(lp * mb["response_mask"]).sum() / 100.0, {}))
if rank == 0:
    json.dump({"max_lp_diff": stats[0].item(), "routing_diff_frac": stats[1].item(),
               "own_counts": [counts.item(), stats[2].item()], "agreed": len(agreed),
               "skipped": out["actor/skipped_step"], "grad_norm": out["actor/grad_norm"]}, open(a.out, "w"))
dist.barrier()
