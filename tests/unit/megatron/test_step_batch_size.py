"""`--dry-run`'s step-batch lines (`sizing.step_batch_bytes`) against the tensors the trainer really builds: the
batch from `training_batch` and the pi_old pass of each replay strategy, on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.megatron.test_micro_batches import MODEL, PROMPT, RESPONSE, actor  # noqa: F401 (fixture)
from upgrpo_megatron.config import load_recipe, validate_layout
from upgrpo_megatron.rollout.batch import RolloutBatch, RolloutSample, training_batch
from upgrpo_megatron.router_replay import get_router_replay
from upgrpo_megatron.sizing import dry_run, step_batch_bytes

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "qwen_moe.yaml"
PROMPTS, N = 3, 2


def _cfg(replay: str):
    overrides = [f"model.{k}={v}" for k, v in MODEL.items() if k not in ("architecture",)]
    return load_recipe(RECIPE, [*overrides, f"data.max_prompt_length={PROMPT}",
                                f"data.max_response_length={RESPONSE}", f"trainer.prompts_per_step={PROMPTS}",
                                f"rollout.n={N}", f"algorithm.router_replay={replay}", "actor.ppo_mini_batch_size=1"])


def _rollout(seed=0):
    """PROMPTS x N samples of random lengths, with engine routing of every position they were scored from."""
    g = np.random.default_rng(seed)
    L, k = MODEL["num_layers"], MODEL["moe_router_topk"]
    prompts = [list(g.integers(1, 64, g.integers(2, PROMPT + 1))) for _ in range(PROMPTS)]
    samples = []
    for p, prompt in enumerate(prompts):
        for i in range(N):
            m = int(g.integers(1, RESPONSE + 1))
            s = RolloutSample(p, i, list(g.integers(1, 64, m)), [-1.0] * m, "stop")
            s.routing = g.integers(0, MODEL["num_experts"], (m, L, k)).astype(np.int16)
            s.prompt_routing = g.integers(0, MODEL["num_experts"], (len(prompt) - 1, L, k)).astype(np.int16)
            samples.append(s)
    return RolloutBatch(samples), prompts


@pytest.mark.parametrize("replay", ["none", "R2", "R3"])
def test_step_batch_bytes_are_the_bytes_the_trainer_builds(actor, replay):  # noqa: F811
    cfg = _cfg(replay)
    strategy = get_router_replay(replay)
    rollout, prompts = _rollout()
    n = len(rollout)
    batch = training_batch(rollout, prompts, list(range(n)), torch.randn(n), max_prompt_length=PROMPT,
                           max_response_length=RESPONSE, pad_token_id=0, num_moe_layers=MODEL["num_layers"],
                           topk=MODEL["moe_router_topk"], prompt_routing=strategy.needs_prompt_routing)
    old = strategy.old_log_prob(actor, batch, 4)  # what rl_step's pi_old does on one rank
    est = step_batch_bytes(cfg, validate_layout(cfg, 1))

    routing = ["rollout_routing", "rollout_prompt_routing", "replay"]
    built = sum(batch[k].nbytes for k in routing if k in batch) + old["routing"].nbytes
    assert est["routing_tensors"] == built
    assert est["routing_local"] == old["routing"].nbytes + (batch["replay"].nbytes if "replay" in batch else 0)
    assert est["routing_pi_old"] == est["routing_local"]  # no gather at one rank
    # on the device: one micro-batch's routing of every position, int64 as megatron records it
    mb = cfg.actor.micro_batch_size
    ids = torch.ones(mb, PROMPT + RESPONSE, dtype=torch.long)
    *_, full = actor._forward(ids, torch.full((mb,), PROMPT), RESPONSE, record_routing=True, replay_routing=None)
    assert full.shape == (mb, PROMPT + RESPONSE, MODEL["num_layers"], MODEL["moe_router_topk"])
    assert est["routing_gpu"] == full.numel() * torch.tensor([], dtype=torch.long).element_size()
    real = sum(s.routing.nbytes + (s.prompt_routing.nbytes if strategy.needs_prompt_routing else 0)
               for s in rollout.samples)
    assert 0 < real <= est["routing_samples"]  # an upper bound: counted at full length
    other = ["input_ids", "prompt_lens", "group", "response_mask", "advantages", "rollout_log_prob"]
    assert est["other_host"] == sum(batch[k].nbytes for k in other) + old["log_prob"].nbytes + old["entropy"].nbytes


def test_dry_run_warns_where_the_step_batch_outgrows_a_node():
    cfg = load_recipe(RECIPE.parent / "qwen3_30b_a3b_upgrpo_math.yaml")
    text = dry_run(cfg, 64)
    assert "step batch" in text and "warning: the step batch needs" in text
    b = step_batch_bytes(cfg, validate_layout(cfg, 64))
    assert b["routing_peak"] > 300 * 1024**3  # 8192 samples x 20480 positions x 48 layers x top-8, int16, twice
    per_sample = (cfg.data.max_response_length * 48 * 8 * 2 + 14 * cfg.data.max_response_length)
    assert b["exchange"] == 512 * per_sample  # one engine's 512 samples at a time (not world x 512), on the host
    assert "warning: the step batch" not in dry_run(load_recipe(RECIPE), 1)
