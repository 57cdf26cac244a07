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
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_paths", "naming", "os_error_in", "remove_stale_staging", "staged_folder"]


def os_error_in(exc: BaseException) -> OSError | None:
    """The :class:`OSError` behind ``exc`` (itself, or in its cause/context chain), if any.

    Writers such as ``torch.save`` or ``mrcfile`` may wrap a failed ``write`` (ENOSPC) in a
    RuntimeError whose own text says nothing useful; the OSError survives as its context.
    """
    from ..errors import CryoaceInputError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CryoaceInputError):  # already a message of its own
            return None
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
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
            named = None if cause is None or cause.filename is None else os.fsdecode(cause.filename)
            if cause is None or (named is not None and named not in map(str, temps)):
                raise  # not a failed write of these outputs (e.g. an input that could not be read)
            # name the target whose temporary failed (a nameless ENOSPC: the first)
            culprit = next((t for t, p in zip(targets, temps, strict=True) if named == str(p)), targets[0])
            raise naming(cause, culprit) from exc
        # mkstemp creates the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(temps, targets, strict=True):
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


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that killed runs left beside ``target`` (those whose lock no live
    process holds); return them."""
    import shutil

    from .lock import is_locked

    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = [p for p in target.parent.glob(_staging_prefix(target) + "*") if p.is_dir() and not is_locked(p)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, replaced: list[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a new hidden folder beside ``target`` to write a whole output folder into; when the block
    succeeds its files go into ``target`` (the folder is renamed to ``target`` when that does not exist
    yet; else ``replaced`` are removed from ``target`` and the new files moved in), else it is removed.

    The folder is locked while it is written (:mod:`cryoace.io.lock`), so a process killed mid-way
    (kill -9) leaves only a hidden ``.NAME.partial-*`` folder that :func:`remove_stale_staging` knows
    to be garbage, never a half-written dataset under ``target``.
    """
    import shutil

    from .lock import LOCK_NAME, folder_lock

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's folder is private; the dataset folder should not be
    except OSError as exc:
        raise naming(exc, target) from None
    try:
        with folder_lock(stage, "staging folder"):
            try:
                yield stage
            except BaseException as exc:
                cause = os_error_in(exc)
                name = None if cause is None or cause.filename is None else os.fsdecode(cause.filename)
                if cause is None or (name is not None and not name.startswith(str(stage))):
                    raise  # not a failed write into the folder
                # name the file as the user will know it: in target, not in the hidden staging folder
                shown = target if name is None else target / Path(name).relative_to(stage)
                raise naming(cause, shown) from exc
            (stage / LOCK_NAME).unlink()  # the lock itself stays held until the files are in place
            try:
                if not target.exists():
                    os.rename(stage, target)
                    return
                for old in replaced:
                    Path(old).unlink(missing_ok=True)
                for new in sorted(stage.iterdir()):
                    os.replace(new, target / new.name)
            except OSError as exc:
                raise naming(exc, target) from None
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
