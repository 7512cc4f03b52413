"""torchrun worker: one parallel layout, identical canonical weights -> log-probs, entropies, gradients.

Run: torchrun --nproc_per_node=N worker_layouts.py --tp T --ep E --weights W.pt --inputs I.pt --out O.pt
Rank 0 writes {"log_prob", "entropy", "grads": {canonical name: full grad}} to --out.
"""
import argparse

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

from upgrpo_megatron.config import model_config_from_dict
from upgrpo_megatron.megatron.logprobs import sequence_log_probs
from upgrpo_megatron.megatron.model import build_gpt_model
from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel
from upgrpo_megatron.megatron.sharding import iter_full_grads, load_full_state_dict

ap = argparse.ArgumentParser()
ap.add_argument("--tp", type=int, default=1)
ap.add_argument("--ep", type=int, default=1)
ap.add_argument("--etp", type=int, default=1)
ap.add_argument("--weights", required=True)
ap.add_argument("--inputs", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()

blob = torch.load(a.weights, weights_only=True)
model_cfg, full = model_config_from_dict(blob["model_cfg"], a.weights), blob["state_dict"]
sp = a.tp > 1
init_model_parallel(ParallelSizes(tp=a.tp, ep=a.ep, etp=a.etp, sequence_parallel=sp))
model = build_gpt_model(model_cfg, tp=a.tp, ep=a.ep, etp=a.etp, sequence_parallel=sp)
load_full_state_dict(model, full)
ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)

ids = torch.load(a.inputs, weights_only=True)  # [batch, seq]; the same batch on every rank
pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
# the actor's path: log-prob/entropy computed inside the model on vocab-parallel, sequence-first logits
out = ddp(ids, pos, None, labels=torch.nn.functional.pad(ids[:, 1:], (0, 1)))
log_prob, entropy = out[:, :-1, 0], out[:, :-1, 1]
with torch.no_grad():  # and the plain-logits path gives the same numbers
    lp2, ent2 = sequence_log_probs(ddp(ids, pos, None), ids)
    torch.testing.assert_close(lp2, log_prob.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent2, entropy.detach(), rtol=1e-5, atol=1e-5)
# a loss that sends gradient through both outputs and every position
loss = -(log_prob.mean()) + 0.1 * entropy.mean()
loss.backward()
finalize_model_grads([ddp])
grads = dict(iter_full_grads(model))
if torch.distributed.get_rank() == 0:
    torch.save({"log_prob": log_prob.detach(), "entropy": entropy.detach(), "grads": grads}, a.out)
torch.distributed.barrier()
torch.distributed.destroy_process_group()
