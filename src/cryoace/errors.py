"""Errors that the command line turns into one-line messages (exit code 2)."""

from __future__ import annotations

import os


class CryoaceInputError(Exception):
    """Bad user input: a missing/truncated file, a missing column, NaNs, wrong units...

    The message must name the file (when there is one) and the problem in one line; the CLI prints
    ``cryoace: error: <message>`` and exits with status 2, never a traceback.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
