"""The conversion error, in a module of its own so that every conversion module can raise it."""

from upgrpo_megatron.errors import UpgrpoError


class ConversionError(UpgrpoError, ValueError):
    """A checkpoint or HF directory cannot be converted; the message names the file or tensor."""
