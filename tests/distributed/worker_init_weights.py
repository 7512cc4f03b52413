"""torchrun worker (1 rank): build the model from a config and save its canonical weights."""
import argparse
import dataclasses

import torch

from upgrpo_megatron.config import model_config_from_dict
from upgrpo_megatron.megatron.model import build_gpt_model
from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel
from upgrpo_megatron.megatron.sharding import full_state_dict

ap = argparse.ArgumentParser()
ap.add_argument("--cfg", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
model_cfg = model_config_from_dict(torch.load(a.cfg, weights_only=True)["model_cfg"], a.cfg)
init_model_parallel(ParallelSizes())
model = build_gpt_model(model_cfg)
torch.save({"model_cfg": dataclasses.asdict(model_cfg), "state_dict": full_state_dict(model)}, a.out)
