"""Reading a run directory for the reports: metrics.jsonl, samples.jsonl, config.yaml, and figure helpers.

Tolerant by design: a line cut by a crash is skipped (and counted), a missing file is an empty result; only a
run directory that is not there or has no metrics.jsonl is an error (`ReportError`, one line).
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from upgrpo_megatron.errors import UpgrpoError


class ReportError(UpgrpoError, ValueError):
    """The run directory cannot be reported on (missing, or no metrics.jsonl)."""


def read_jsonl(path: Path) -> Tuple[List[dict], int]:
    """(records that parse as JSON objects, number of lines skipped)."""
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    return out, bad


def require_run_dir(run_dir) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run directory")
    if not (run / "metrics.jsonl").is_file():
        raise ReportError(f"{run}: no metrics.jsonl (is this a run directory?)")
    return run


def read_metrics(run: Path) -> Tuple[List[dict], int]:
    """Step records (with an integer "step"), sorted by step; the last record of a step wins (resumed runs)."""
    recs, bad = read_jsonl(run / "metrics.jsonl")
    by_step: Dict[int, dict] = {}
    for r in recs:
        s = r.get("step")
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            by_step[int(s)] = r
        else:
            bad += 1
    return [by_step[s] for s in sorted(by_step)], bad


def series(metrics: List[dict], key: str) -> Tuple[List[int], List[float]]:
    """(steps, values) of a metric over steps, leaving out steps where it is absent, null or not finite."""
    xs, ys = [], []
    for r in metrics:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def read_config(run: Path) -> Optional[dict]:
    """config.yaml as a dict, or None when absent or unreadable."""
    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text())
    except Exception:  # a broken config must not stop a report; the caller says it is missing
        return None
    return cfg if isinstance(cfg, dict) else None


def config_get(cfg: Optional[dict], dotted: str, default=None):
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display, same output everywhere)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    """Write the figure as PNG to `path` and return it base64-encoded for embedding in HTML."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    data = buf.getvalue()
    path.write_bytes(data)
    return base64.b64encode(data).decode("ascii")


def fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)
