"""Micro-batches cut to their longest row, and packed by length (actor.micro_batch_tokens): the plan itself, and
the actor's pi_old pass and update through it give what full-width micro-batches gave."""

from __future__ import annotations

import pytest
import torch

from upgrpo_megatron.config.schema import ModelConfig
from upgrpo_megatron.megatron.micro_batches import group_rows, plan

MODEL = dict(architecture="qwen3_moe", vocab_size=64, hidden_size=64, num_layers=2, num_attention_heads=4,
             num_query_groups=2, head_dim=16, ffn_hidden_size=128, moe_ffn_hidden_size=32, num_experts=4,
             moe_router_topk=2, rope_theta=10000.0, max_position_embeddings=64, first_k_dense_layers=0)
PROMPT, RESPONSE = 8, 24  # padded widths: rows are 32 input positions


def test_rows_go_in_order_without_a_token_budget():
    assert group_rows(torch.tensor([5, 9, 2, 7, 3]), 2) == [[0, 1], [2, 3], [4]]


def test_packing_takes_longest_rows_first_within_the_token_and_row_limits():
    lengths = torch.tensor([10, 3, 30, 4, 12, 3, 50])
    groups = group_rows(lengths, micro_batch_size=3, max_tokens=40)
    # longest first: 50 alone (over the budget), 30 alone (2 x 30 > 40), 12 + 10 + 4 (3 rows: the row cap), 3 + 3
    assert groups == [[6], [2], [0, 3, 4], [1, 5]]
    assert sorted(i for g in groups for i in g) == list(range(7))  # every row exactly once
    for g in groups:
        assert len(g) <= 3 and (len(g) == 1 or len(g) * max(int(lengths[i]) for i in g) <= 40)


def test_plan_cuts_each_micro_batch_to_its_longest_row():
    batch = {"input_ids": torch.zeros(4, 32, dtype=torch.long), "prompt_lens": torch.tensor([5, 8, 1, 6]),
             "response_mask": torch.zeros(4, RESPONSE)}
    batch["response_mask"][0, :10] = 1
    batch["response_mask"][3, :24] = 1
    cuts = [(rows.tolist(), length) for rows, length in plan(batch, 2)]
    assert cuts == [([0, 1], 15), ([2, 3], 30)]
    batch["response_mask"][:] = 0
    batch["prompt_lens"][:] = 1
    assert [length for _, length in plan(batch, 4)] == [2]  # a position to score from, whatever the rows


@pytest.fixture(scope="module")
def actor():
    from upgrpo_megatron.megatron.actor import MegatronActor, OptimSettings
    from upgrpo_megatron.megatron.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes())
    return MegatronActor(ModelConfig(**MODEL), optim=OptimSettings(lr=0.0, grad_clip=0.0))


def _batch(rows=12, seed=0):
    """Right-padded rows of varied prompt and response lengths, mostly short responses and a few long."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(3, PROMPT + 1, (rows,), generator=g)
    resp = torch.randint(1, 6, (rows,), generator=g)
    resp[:2] = RESPONSE
    ids = torch.zeros(rows, PROMPT + RESPONSE, dtype=torch.long)
    mask = torch.zeros(rows, RESPONSE)
    for i in range(rows):
        n = int(prompt_lens[i] + resp[i])
        ids[i, :n] = torch.randint(1, 64, (n,), generator=g)
        mask[i, : int(resp[i])] = 1
    adv = torch.randn(rows, 1, generator=g) * mask
    return {"input_ids": ids, "prompt_lens": prompt_lens, "response_mask": mask, "advantages": adv}


def _full_width(actor, batch):
    """What the pi_old pass computed before micro-batches were cut: the whole padded width, one pass."""
    lp, ent, routing, full = actor._forward(batch["input_ids"], batch["prompt_lens"], RESPONSE,
                                            record_routing=True, replay_routing=None)
    return {"log_prob": lp, "entropy": ent, "routing": routing, "full_routing": full}


@pytest.mark.parametrize("tokens", [0, 64])
def test_pi_old_pass_matches_the_full_width_pass(actor, tokens):
    batch = _batch()
    ref = _full_width(actor, batch)
    actor.micro_batch_tokens = tokens
    try:
        got = actor.compute_log_prob(batch, micro_batch_size=5, keep_full_routing=True)
    finally:
        actor.micro_batch_tokens = 0
    m = batch["response_mask"].bool()
    torch.testing.assert_close(got["log_prob"][m], ref["log_prob"][m], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["entropy"][m], ref["entropy"][m], rtol=0, atol=1e-5)
    assert torch.equal(got["routing"][m], ref["routing"][m])
    assert got["full_routing"].shape == ref["full_routing"].shape
    for i in range(batch["input_ids"].shape[0]):  # every real input position routes as before
        n = int(batch["prompt_lens"][i] + batch["response_mask"][i].sum())
        assert torch.equal(got["full_routing"][i, :n], ref["full_routing"][i, :n])
    # past a micro-batch's cut (never computed) a valid top-k of distinct experts, should R2/R3 replay it there
    assert (got["full_routing"].sort(-1).values.diff(dim=-1) > 0).all() and (got["full_routing"] >= 0).all()


def _grads(actor, micro_batches):
    from upgrpo_megatron.megatron.sharding import grad_of

    mask_total = None

    def loss_fn(mb, lp, ent):
        loss = -(mb["advantages"] * lp * mb["response_mask"]).sum() / mask_total
        return loss, {"tokens": float(mb["response_mask"].sum())}

    batches = list(micro_batches)
    mask_total = sum(float(mb["response_mask"].sum()) for mb in batches)
    out = actor.train_step(iter(batches), loss_fn)
    return {n: grad_of(p).clone() for n, p in actor.module.named_parameters()}, out, batches


def test_update_gradient_is_the_full_width_gradient(actor):
    from upgrpo_megatron.megatron.actor import split_micro_batches

    batch = _batch(seed=1)
    n = batch["input_ids"].shape[0]
    full = [{k: v[s: s + 5] for k, v in batch.items()} for s in range(0, n, 5)]  # the old micro-batches
    ref, _, _ = _grads(actor, full)
    for tokens in (0, 64):
        got, out, mbs = _grads(actor, split_micro_batches(batch, torch.arange(n), 5, tokens))
        if tokens:  # packed: short rows no longer padded to the long rows' length
            assert sum(mb["input_ids"].numel() for mb in mbs) < 0.6 * batch["input_ids"].numel()
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
        # metrics are token means over the mini-batch however the rows were split
        assert out["tokens"] == pytest.approx(sum(float(mb["response_mask"].sum()) ** 2 for mb in mbs)
                                              / float(batch["response_mask"].sum()))
