"""Atomic file writing: write to a temporary name beside the target, then rename.

A crash or a bad input never leaves a half-written output under the final name. A write that fails
for a reason of the file system (read-only folder, full disk, a directory where the file should go)
raises an :class:`OSError` that names the *target* (not the hidden temporary), which the command line
turns into one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_paths", "naming", "os_error_in"]


def os_error_in(exc: BaseException) -> OSError | None:
    """The :class:`OSError` behind ``exc`` (itself, or in its cause/context chain), if any.

    Writers such as ``torch.save`` or ``mrcfile`` may wrap a failed ``write`` (ENOSPC) in a
    RuntimeError whose own text says nothing useful; the OSError survives as its context.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def naming(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` re-made to name ``path`` (same errno, hence the same OSError subclass)."""
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), os.fspath(path))


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield one temporary path beside each of ``paths``; rename them all to ``paths`` only when the
    block succeeds, else remove them all (so related outputs appear together or not at all)."""
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for path in targets:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a directory; give a file name", str(path))
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
            except OSError as exc:
                raise naming(exc, path) from None
            os.close(fd)
            temps.append(Path(tmp))
        try:
            yield temps
        except BaseException as exc:
            cause = os_error_in(exc)
            if cause is None:
                raise
            # name the target whose temporary failed (else the first): the user knows that file
            culprit = next((t for t, p in zip(targets, temps) if cause.filename in (str(p), p)), targets[0])
            raise naming(cause, culprit) from exc
        # mkstemp creates the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(temps, targets):
            try:
                os.chmod(tmp, 0o666 & ~umask)
                os.replace(tmp, path)
            except OSError as exc:
                raise naming(exc, path) from None
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it to ``path`` only on success."""
    with atomic_paths(path) as (tmp,):
        yield tmp
