"""Reading a run directory for the reports: metrics.jsonl, samples.jsonl, config.yaml, and figure helpers.

Tolerant of what a crash leaves: a line cut by a crash is skipped (and counted), a missing file is an empty
result. An error (one line naming the file, and the line where there is one) is a run directory that is not
there or has no metrics.jsonl (`ReportError`), and a file that is there but cannot be read or is not UTF-8 text
(`paths.ToolInputError`): the trainer writes ASCII, so such a file is not the run's and is not guessed at.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from upgrpo_megatron.errors import UpgrpoError
from upgrpo_megatron.paths import read_text


class ReportError(UpgrpoError, ValueError):
    """The run directory cannot be reported on (missing, or no metrics.jsonl)."""


def read_jsonl(path: Path) -> Tuple[List[dict], int]:
    """(records that parse as JSON objects, number of lines skipped)."""
    if not path.exists():
        return [], 0
    out, bad = [], 0
    for line in read_text(path).splitlines():
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
        raise ReportError(f"{run}: {'not a directory' if run.exists() else 'no such run directory'}")
    if not (run / "metrics.jsonl").exists():
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
    """config.yaml as a dict, or None when absent or not valid YAML."""
    path = run / "config.yaml"
    if not path.exists():
        return None
    text = read_text(path)  # unreadable or not UTF-8: an error naming it, not a silent "no config"
    try:
        import yaml

        cfg = yaml.safe_load(text)
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
