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
