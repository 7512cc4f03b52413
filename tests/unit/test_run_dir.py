"""The run directory: fresh or resume, never losing a user's results, logs cut back to the checkpoint."""
import json

import pytest

from upgrpo_megatron.errors import RunDirError
from upgrpo_megatron.metrics import MetricsLogger, read_metrics
from upgrpo_megatron.run_dir import RunDir


def _results_without_checkpoint(d):
    log = MetricsLogger(d, tensorboard=False)
    log.log_sft(0, {"sft/loss": 2.0})
    for s in (0, 1, 2):
        log.log(s, {"val/acc": 0.5})
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text("{}")


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_results_without_a_complete_checkpoint_are_refused_and_left_untouched(tmp_path):
    _results_without_checkpoint(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match="holds results .* but no complete checkpoint .* trainer.resume=fresh"):
        RunDir(tmp_path).prepare("auto")
    assert _snapshot(tmp_path) == before


def test_resume_fresh_starts_over_and_keeps_the_old_files_aside(tmp_path):
    _results_without_checkpoint(tmp_path)
    before = _snapshot(tmp_path)
    rd = RunDir(tmp_path)
    assert rd.prepare("fresh") is None
    assert _snapshot(tmp_path) == before  # nothing moves before every input has checked out ...
    rd.open(keep_through=None)  # ... which is when the trainer opens the directory
    kept = list((tmp_path / "previous").iterdir())
    assert len(kept) == 1 and _snapshot(kept[0]) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == ["previous"]


def test_a_run_killed_during_the_sft_warm_up_starts_over_with_its_logs_kept_aside(tmp_path):
    MetricsLogger(tmp_path, tensorboard=False).log_sft(0, {"sft/loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"sft_step": 10, "sft/lo')  # a write cut by the kill
    rd = RunDir(tmp_path)
    assert rd.prepare("auto") is None
    rd.open(keep_through=None)
    assert not (tmp_path / "metrics.jsonl").exists() and len(list((tmp_path / "previous").iterdir())) == 1


def test_sft_records_have_their_own_step_axis_and_survive_a_resume_cut(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for i in (0, 10):
        log.log_sft(i, {"sft/loss": 1.0})
    for s in (0, 1, 2, 3):
        log.log(s, {"val/acc": 0.5})
    RunDir(tmp_path).cut_logs(keep_through=1)
    recs = read_metrics(tmp_path)
    assert [r.get("sft_step") for r in recs if "sft_step" in r] == [0, 10]
    assert [r["step"] for r in recs if "step" in r] == [0, 1]


def test_tensorboard_is_rebuilt_from_the_cut_log_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, tensorboard=True)
    for s in (1, 2, 3):
        log.log(s, {"val/acc": float(s)})
    log.close()
    RunDir(tmp_path).cut_logs(keep_through=1)
    log = MetricsLogger(tmp_path, tensorboard=True)  # the resumed run logs step 2 again
    log.log(2, {"val/acc": 20.0})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/acc")] == [(1, 1.0), (2, 20.0)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["val/acc"] == 20.0


def _run_with_checkpoints(d, steps):
    log = MetricsLogger(d, tensorboard=False)
    for s in range(max(steps) + 1):
        log.log(s, {"val/acc": 0.1 * s})
    for s in steps:
        (d / "checkpoints" / f"step_{s:06d}").mkdir(parents=True)


def test_resume_path_of_another_run_into_a_run_of_its_own_is_refused_and_left_untouched(tmp_path):
    other, mine = tmp_path / "other", tmp_path / "mine"
    _run_with_checkpoints(other, [5])
    _run_with_checkpoints(mine, [2])
    before = _snapshot(mine)
    with pytest.raises(RunDirError, match="holds a run of its own.*choose an empty trainer.run_dir"):
        RunDir(mine).prepare(str(other / "checkpoints" / "step_000005"))
    assert _snapshot(mine) == before
    # into an empty directory it is a plain start from that checkpoint
    assert RunDir(tmp_path / "new").prepare(str(other / "checkpoints" / "step_000005")).name == "step_000005"


def test_resume_path_locks_the_run_directory_like_any_resume(tmp_path):
    _run_with_checkpoints(tmp_path, [1])
    first = RunDir(tmp_path)
    first.prepare(str(tmp_path / "checkpoints" / "step_000001"))
    with pytest.raises(RunDirError, match="is in use by"):
        RunDir(tmp_path).prepare(str(tmp_path / "checkpoints" / "step_000001"))


def test_rolling_back_to_an_older_checkpoint_keeps_the_newer_ones_and_the_full_logs_aside(tmp_path):
    _run_with_checkpoints(tmp_path, [1, 2, 3])
    full_log = (tmp_path / "metrics.jsonl").read_text()
    rd = RunDir(tmp_path)
    assert rd.prepare(str(tmp_path / "checkpoints" / "step_000001")).name == "step_000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002",
                                                                             "step_000003"]  # nothing moved yet
    rd.open(keep_through=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]  # resume=auto comes back here
    kept = next((tmp_path / "previous").iterdir())
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert (kept / "metrics.jsonl").read_text() == full_log
    assert sorted(r["step"] for r in read_metrics(tmp_path) if "step" in r) == [0, 1]
