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
        rec = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
