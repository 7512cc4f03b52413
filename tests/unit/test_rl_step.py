"""Pieces of `RLStep` that need no engine or actor: rewards, DAPO dynamic sampling, advantages."""
from pathlib import Path

import torch

from upgrpo_megatron.config import load_recipe
from upgrpo_megatron.data import build_task
from upgrpo_megatron.rl_step import RLStep
from upgrpo_megatron.rollout.batch import RolloutBatch, RolloutSample

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "qwen_moe.yaml"


def _step(*overrides):
    cfg = load_recipe(RECIPE, ["data.max_response_length=8", *overrides])
    task = build_task(cfg)
    return RLStep(cfg, actor=None, rollout=None, task=task, diagnostics=None, replay=None, dp=None, weights=None), task


def _sample(task, prompt_index, i, text):
    ids = task.tokenizer.encode(text, add_special_tokens=False) + [task.tokenizer.eos_token_id]
    return RolloutSample(prompt_index, i, ids, [0.0] * len(ids), "stop")


def test_dynamic_sampling_drops_an_all_wrong_group_even_when_length_shaping_makes_its_rewards_differ():
    step, task = _step("algorithm.overlong_buffer_len=4", "algorithm.overlong_penalty_factor=1.0")
    p = task.next_train_prompts(2)
    wrong = [next(d for d in "98" if d != q.answer) for q in p]
    # prompt 0: four wrong answers of lengths 1..7 (the longer ones are penalised: rewards differ);
    # prompt 1: one right answer and three wrong ones (a mixed group)
    s0 = [_sample(task, 0, j, wrong[0] * (1 + 2 * j)) for j in range(4)]
    s1 = [_sample(task, 1, 0, p[1].answer)] + [_sample(task, 1, j, wrong[1]) for j in range(1, 4)]
    batch = RolloutBatch(s0 + s1)
    m = {}
    _, scores, rewards = step._rewards(p, batch, m)
    assert len(set(rewards[:4].tolist())) > 1, "the test needs an all-wrong group whose shaped rewards differ"
    correct = torch.tensor([float(task.is_correct(float(x))) for x in scores])
    keep, adv = step._advantages(rewards, correct, batch, m)
    assert keep == [4, 5, 6, 7] and m["dapo/dropped_groups"] == 1.0
    # within the kept group only the right answer is reinforced
    assert adv[4] > 0 and (adv[5:8] < 0).all()


def test_without_dynamic_sampling_every_sample_is_kept():
    step, task = _step("algorithm.dynamic_sampling=false")
    p = task.next_train_prompts(1)
    batch = RolloutBatch([_sample(task, 0, j, p[0].answer) for j in range(4)])
    m = {}
    _, scores, rewards = step._rewards(p, batch, m)
    keep, adv = step._advantages(rewards, torch.ones(4), batch, m)
    assert keep == [0, 1, 2, 3] and torch.all(adv == 0) and "dapo/dropped_groups" not in m
