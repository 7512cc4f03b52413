"""The data package's user error: one line naming the file, row or setting."""

from upgrpo_megatron.errors import UpgrpoError


class DatasetError(UpgrpoError, ValueError):
    """The dataset cannot be read or used as asked; the message names the file and row."""
