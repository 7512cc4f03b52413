"""Helper processes that die with their parent (no imports beyond the standard library: spawned helper
processes import this module first, and a parent killed meanwhile must not leave them behind for long)."""

from __future__ import annotations

import os
import sys


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux prctl; elsewhere nothing): the vLLM engine processes
    (`rollout/vllm_plugin.py`) and the checkpoint writer's helper process (`megatron/checkpoint.py`). The signal
    follows the parent *thread* that started this process, so start such processes from a thread that lives as
    long as the parent."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except OSError:
        return
    if os.getppid() == 1:  # the parent was already gone before the request took effect
        os._exit(1)
