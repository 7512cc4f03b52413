"""Progress bars with ETA for long work (training, conversion), quiet on non-zero ranks and in CI logs."""

from __future__ import annotations

import os
from typing import Iterable, Optional


def progress(it: Iterable, *, desc: str, enabled: bool = True, total: Optional[int] = None, initial: int = 0,
             unit: str = "it"):
    """tqdm when enabled; a plain iterator otherwise. In a non-terminal (CI, log file) tqdm prints a line
    per update at most every 10 s, so logs stay readable."""
    if not enabled or os.environ.get("UPGRPO_NO_PROGRESS"):
        return it
    from tqdm.auto import tqdm

    from upgrpo_megatron import console

    stream = console.err()
    tty = stream.isatty()
    return tqdm(it, desc=desc, total=total, initial=initial, unit=unit, dynamic_ncols=True, file=stream,
                mininterval=0.5 if tty else 10.0, leave=True)
