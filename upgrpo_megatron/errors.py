"""User-facing errors: one line that names the setting, file or row, never a bare traceback.

Every module raises its own subclass of `ValueError` for bad input (ConfigError, DatasetError, ...);
entry points catch `user_error_types()` (all of them), print `error: <message>` and exit with status 2.
"""

from __future__ import annotations

import sys
import traceback


class UpgrpoError(Exception):
    """Base class for errors that are the user's to fix (bad recipe, data, checkpoint, engine)."""


class RunDirError(UpgrpoError, ValueError):
    """The run directory cannot be used as asked (exists without resume, not writable)."""


class TrainingStopped(UpgrpoError):
    """Training cannot continue (too many non-finite steps, rollout engine died); state was saved."""


def user_error_types() -> tuple:
    """Exception classes that mean 'the input is wrong' and print as one line."""
    types = [UpgrpoError]
    for mod, name in [("upgrpo_megatron.config", "ConfigError"), ("upgrpo_megatron.data", "DatasetError"),
                      ("upgrpo_megatron.rollout", "RolloutError"), ("upgrpo_megatron.convert", "ConversionError")]:
        try:
            module = __import__(mod, fromlist=[name])
            types.append(getattr(module, name))
        except Exception:
            pass
    return tuple(types)


def exit_with_message(e: BaseException, debug: bool = False) -> int:
    if debug:
        traceback.print_exc()
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=sys.stderr)
    return 2
