"""User-facing errors: one line that names the setting, file or row, never a bare traceback.

Every module raises its own subclass of `ValueError` for bad input (ConfigError, DatasetError, ...);
entry points catch `UpgrpoError` (the base of all of them), print `error: <message>` and exit with status 2.
"""

from __future__ import annotations

import traceback


class UpgrpoError(Exception):
    """Base class for errors that are the user's to fix (bad recipe, data, checkpoint, engine)."""


class RunDirError(UpgrpoError, ValueError):
    """The run directory cannot be used as asked (exists without resume, not writable)."""


class TrainingStopped(UpgrpoError):
    """Training cannot continue (too many non-finite steps, rollout engine died); state was saved.

    `before_update=True`: raised before the step changed any weight, so the previous step's state is the one
    to checkpoint."""

    def __init__(self, message: str, *, before_update: bool = False):
        super().__init__(message)
        self.before_update = before_update


def user_error_types() -> tuple:
    """Exception classes that mean 'the input is wrong' and print as one line. Every module's error class
    (ConfigError, DatasetError, ConversionError, CheckpointError, RolloutError, ...) derives from
    UpgrpoError, so catching it needs no import of the heavy modules."""
    return (UpgrpoError,)


def exit_with_message(e: BaseException, debug: bool = False) -> int:
    from upgrpo_megatron import console

    if debug:
        traceback.print_exc(file=console.err())
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"error: {msg}", file=console.err(), flush=True)
    return 2
