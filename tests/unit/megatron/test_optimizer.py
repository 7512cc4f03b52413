"""The actor's optimizer on CPU runs torch's fused AdamW kernel (megatron/optimizer.fuse_cpu_adam), and
updates as the per-tensor loop megatron would otherwise get does, to float rounding."""

from __future__ import annotations

import pytest
import torch

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.megatron.optimizer import fuse_cpu_adam, parts

MODEL = dict(architecture="qwen3_moe", vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
             num_query_groups=2, head_dim=16, ffn_hidden_size=128, moe_ffn_hidden_size=32, num_experts=4,
             moe_router_topk=2, rope_theta=10000.0, max_position_embeddings=64, first_k_dense_layers=0)


@pytest.fixture(scope="module")
def actor():
    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    return MegatronActor(ModelConfig(**MODEL), optim=OptimSettings(lr=1e-2, grad_clip=1.0))


def _groups(optimizer):
    return [g for o in parts(optimizer) for g in o.optimizer.param_groups]


def test_actor_optimizer_is_fused_on_cpu(actor):
    groups = _groups(actor.optimizer)
    assert groups and all(g["fused"] and not g["foreach"] for g in groups)


def test_fused_step_matches_the_loop_and_an_optimizer_with_state_is_left_alone():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((8, 16), (16,), (4, 4, 4))]
    loop_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]

    class Part:  # what parts() yields: a megatron optimizer holding a torch one in `.optimizer`
        def __init__(self, ps):
            self.optimizer = torch.optim.AdamW(ps, lr=1e-2)

    fused, loop = Part(params), Part(loop_params)
    assert fuse_cpu_adam(fused) == 1 and fused.optimizer.param_groups[0]["fused"]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for ps in (params, loop_params):
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
        fused.optimizer.step()
        loop.optimizer.step()
    diff = max((a - b).abs().max().item() for a, b in zip(params, loop_params))
    moved = min((a - b).abs().max().item() for a, b in zip(params, start))
    assert diff < 1e-6 and moved > 1e-3  # lr 1e-2: Adam moves every weight by about lr per step
    # built state (the loop's scalar steps) is not switched under it
    assert fuse_cpu_adam(loop) == 0 and not loop.optimizer.param_groups[0]["fused"]
