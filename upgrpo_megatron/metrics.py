"""Step metrics: `metrics.jsonl` (one JSON object per step, the source of truth) and TensorBoard.

The logger appends; on resume from step k the run directory first cuts the log back to the steps <= k that
the checkpoint covers (`RunDir.cut_logs`), so an interrupted and resumed run has no duplicated or missing steps.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; a null says "not a number" to every reader
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class MetricsLogger:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except Exception:  # tensorboard is optional; metrics.jsonl is always written
                self.tb = None

    def steps(self) -> set:
        """The steps logged so far."""
        return {r.get("step") for r in read_metrics(self.path.parent)}

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """One RL step's record: {"step": step, ...}."""
        self._write({"step": step, **{k: _clean(v) for k, v in metrics.items()}}, "step")

    def log_sft(self, sft_step: int, metrics: Dict[str, Any]) -> None:
        """A record of the SFT warm-up, on its own step axis: {"sft_step": i, "sft/...": ...} (no "step")."""
        self._write({"sft_step": sft_step, **{k: _clean(v) for k, v in metrics.items()}}, "sft_step")

    def _write(self, rec: Dict[str, Any], step_key: str) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            write_scalars(self.tb, rec, step_key)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_scalars(tb, rec: Dict[str, Any], step_key: str) -> None:
    """The numbers of one record as TensorBoard scalars at `rec[step_key]`."""
    for k, v in rec.items():
        if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool):
            tb.add_scalar(k, v, rec[step_key])


def rebuild_tensorboard(run_dir: Path) -> None:
    """Rewrite RUN_DIR/tensorboard from metrics.jsonl (the source of truth), e.g. after the log was cut back on
    resume: TensorBoard event files cannot be truncated, and left alone they would show steps 1, 2, 3, 1, ..."""
    import shutil

    tb_dir = Path(run_dir) / "tensorboard"
    if not tb_dir.exists():
        return
    shutil.rmtree(tb_dir)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return
    tb = SummaryWriter(str(tb_dir))
    for rec in read_metrics(run_dir):
        key = "step" if "step" in rec else "sft_step" if "sft_step" in rec else None
        if key is not None:
            write_scalars(tb, rec, key)
    tb.close()


def truncate_jsonl(path: Path, step: Optional[int]) -> int:
    """Atomically keep the lines of a per-step JSONL file with record['step'] <= step (None: keep none).
    Lines cut by a crash mid-write are dropped too. Returns how many lines were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            dropped += 1
            continue
        # SFT records (no "step") come before step 0: kept whenever a checkpoint is
        if step is not None and isinstance(rec, dict) and rec.get("step", -1) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
    return dropped


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
