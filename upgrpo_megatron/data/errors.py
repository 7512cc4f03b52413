"""The data package's user error: one line naming the file, row or setting."""


class DatasetError(ValueError):
    """The dataset cannot be read or used as asked; the message names the file and row."""
