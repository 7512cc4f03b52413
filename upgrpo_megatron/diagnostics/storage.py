"""Per-step diagnostic arrays on disk: `RUN_DIR/diagnostics/step_000012.npz`, and sample rollouts.

Compact by construction: each array is stored in the smallest dtype that keeps what the report needs —
bool -> uint8, integers and integral counts -> int32 (int64 when large), rates and fractions (names ending
in `_rate`, `_frac`, `_jaccard`, `_agree`, values in [0, 1]) -> float16 (3 significant digits), every other
float (variances, means, margins) -> float32 (a variance of 1e-9 must not underflow to 0).
Files are compressed and written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import numpy as np

STEP_GLOB = "step_*.npz"


RATE_SUFFIXES = ("_rate", "_frac", "_jaccard", "_agree")


def _compact(name: str, a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int32) if a.size == 0 or np.abs(a).max() < 2**31 else a.astype(np.int64)
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)]
        if a.size and finite.size == a.size and np.all(finite == np.round(finite)) and np.abs(finite).max() < 2**31:
            return a.astype(np.int32)  # counts computed in float64
        if name.endswith(RATE_SUFFIXES) and (not finite.size or (finite.min() >= 0 and finite.max() <= 1)):
            return a.astype(np.float16)
        return a.astype(np.float32)
    raise ValueError(f"diagnostics arrays must be numeric, got dtype {a.dtype}")


class DiagnosticsWriter:
    """Writes one compressed `.npz` of named arrays per step under `RUN_DIR/diagnostics/`."""

    def __init__(self, run_dir):
        self.dir = Path(run_dir) / "diagnostics"
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        return self.dir / f"step_{int(step):06d}.npz"

    def write(self, step: int, arrays: Mapping[str, object]) -> Path:
        """arrays: name -> torch tensor or numpy array (any shape). Returns the file written."""
        bad = [k for k in arrays if not k.isidentifier()]
        if bad:
            raise ValueError(f"diagnostics array names must be identifiers (npz keys), got {bad}")
        path = self.path(step)
        tmp = self.dir / f".tmp_step_{int(step):06d}.npz"
        np.savez_compressed(tmp, **{k: _compact(k, v) for k, v in arrays.items()})
        tmp.replace(path)
        return path


class DiagnosticsReader:
    """Reads what `DiagnosticsWriter` wrote. Unreadable files (a crash mid-write) are skipped and listed in
    `skipped`, so a report still renders from the steps that are intact."""

    def __init__(self, run_dir):
        self.dir = Path(run_dir) / "diagnostics"
        self.skipped: List[str] = []
        self._paths = {}
        if self.dir.is_dir():
            for p in sorted(self.dir.glob(STEP_GLOB)):
                try:
                    self._paths[int(p.stem.split("_", 1)[1])] = p
                except ValueError:
                    self.skipped.append(p.name)

    @property
    def steps(self) -> List[int]:
        return sorted(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def load(self, step: int) -> Dict[str, np.ndarray]:
        try:
            with np.load(self._paths[step]) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError):  # truncated / corrupt file
            if self._paths[step].name not in self.skipped:
                self.skipped.append(self._paths[step].name)
            return {}

    def items(self) -> Iterator:
        for s in self.steps:
            d = self.load(s)
            if d:
                yield s, d

    def stack(self, key: str) -> Optional[tuple]:
        """(steps, `[n_steps, ...]` float array) of `key` over the steps that hold it with one shape, or None."""
        steps, vals = [], []
        for s, d in self.items():
            if key in d and (not vals or d[key].shape == vals[0].shape):
                steps.append(s)
                vals.append(d[key].astype(np.float64))
        return (steps, np.stack(vals)) if vals else None


def read_diagnostics(run_dir) -> Dict[int, Dict[str, np.ndarray]]:
    """All steps at once: {step: {name: array}} (fine for small runs; the report uses DiagnosticsReader)."""
    return dict(DiagnosticsReader(run_dir).items())


def append_samples(run_dir, step: int, rows: List[dict]) -> None:
    """Sample rollouts for the report: one JSON line each (step, prompt, response, reward, ...)."""
    with open(Path(run_dir) / "samples.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"step": step, **r}, default=str) + "\n")


def truncate_run_files(run_dir, keep_through: Optional[int]) -> None:
    """On resume from the checkpoint of step `keep_through` (None: no checkpoint, a fresh start): drop the
    samples and per-step diagnostics of later steps, which the resumed run writes again."""
    from upgrpo_megatron.metrics import truncate_jsonl

    run_dir = Path(run_dir)
    truncate_jsonl(run_dir / "samples.jsonl", keep_through)
    d = run_dir / "diagnostics"
    if d.exists():
        for f in list(d.glob(STEP_GLOB)) + list(d.glob(".tmp_step_*.npz")):
            try:
                step = int(f.stem.split("_")[-1])
            except ValueError:
                continue
            if keep_through is None or step > keep_through or f.name.startswith(".tmp"):
                f.unlink(missing_ok=True)
