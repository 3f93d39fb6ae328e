"""The error every model importer raises for a file it cannot read."""
from __future__ import annotations

from ..utils.files import InputFileError


class ModelFormatError(InputFileError):
    """A model file that cannot be read: unknown format, corrupt, truncated, wrong shapes, unsafe.
    The message names the file and the problem."""
