"""Shared benchmark plumbing: timing with warm-up and repeats, and `bench/results.json`.

Every measure is a ratio of ours against the alternative a user would pick, both measured in the same run
(absolute times on a shared 2-core machine are noise). `record()` merges one entry into results.json; the
markdown table the README includes is rendered from that file by `bench/run_all.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

RESULTS = Path(__file__).with_name("results.json")


def timeit(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Dict[str, float]:
    """Median and spread (min, max) of `fn()` wall time in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def record(name: str, ours: float, theirs: float, ratio: float, unit: str, config: Dict[str, Any],
           extra: Optional[Dict[str, Any]] = None, path: Optional[Path] = None) -> Dict[str, Any]:
    """Merge one measure into results.json. `ratio` > 1 means ours is better (faster / smaller)."""
    path = Path(path or os.environ.get("BENCH_RESULTS", RESULTS))
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {
        "ours": ours, "theirs": theirs, "ratio": ratio, "unit": unit, "config": config, "extra": extra or {},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    data[name] = entry
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return entry
