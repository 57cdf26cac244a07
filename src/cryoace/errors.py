"""Errors that the command line turns into one-line messages: bad input (exit code 2) and a run that
cannot go on although its input was fine (exit code 3)."""

from __future__ import annotations

import os

#: exit status of a command stopped by bad input (:class:`CryoaceInputError`)
EXIT_INPUT = 2
#: exit status of a run that failed on good input (:class:`CryoaceRunError`, e.g. training diverged)
EXIT_RUN_FAILED = 3


class CryoaceInputError(Exception):
    """Bad user input: a missing/truncated file, a missing column, NaNs, wrong units...

    The message must name the file (when there is one) and the problem in one line; the CLI prints
    ``cryoace: error: <message>`` and exits with status 2, never a traceback.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CryoaceRunError(Exception):
    """A run that cannot go on although its input was fine (the loss diverged beyond every rollback).

    Not an input error: the user's files are not at fault, so the CLI prints ``cryoace <command>:
    error: <message>`` and exits with status 3 (:data:`EXIT_RUN_FAILED`), never a traceback.
    """
