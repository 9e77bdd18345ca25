"""The one error type users see: every message names the file and tensor it is about."""
from __future__ import annotations


class BitsmithError(Exception):
    """Base error. ``str(err)`` is one line: ``FILE: TENSOR: what is wrong (what was expected)``.

    The CLI prints it and exits with code 2.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.message = message
        self.file = None if file is None else str(file)
        self.tensor = tensor
        super().__init__(self._render())

    def _render(self) -> str:
        where = [p for p in (self.file, self.tensor) if p]
        return ": ".join(where + [self.message])

    def at(self, *, file: str | None = None, tensor: str | None = None) -> "BitsmithError":
        """The same error with the file / tensor filled in where they were unknown."""
        return type(self)(self.message, file=self.file or file, tensor=self.tensor or tensor)


class SpecError(BitsmithError):
    """A codec spec or recipe option is invalid (unknown codec, bits 0, levels 257, ...)."""


class CheckpointError(BitsmithError):
    """A file on disk is not a valid safetensors file / bitsmith checkpoint."""


class QuantizationError(BitsmithError):
    """A tensor or model cannot be quantized as asked."""
