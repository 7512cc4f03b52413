"""Experiments: the plan (runs, overrides, the shared post-SFT model) and the paired statistics over seeds."""
import json
import math
from pathlib import Path

import pytest

from upgrpo_megatron.diagnostics.experiment import block_tables, mean_ci, run_stats, write_results
from upgrpo_megatron.experiment_plan import ExperimentError, load_experiment, plan

ROOT = Path(__file__).resolve().parents[2]


def _exp(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text.replace("@RECIPE", str(ROOT / "recipes" / "qwen_moe.yaml")))
    return p


GOOD = """name: t
recipe: @RECIPE
seeds: [1, 2]
overrides: [trainer.total_steps=5]
sft: [sft_warmup.steps=10]
blocks:
  A:
    baseline: dapo
    overrides: [actor.lr=1e-3]
    arms:
      dapo: [algorithm.loss_mode=vanilla]
      up: [algorithm.loss_mode=up_grpo]
"""


def test_the_plan_runs_each_seeds_sft_first_and_every_arm_starts_from_it(tmp_path):
    runs = plan(load_experiment(_exp(tmp_path, GOOD)), tmp_path / "out")
    assert [(r.kind, r.arm, r.seed) for r in runs] == [("sft", None, 1), ("sft", None, 2), ("arm", "dapo", 1),
                                                       ("arm", "dapo", 2), ("arm", "up", 1), ("arm", "up", 2)]
    sft = runs[0]
    assert "trainer.total_steps=0" in sft.overrides and "sft_warmup.steps=10" in sft.overrides
    up1 = runs[4]
    init_from = tmp_path / "out" / "sft" / "seed1" / "checkpoints" / "step_000000"
    assert up1.overrides[-1] == f"trainer.init_from={init_from}"
    # later overrides win: the arm's own settings come after the block's and the experiment's
    assert up1.overrides.index("algorithm.loss_mode=up_grpo") > up1.overrides.index("actor.lr=1e-3")
    assert up1.run_dir == tmp_path / "out" / "A" / "up" / "seed1"
    # every run's overrides form a valid recipe
    from upgrpo_megatron.config import load_recipe

    for r in runs:
        load_recipe(ROOT / "recipes" / "qwen_moe.yaml", r.overrides)


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("baseline: dapo", "baseline: nope"), "baseline 'nope' is not one of its arms"),
    (GOOD.replace("seeds: [1, 2]", "seeds: []"), "seeds in"),
    (GOOD.replace("[algorithm.loss_mode=vanilla]", "[loss_mode]"), "dotted.key=value"),
    (GOOD + "extra: 1\n", "unknown keys"),
])
def test_a_bad_experiment_file_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(ExperimentError, match=message):
        load_experiment(_exp(tmp_path, text))


def test_mean_ci_is_the_t_interval():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    assert math.isnan(mean_ci([1.0])[1])


def _run(d: Path, accs, kl=0.01):
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"sft_step": 0, "sft/loss": 1.0}) + "\n")
        for i, a in enumerate(accs):
            f.write(json.dumps({"step": 10 * i, "val/acc": a, "val/mean@8": a - 0.01, "actor/kl_loss": kl}) + "\n")
    return d


def test_paired_differences_use_the_same_seed(tmp_path):
    base = {1: run_stats(_run(tmp_path / "b1", [0.3, 0.3, 0.3, 0.3, 0.3])),
            2: run_stats(_run(tmp_path / "b2", [0.5, 0.5, 0.5, 0.5, 0.5]))}
    arm = {1: run_stats(_run(tmp_path / "a1", [0.3, 0.35, 0.35, 0.35, 0.35])),
           2: run_stats(_run(tmp_path / "a2", [0.5, 0.55, 0.55, 0.55, 0.55]))}
    assert base[1]["final_acc"] == pytest.approx(0.3) and arm[2]["final_acc"] == pytest.approx(0.55)
    # what RL added to the post-SFT model: the last 4 evals' mean minus the step-0 eval
    assert arm[2]["start_mean@8"] == pytest.approx(0.49) and arm[2]["gain@8"] == pytest.approx(0.05)
    assert base[1]["gain@8"] == pytest.approx(0.0, abs=1e-12)
    # the seeds disagree by 0.2 in level but the arm beats its paired baseline by exactly 0.05 in both
    lines, rows = block_tables("A", "base", {"base": base, "arm": arm})
    diff = [r for r in rows if r[1] == "arm" and r[2] == "final_acc" and r[3] == "diff_vs_base"][0]
    assert diff[4] == pytest.approx(0.05) and diff[5] == pytest.approx(0.0, abs=1e-12)
    assert any("**0.050" in line for line in lines)


def test_results_are_written_with_a_figure_per_block(tmp_path):
    runs = {"dapo": [_run(tmp_path / "A" / "dapo" / f"seed{s}", [0.3, 0.4, 0.4]) for s in (1, 2)],
            "up": [_run(tmp_path / "A" / "up" / f"seed{s}", [0.3, 0.45, 0.5]) for s in (1, 2)]}
    md = write_results([("A", "no mismatch", "dapo", runs)], tmp_path / "results")
    text = md.read_text()
    assert "### Block A" in text and "| up |" in text and (tmp_path / "results" / "block_A.png").exists()
    assert (tmp_path / "results" / "results.csv").read_text().count("\n") > 10
