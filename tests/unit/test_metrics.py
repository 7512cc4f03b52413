"""metrics.jsonl: resume cuts the log back to the checkpoint's step, so no step is duplicated or missing."""
import json

from upgrpo_megatron.metrics import MetricsLogger, read_metrics
from upgrpo_megatron.run_dir import RunDir


def test_resume_truncates_steps_after_checkpoint_and_drops_torn_line(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"actor/pg_loss": float(s), "val/acc": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "actor/pg')  # a write cut by SIGKILL
    RunDir(tmp_path).cut_logs(keep_through=3)
    resumed = MetricsLogger(tmp_path, tensorboard=False)
    resumed.log(4, {"actor/pg_loss": 40.0})
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2, 3, 4]
    rec = read_metrics(tmp_path)
    assert rec[3]["actor/pg_loss"] == 40.0
    assert rec[0]["val/acc"] is None  # NaN is written as null, the file stays valid JSON lines
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_a_fresh_start_over_a_run_killed_before_its_first_checkpoint_keeps_nothing(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log_sft(0, {"sft/loss": 1.0})
    log.log(0, {"val/acc": 0.5})
    RunDir(tmp_path).cut_logs(keep_through=None)
    assert MetricsLogger(tmp_path, tensorboard=False).steps() == set()
    assert read_metrics(tmp_path) == []


def test_resume_drops_later_samples_and_diagnostics(tmp_path):
    import numpy as np

    from upgrpo_megatron.diagnostics.storage import DiagnosticsWriter, append_samples

    w = DiagnosticsWriter(tmp_path)
    for s in (1, 2, 3):
        w.write(s, {"x": np.ones(2)})
        append_samples(tmp_path, s, [{"prompt": "1+1=", "response": "2"}])
    RunDir(tmp_path).cut_logs(keep_through=2)
    assert sorted(p.name for p in (tmp_path / "diagnostics").glob("*.npz")) == ["step_000001.npz", "step_000002.npz"]
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 2]
