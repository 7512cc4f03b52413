"""What a user sees in the terminal: our own lines (progress, one line per eval, the summary, `error:` lines).

Third-party output — vLLM's and Megatron's log records, torch warnings, prints of C++ extensions, the
engine processes' output — goes to a log file instead: `RUN_DIR/logs/rank<R>.log` (`tools/train_moe.py
--verbose` leaves it in the terminal). This is done at the file-descriptor level (the engine's processes
inherit descriptors 1 and 2), and our own lines are written to duplicates of the terminal's descriptors.

    console.capture_to(path)     # from now on fds 1 and 2 write to `path` (appending)
    console.say("val/acc 0.41")  # to the terminal (or plain stdout when nothing is captured)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, TextIO

_terminal: Optional[tuple] = None  # (stdout, stderr) text streams on duplicates of the original descriptors
_log_path: Optional[Path] = None


def out() -> TextIO:
    return _terminal[0] if _terminal else sys.stdout


def err() -> TextIO:
    return _terminal[1] if _terminal else sys.stderr


def say(message: str) -> None:
    print(message, file=out(), flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=err(), flush=True)


def log_path() -> Optional[Path]:
    return _log_path


def capture_to(path) -> None:
    """Send descriptors 1 and 2 (and so sys.stdout / sys.stderr and every child process started from now on)
    to `path`, appending. A second call moves the capture to a new file and appends the first file's content
    to it (used to start capturing before the run directory is known, then move into it)."""
    global _terminal, _log_path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    if _terminal is None:
        _terminal = (os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(2), "w", buffering=1))
    previous = _log_path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if previous is not None and previous != path and previous.exists():
        os.write(fd, previous.read_bytes())
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _log_path = path
    if previous is not None and previous != path:
        previous.unlink(missing_ok=True)
