"""torchrun worker: what the step moves between ranks in host memory.

- `host_twin`: the group the trainer gathers over; under a default group that is not plain gloo (here
  "cpu:gloo", standing in for NCCL) a gloo group of the same ranks is created.
- `gather_rows` reassembles every rank's rows of a step batch (the inverse of `dp_rows`) over that group, for each
  dtype the step gathers: float32 log-probs, int64, and int16 expert ids (which gloo and NCCL cannot send as such).
- `objects_from`: the rollout's exchange, one broadcast per source rank, objects of different sizes.
Writes JSON to --out (rank 0)."""
import argparse
import json

import numpy as np
import torch
import torch.distributed as dist

from upgrpo_megatron.distributed import dp_rows, gather_rows, take_rows
from upgrpo_megatron.engine_link import objects_from
from upgrpo_megatron.megatron.parallel import host_twin

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="gloo")
ap.add_argument("--out", required=True)
a = ap.parse_args()

dist.init_process_group(a.backend)
rank, size = dist.get_rank(), dist.get_world_size()
group = host_twin(dist.group.WORLD)
result = {"twin_backend": dist.get_backend(group), "twin_is_world": group is dist.group.WORLD,
          "twin_ranks": dist.get_process_group_ranks(group)}
n = 7  # not a multiple of the world size: the last rank pads with a dummy row
g = torch.Generator().manual_seed(0)
whole = {"routing": torch.randint(-1, 300, (n, 5, 3, 2), generator=g).to(torch.int16),
         "log_prob": torch.randn(n, 5, generator=g), "ids": torch.randint(0, 10**12, (n, 5), generator=g),
         "response_mask": torch.ones(n, 5)}
local = take_rows(whole, dp_rows(n, rank, size))
for key in ("routing", "log_prob", "ids"):
    got = gather_rows(local[key], n, size, group)
    result[key] = {"dtype": str(got.dtype), "equal": bool(torch.equal(got, whole[key]))}
mine = {"rank": rank, "routing": np.full((100 * (rank + 1), 3), rank, dtype=np.int16)}  # sizes differ by rank
got = objects_from(list(reversed(range(size))), mine, group=group)
result["objects"] = [[o["rank"], len(o["routing"]), int(o["routing"].max())] for o in got]
if rank == 0:
    with open(a.out, "w") as f:
        json.dump(result, f)
dist.barrier()  # no rank tears its connections down while another still uses them (gloo aborts the process)
dist.destroy_process_group()
