"""Numerical faults (NaN loss, +inf gradients, injected with UPGRPO_FAULTS) and the rollout engine dying."""
import os
import signal

import psutil
import pytest
import torch

from .common import Trainer, complete_checkpoints, engine_processes, metric_steps, metrics, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _optimizer_steps(run, step):
    """Optimizer updates taken up to a checkpoint: Adam's step count of the first parameter (skipped updates do
    not count; the LR schedule counts RL steps, so it cannot tell)."""
    groups = torch.load(run / "checkpoints" / f"step_{step:06d}" / "optim" / "rank_0.pt", weights_only=True)
    return int(groups[0]["state"][0]["step"])


def test_bad_steps_are_skipped_counted_and_k_in_a_row_stop_the_run_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    # step 2: NaN loss, step 3: +inf gradients (finite loss), step 4 healthy, then NaN from step 5 on
    # without dynamic sampling every step updates the actor (a step whose groups all tie would not)
    t = Trainer(run, "trainer.total_steps=12", "actor.max_bad_steps=3", "trainer.keep_checkpoints=20",
                "algorithm.dynamic_sampling=false",
                log=tmp_path / "nan.log", faults="nan_loss@2,inf_grad@3,nan_loss@5-12")
    rc = t.wait(timeout=900)
    log = t.output()
    assert rc != 0
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert lines and "3 consecutive steps had non-finite loss or gradients; stopped at step 7" in lines[0], log[-3000:]
    m = metrics(run)
    assert [s for s in metric_steps(run) if s >= 0] == list(range(0, 8))  # step 7 is logged, then the run stops
    for s, bad in [(1, 0), (2, 1), (3, 2), (4, 0), (5, 1), (6, 2), (7, 3)]:
        assert m[s]["actor/updates"] == 1 and m[s]["actor/consecutive_bad_steps"] == bad, s
        assert (m[s]["actor/skipped_steps"] > 0) == (bad > 0), s
        assert (m[s]["actor/grad_norm"] is None) == (bad > 0), s  # NaN is logged as null
    # no optimizer step in the bad steps; the last checkpoint holds the last good state
    assert _optimizer_steps(run, 2) == _optimizer_steps(run, 1) == _optimizer_steps(run, 3)
    assert _optimizer_steps(run, 4) == _optimizer_steps(run, 3) + 1
    assert 7 in complete_checkpoints(run)
    assert _optimizer_steps(run, 7) == _optimizer_steps(run, 4)


def test_non_finite_weights_stop_the_run_without_saving_them(tmp_path):
    run = tmp_path / "run"
    t = Trainer(run, "trainer.total_steps=6", "trainer.save_every=1", "trainer.keep_checkpoints=10",
                "algorithm.dynamic_sampling=false", "trainer.export_hf=true",
                log=tmp_path / "nanw.log", faults="nan_weights@3")
    rc = t.wait(timeout=900)
    log = t.output()
    assert rc != 0 and "done in" not in log
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert lines and "the weights became non-finite in step 3" in lines[0], log[-3000:]
    assert max(complete_checkpoints(run)) == 2 and not (run / "hf").exists()  # nothing NaN was saved or exported


def test_steps_without_any_update_warn_and_k_in_a_row_stop_the_run(tmp_path):
    run = tmp_path / "run"
    t = Trainer(run, "trainer.total_steps=12", "trainer.max_steps_without_update=3", log=tmp_path / "zero.log",
                faults="zero_reward@2-12")
    rc = t.wait(timeout=900)
    log = t.output()
    assert rc != 0 and "done in" not in log
    assert "warning: step 2: every group's samples were all right or all wrong, no update (1 such steps" in log
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert lines and "3 steps in a row had no update" in lines[0] and "stopped at step 4" in lines[0], log[-3000:]
    assert [s for s in metric_steps(run) if s >= 0] == [0, 1, 2, 3, 4]


# at world size 1 the engine's core runs in the trainer process by default (rollout.engine_core=auto); these
# tests are about an engine process of its own, as every rank of a multi-rank run has
OWN_ENGINE_PROCESS = ("rollout.engine_core=subprocess",)


def _engine_processes(trainer):
    return engine_processes(psutil.Process(trainer.proc.pid))


def test_engine_death_stops_the_trainer_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    t = Trainer(run, "trainer.total_steps=40", *OWN_ENGINE_PROCESS, log=tmp_path / "engine.log")
    try:
        wait_until(lambda: max(metric_steps(run) or [-1]) >= 2, 400, t, "RL step 2")
        victims = _engine_processes(t)
        assert victims, "no engine process found"
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)
        rc = t.proc.wait(timeout=300)
    finally:
        t.kill_all()
    log = t.output()
    assert rc != 0
    lines = [line for line in log.splitlines() if line.startswith("error:")]
    assert lines and "vLLM engine process died" in lines[0], log[-3000:]
    last = max(s for s in metric_steps(run))
    assert [s for s in metric_steps(run) if s >= 0] == list(range(0, last + 1))
    assert max(complete_checkpoints(run)) == last  # the last logged step's state is on disk and complete
    # ... and it is that step's state: a step stopped by the engine before its update gives back its LR-schedule
    # step and its prompts (a resume redoes it; it must not skip the prompts or train at the next step's rate)
    from upgrpo_megatron.megatron.checkpoint import safe_torch_load

    extra = safe_torch_load(run / "checkpoints" / f"step_{last:06d}" / "extra.pt")
    assert extra["step"] == last and extra["scheduler"]["num_steps"] == last
    assert (extra["data"]["epoch"], extra["data"]["offset"]) == (0, 4 * last)  # trainer.prompts_per_step=4


def test_engine_processes_do_not_outlive_a_sigkilled_trainer(tmp_path):
    run = tmp_path / "run"
    t = Trainer(run, "trainer.total_steps=40", *OWN_ENGINE_PROCESS, log=tmp_path / "orphans.log")
    try:
        wait_until(lambda: max(metric_steps(run) or [-1]) >= 1, 400, t, "RL step 1")
        engine = _engine_processes(t)
        assert engine, "no engine process found"
        # every process under the rank, not only vLLM's: megatron's checkpoint writer spawns a multiprocessing
        # Manager server at the first save, which outlived a SIGKILLed rank (~270 MB each) until it was started
        # with a parent-death signal (megatron/checkpoint.py)
        rank = next(c for c in psutil.Process(t.proc.pid).children(recursive=True)
                    if "train_moe.py" in " ".join(c.cmdline()))
        under_rank = rank.children(recursive=True)
        assert any("--multiprocessing-fork" in c.cmdline() for c in under_rank if c not in engine), \
            "the checkpoint writer's helper process was not found"
        t.signal(signal.SIGKILL)  # the rank only: no cleanup code of ours runs
        gone, alive = psutil.wait_procs(under_rank, timeout=30)
        assert not alive, f"orphaned processes: {[(p.pid, p.cmdline()[-1:]) for p in alive]}"
    finally:
        t.kill_all()
