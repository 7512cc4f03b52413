"""Identical weights at TP=1, TP=2 (+SP), expert-TP=2, EP=2 and TP=2 x EP=2 give the same log-probs, entropies
and grads.

Real megatron-core GPTModel + DDP + finalize_model_grads under torchrun/gloo; the only thing that changes
between runs is the parallel layout.
"""
import dataclasses
from pathlib import Path

import pytest
import torch

from upgrpo_megatron.config.schema import ModelConfig

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker_layouts.py")
MODEL_CFG = ModelConfig(
    architecture="qwen3_moe", vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, ffn_hidden_size=128, moe_ffn_hidden_size=32, num_experts=4,
    moe_router_topk=2, rope_theta=10000.0, max_position_embeddings=64, first_k_dense_layers=0,
)
LAYOUTS = {"tp2_sp": (2, 2, 1, 1), "tp2_etp2": (2, 2, 1, 2), "ep2": (2, 1, 2, 1), "tp2_ep2": (4, 2, 2, 1)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random canonical weights + a batch, and the TP=1 result they give."""
    from tests.conftest import run_torchrun

    d = tmp_path_factory.mktemp("layouts")
    g = torch.Generator().manual_seed(0)
    # Build the canonical weights once at TP=1 (in a worker, so this process stays free of process groups),
    # then perturb them so that no parameter keeps its trivial init (norm weights = 1).
    # the .pt files hold the model section as a plain dict (weights_only loading); workers read it back with
    # model_config_from_dict
    torch.save({"model_cfg": dataclasses.asdict(MODEL_CFG), "state_dict": {}}, d / "empty.pt")
    ids = torch.randint(0, MODEL_CFG.vocab_size, (2, 16), generator=g)
    torch.save(ids, d / "ids.pt")
    init = d / "init.pt"
    run_torchrun(Path(__file__).with_name("worker_init_weights.py"), 1,
                 ["--cfg", str(d / "empty.pt"), "--out", str(init)])
    blob = torch.load(init, weights_only=True)
    for _k, v in blob["state_dict"].items():
        v.add_(0.05 * torch.randn(v.shape, generator=g))
    torch.save(blob, d / "weights.pt")
    run_torchrun(WORKER, 1, ["--weights", str(d / "weights.pt"), "--inputs", str(d / "ids.pt"),
                             "--out", str(d / "ref.pt")])
    return d, torch.load(d / "ref.pt", weights_only=True)


def test_logprob_entropy_match_plain_log_softmax_at_tp1(reference):
    d, ref = reference
    assert ref["log_prob"].shape == (2, 15)
    assert torch.all(ref["log_prob"] <= 0) and torch.all(ref["entropy"] >= 0)
    # gradients flowed everywhere: every parameter has a non-zero gradient
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_tp1(reference, name, torchrun):
    d, ref = reference
    nproc, tp, ep, etp = LAYOUTS[name]
    out = d / f"{name}.pt"
    torchrun(WORKER, nproc, ["--tp", str(tp), "--ep", str(ep), "--etp", str(etp), "--weights", str(d / "weights.pt"),
                             "--inputs", str(d / "ids.pt"), "--out", str(out)])
    got = torch.load(out, weights_only=True)
    torch.testing.assert_close(got["log_prob"], ref["log_prob"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["entropy"], ref["entropy"], rtol=1e-5, atol=1e-5)
    assert set(got["grads"]) == set(ref["grads"])
    for k in ref["grads"]:
        torch.testing.assert_close(got["grads"][k], ref["grads"][k], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")
