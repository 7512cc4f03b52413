"""metrics.jsonl: resume cuts the log back to the checkpoint's step, so no step is duplicated or missing."""
import json

from upgrpo_megatron.metrics import MetricsLogger, read_metrics


def test_resume_truncates_steps_after_checkpoint_and_drops_torn_line(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for s in range(1, 6):
        log.log(s, {"actor/pg_loss": float(s), "val/acc": float("nan")})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "actor/pg')  # a write cut by SIGKILL
    resumed = MetricsLogger(tmp_path, tensorboard=False, resume_step=3)
    resumed.log(4, {"actor/pg_loss": 40.0})
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2, 3, 4]
    rec = read_metrics(tmp_path)
    assert rec[3]["actor/pg_loss"] == 40.0
    assert rec[0]["val/acc"] is None  # NaN is written as null, the file stays valid JSON lines
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
