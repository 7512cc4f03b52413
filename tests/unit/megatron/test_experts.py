"""Grouped-GEMM experts (`megatron/experts.py`) against megatron-core's per-expert loop (`SequentialMLP`) on the
same weights: forward, input gradient and every expert's weight gradient agree in fp32 (and bf16), including
experts that receive no tokens; parameter names and shapes are the loop's; the weights live in one buffer
without breaking in-place loads, and a re-assigned `param.data` falls back to a copy, not to wrong numbers.
Runs in this process on a world of one (gloo)."""
import pytest
import torch

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.megatron.model import build_transformer_config

CFG = ModelConfig(architecture="qwen3_moe", vocab_size=64, hidden_size=48, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, head_dim=16, ffn_hidden_size=96, moe_ffn_hidden_size=40, num_experts=8,
                  moe_router_topk=2, rope_theta=10000.0, max_position_embeddings=64, first_k_dense_layers=0)
# tokens per expert: several experts without tokens, one with a single token
COUNTS = [5, 0, 7, 1, 0, 9, 0, 3]


@pytest.fixture(scope="module")
def world():
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    yield


def _experts(cls, dtype=torch.float32):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    config = build_transformer_config(CFG, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    return cls(CFG.num_experts, config, sub, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


def _pair(dtype=torch.float32):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from upgrpo_megatron.megatron.experts import GroupedSequentialMLP

    loop, grouped = _experts(SequentialMLP, dtype), _experts(GroupedSequentialMLP, dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(loop.named_parameters(), grouped.named_parameters()):
            assert n1 == n2 and p1.shape == p2.shape
            p1.copy_((0.1 * torch.randn(p1.shape, generator=g)).to(dtype))
            p2.copy_(p1)  # in place: the grouped module's weights stay in their stacked buffer
    return loop, grouped


def _run(module, x, probs, grad_out):
    x = x.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, bias = module(x, torch.tensor(COUNTS), probs)
    assert bias is None
    out.backward(grad_out)  # a dense upstream gradient, as the token combine hands it
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), x.grad, probs.grad, grads


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    x = torch.randn(n, CFG.hidden_size, generator=g).to(dtype)
    probs = torch.rand(n, generator=g)  # router probabilities stay fp32
    grad_out = torch.randn(n, CFG.hidden_size, generator=g).to(dtype)
    return x, probs, grad_out


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_grouped_experts_match_the_per_expert_loop(world, dtype, atol, monkeypatch):
    from upgrpo_megatron.megatron import experts

    if not experts.grouped_mm_supported(dtype):
        pytest.skip(f"torch._grouped_mm does not support {dtype} here (the module uses the loop)")
    loop, grouped = _pair(dtype)
    args = _inputs(dtype)
    calls = []
    apply = experts._GroupedLinear.apply
    monkeypatch.setattr(experts._GroupedLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    ref, got = _run(loop, *args), _run(grouped, *args)
    assert len(calls) == 2, "the grouped path did not run"
    for name, a, b in zip(("output", "input grad", "probs grad"), ref[:3], got[:3]):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert set(ref[3]) == set(got[3])
    for n in ref[3]:
        torch.testing.assert_close(got[3][n], ref[3][n], atol=atol, rtol=0, msg=lambda m, n=n: f"{n}: {m}")
    empty = [i for i, c in enumerate(COUNTS) if c == 0]
    for i in empty:  # experts without tokens: exactly zero gradient, as in the loop
        assert not got[3][f"local_experts.{i}.linear_fc1.weight"].any()
        assert not got[3][f"local_experts.{i}.linear_fc2.weight"].any()


def test_weights_live_in_one_buffer_and_a_reassigned_param_falls_back_to_a_copy(world):
    from upgrpo_megatron.megatron.experts import stacked_weights

    loop, grouped = _pair()
    ws = grouped._weights("linear_fc1")
    buf = grouped._packed["linear_fc1"]
    assert stacked_weights(ws, buf).data_ptr() == buf.data_ptr()  # no copy
    for i, w in enumerate(ws):
        assert torch.equal(buf[i], w) and w._base is None
    # something re-assigns a parameter's storage (as a distributed optimizer's buffer would): still right
    w3 = ws[3]
    w3.data = w3.data.clone()
    with torch.no_grad():
        w3.mul_(2.0)
        loop.local_experts[3].linear_fc1.weight.mul_(2.0)
    assert stacked_weights(ws, buf).data_ptr() != buf.data_ptr()
    args = _inputs(torch.float32)
    ref, got = _run(loop, *args), _run(grouped, *args)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[3]["local_experts.3.linear_fc1.weight"],
                               ref[3]["local_experts.3.linear_fc1.weight"], atol=1e-6, rtol=0)


def test_without_grouped_mm_the_loop_runs(world, monkeypatch):
    from upgrpo_megatron.megatron import experts

    loop, grouped = _pair()
    monkeypatch.setattr(experts, "grouped_mm_supported", lambda *a: False)
    called = []
    monkeypatch.setattr(experts._GroupedLinear, "apply", lambda *a: called.append(1))
    args = _inputs(torch.float32)
    ref, got = _run(loop, *args), _run(grouped, *args)
    assert not called
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=0)


def test_the_local_spec_uses_grouped_experts_with_the_loops_parameter_names(world):
    from upgrpo_megatron.megatron.experts import GroupedSequentialMLP
    from upgrpo_megatron.megatron.model import build_gpt_model

    model = build_gpt_model(CFG)
    assert all(isinstance(layer.mlp.experts, GroupedSequentialMLP) for layer in model.decoder.layers)
    names = dict(model.named_parameters())
    for e in range(CFG.num_experts):
        assert names[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"].shape == (80, 48)
        assert names[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight"].shape == (48, 40)
    keys = set(model.sharded_state_dict())  # the checkpoint layout is the loop's (stacked per layer)
    assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in {model.sharded_state_dict()[k].key
                                                                          for k in keys if "experts" in k}
