"""Shared benchmark plumbing: interleaved ours/theirs pairs, the machine and its load, `bench/results.json`.

Every comparison runs ours and theirs interleaved after a warm-up (A B A B ..., at least `MIN_PAIRS` pairs), so
that load from other jobs on a shared machine falls on both sides alike, and reports the median of the pairwise
ratios with their min and max. A ratio whose min-max range straddles 1 is no clear difference. `record()`
merges one entry (with its pairs, the machine and the load average when the measure started) into
results.json; the markdown table the README includes is rendered from that file by `bench/run_all.py`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

RESULTS = Path(__file__).with_name("results.json")
MIN_PAIRS = 5  # pairs after warm-up for every full-size comparison


def cpu_model() -> str:
    """The CPU model name (Linux /proc/cpuinfo; platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def load_avg() -> List[float]:
    """1, 5 and 15 minute load averages (how busy other jobs kept the machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def stats(xs: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "repeats": len(xs)}


@dataclass
class Pairs:
    """Interleaved measurements of ours and theirs, one pair per round.

    `lower_is_better`: seconds, bytes (ratio = theirs / ours); otherwise throughput (ratio = ours / theirs).
    Either way a ratio > 1 means ours is better."""

    ours: List[float] = field(default_factory=list)
    theirs: List[float] = field(default_factory=list)
    lower_is_better: bool = True
    load_start: List[float] = field(default_factory=load_avg)

    def add(self, ours: float, theirs: float) -> None:
        self.ours.append(float(ours))
        self.theirs.append(float(theirs))

    @property
    def ratios(self) -> List[float]:
        pairs = zip(self.ours, self.theirs)
        return [t / o if self.lower_is_better else o / t for o, t in pairs]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def summary(self) -> Dict[str, Any]:
        r = self.ratios
        return {"ratio_median": statistics.median(r), "ratio_min": min(r), "ratio_max": max(r), "n_pairs": len(r),
                "pairs": [[o, t] for o, t in zip(self.ours, self.theirs)], "ours": stats(self.ours),
                "theirs": stats(self.theirs), "lower_is_better": self.lower_is_better,
                "load_avg_start": self.load_start}

    def describe(self) -> str:
        s = self.summary()
        return f"{s['ratio_median']:.2f}x [{s['ratio_min']:.2f}-{s['ratio_max']:.2f}] over {s['n_pairs']} pairs"


def wall(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(ours: Callable[[], Any], theirs: Callable[[], Any], *, pairs: int = MIN_PAIRS,
               warmup: int = 1) -> Pairs:
    """Wall seconds of `ours()` and `theirs()`, alternating A B A B ... for `pairs` rounds after `warmup`
    untimed rounds (the load average is taken before the warm-up)."""
    p = Pairs()
    for _ in range(warmup):
        ours()
        theirs()
    for _ in range(pairs):
        a = wall(ours)
        p.add(a, wall(theirs))
    return p


def init_world_of_one() -> None:
    """A process group of one rank on an in-memory store (gloo), for benchmarks that run a model in this process.
    Picking a free TCP port and binding it later races with other jobs on a shared machine (EADDRINUSE); a
    world of one needs no network at all."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def timeit(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Dict[str, float]:
    """Median and spread of `fn()` wall time in seconds after `warmup` untimed calls (for quantities that
    are not a comparison, e.g. an engine's start-up; comparisons use `interleave`)."""
    for _ in range(warmup):
        fn()
    return stats([wall(fn) for _ in range(repeats)])


def record(name: str, ours: float, theirs: float, ratio: Optional[float], unit: str, config: Dict[str, Any],
           extra: Optional[Dict[str, Any]] = None, path: Optional[Path] = None,
           pairs: Optional[Pairs] = None) -> Dict[str, Any]:
    """Merge one measure into results.json. Ratio > 1 means ours is better (faster / smaller).

    With `pairs` the ratio is the median of the pairwise ratios (`ratio` may be None) and the entry keeps the
    pairs, their min-max and the load average at the start; `ours`/`theirs` are the values shown in the table."""
    path = Path(path or os.environ.get("BENCH_RESULTS", RESULTS))
    data = json.loads(path.read_text()) if path.exists() else {}
    entry = {"ours": ours, "theirs": theirs, "ratio": ratio, "unit": unit, "config": config, "extra": extra or {},
             "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if pairs is not None:
        s = pairs.summary()
        entry.update(ratio=s["ratio_median"], ratio_min=s["ratio_min"], ratio_max=s["ratio_max"],
                     n_pairs=s["n_pairs"], pairs=s["pairs"], load_avg_start=s["load_avg_start"],
                     lower_is_better=s["lower_is_better"])
    else:
        entry["load_avg_start"] = load_avg()
    data[name] = entry
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)
    return entry
