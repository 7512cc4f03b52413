"""torchrun worker: `gather_rows` reassembles every rank's rows of a step batch (the inverse of `dp_rows`), for
each dtype the step gathers: float32 log-probs, int64, and int16 expert ids (which gloo and NCCL cannot send as
such). Writes JSON to --out (rank 0): per dtype, whether the gathered tensor equals the whole one."""
import argparse
import json

import torch
import torch.distributed as dist

from upgrpo_megatron.distributed import dp_rows, gather_rows, take_rows

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
a = ap.parse_args()

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
n = 7  # not a multiple of the world size: the last rank pads with a dummy row
g = torch.Generator().manual_seed(0)
whole = {"routing": torch.randint(-1, 300, (n, 5, 3, 2), generator=g).to(torch.int16),
         "log_prob": torch.randn(n, 5, generator=g), "ids": torch.randint(0, 10**12, (n, 5), generator=g),
         "response_mask": torch.ones(n, 5)}
local = take_rows(whole, dp_rows(n, rank, size))
result = {}
for key in ("routing", "log_prob", "ids"):
    got = gather_rows(local[key], n, size)
    result[key] = {"dtype": str(got.dtype), "equal": bool(torch.equal(got, whole[key]))}
if rank == 0:
    with open(a.out, "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
