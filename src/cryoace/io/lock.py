"""One writer per output folder: an exclusive lock on a file inside it, held while the folder is written.

The lock is an ``fcntl.flock`` on ``FOLDER/.cryoace.lock``: the kernel releases it when the process
ends, however it ends (exit, exception, Ctrl-C, kill -9), so a crashed run never blocks the next one.
A second process that wants the same folder is refused with one line naming the folder and the pid
of the process that holds it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import CryoaceInputError

__all__ = ["LOCK_NAME", "folder_lock", "is_locked"]

LOCK_NAME = ".cryoace.lock"


def _try_lock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def is_locked(folder: str | os.PathLike) -> bool:
    """Whether a live process holds ``folder``'s lock (a folder without a lock file is not locked)."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)  # closing releases the lock this probe may have taken


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (creating the folder if needed); yield the folder.

    Raises :class:`CryoaceInputError` when another process holds it. A folder that this call created
    and that holds nothing but the lock file when the block ends (e.g. the run stopped on bad input
    before writing anything) is removed again.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CryoaceInputError("the output exists and is not a directory", folder)
    created = not folder.exists()
    fd = None
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            locked = _try_lock(fd)
            if locked:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())  # for the message of a refused process
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(folder)) from None
        if not locked:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            created = False  # it is the other process's folder
            raise CryoaceInputError(f"another cryoace process{pid} is writing this {what}; wait for it to "
                                    "finish, or stop it first", folder)
        yield folder
    finally:
        if created and folder.is_dir() and [p.name for p in folder.iterdir()] in ([], [LOCK_NAME]):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            folder.rmdir()
        if fd is not None:
            os.close(fd)
