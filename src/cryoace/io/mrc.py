"""MRC / MRCS read and write (``mrcfile``), with voxel size (Å) and header origin (Å).

Arrays are in ``mrcfile`` order: volumes (z, y, x), stacks (n, y, x). Reads are memory-mapped so a
stack of millions of particles costs no RAM until images are indexed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import CryoaceInputError
from .atomic import atomic_path


@dataclasses.dataclass
class MrcData:
    """An MRC file's data (possibly a read-only memmap) with its voxel size and origin.

    data       : (z, y, x) volume, (n, y, x) stack or (y, x) image, as stored (not yet float32).
    voxel_size : Å/px along x (0.0 when the header has none).
    origin     : header origin (x, y, z) in Å.
    """

    data: np.ndarray
    voxel_size: float
    origin: tuple[float, float, float]


#: MRC modes of real numbers (int8, int16, float32, uint16, float16; 101 = 4-bit packed is not read)
_REAL_MODES = (0, 1, 2, 6, 12)


def open_mrc(path: str | os.PathLike, mmap: bool = True) -> MrcData:
    """Open an MRC/MRCS file (memory-mapped by default); old or slightly broken headers are accepted
    with ``permissive=True`` (e.g. files with no ``MAP`` id). Raises :class:`CryoaceInputError`."""
    path = Path(path)
    if not path.is_file():
        raise CryoaceInputError("file not found", path)
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                handle = opener(path, mode="r")
            except ValueError:
                handle = opener(path, mode="r", permissive=True)
            data = handle.data
            voxel_size = float(handle.voxel_size.x)
            origin = tuple(float(handle.header.origin[a]) for a in ("x", "y", "z"))
    except (ValueError, OSError) as exc:
        raise CryoaceInputError(f"not a readable MRC file ({exc})", path) from None
    mode = int(handle.header.mode)
    if mode not in _REAL_MODES:
        kind = "complex-valued " if mode in (3, 4) else ""
        raise CryoaceInputError(f"unsupported {kind}MRC mode {mode} (cryoace reads the real-valued modes "
                                f"{', '.join(map(str, sorted(_REAL_MODES)))})", path)
    if data is None:
        raise CryoaceInputError("MRC data block is missing or truncated", path)
    expected = int(handle.header.nx) * int(handle.header.ny) * int(handle.header.nz)
    if data.size != expected:
        raise CryoaceInputError(f"truncated MRC file: header promises {expected} values, "
                                f"file holds {data.size}", path)
    return MrcData(data=data, voxel_size=voxel_size, origin=origin)


def read_volume(path: str | os.PathLike) -> MrcData:
    """Read a cubic, even-sided 3D map into RAM as float32, checking it is finite."""
    mrc = open_mrc(path, mmap=False)
    data = np.asarray(mrc.data, dtype=np.float32)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise CryoaceInputError(f"expected a cubic 3D map, got shape {data.shape}", path)
    if data.shape[0] % 2:
        raise CryoaceInputError(f"box size {data.shape[0]} is odd; cryoace needs an even box", path)
    if not np.isfinite(data).all():
        raise CryoaceInputError("map contains NaN or Inf values", path)
    return MrcData(data=data, voxel_size=mrc.voxel_size, origin=mrc.origin)


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size: float,
              origin: tuple[float, float, float] | None = None, is_stack: bool | None = None) -> None:
    """Write ``data`` (float32) atomically with ``voxel_size`` (Å/px) and optional ``origin`` (Å).

    A 3D array is written as an image stack when ``is_stack`` is true or the name ends in ``.mrcs``.
    """
    path = Path(path)
    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    if is_stack is None:
        is_stack = path.suffix.lower() == ".mrcs"
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if is_stack and data.ndim == 3:
                mrc.set_image_stack()
            mrc.voxel_size = voxel_size
            if origin is not None:
                mrc.header.origin = origin
            mrc.update_header_stats()


class MrcStackWriter:
    """Write an (n, size, size) float32 image stack block by block, atomically, in constant memory.

    ``mrcfile`` writes the header (and a sparse file of the final size); the images are then appended
    with plain sequential writes, so neither RAM nor mapped pages grow with n (a memory map of a
    stack of millions of images would keep its dirty pages resident). On a clean exit the header's
    min / max / mean / rms are set from running sums and the file is renamed to ``path``; an error,
    or fewer than ``n`` images written, leaves nothing under ``path``.

        with MrcStackWriter(path, n, size, voxel_size=1.5) as stack:
            for block in blocks:
                stack.write(block)          # (k, size, size)
    """

    def __init__(self, path: str | os.PathLike, n: int, size: int, voxel_size: float):
        self.path, self.n, self.size, self.voxel_size = Path(path), int(n), int(size), float(voxel_size)
        self.written = 0
        self._min, self._max, self._sum, self._sumsq = np.inf, -np.inf, 0.0, 0.0

    def __enter__(self) -> MrcStackWriter:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            with mrcfile.new_mmap(tmp, shape=(self.n, self.size, self.size), mrc_mode=2, overwrite=True) as mrc:
                mrc.set_image_stack()
                mrc.voxel_size = self.voxel_size
                offset = int(mrc.header.nbytes + mrc.extended_header.nbytes)
            self._tmp = tmp
            self._file = open(tmp, "r+b")
            self._file.seek(offset)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, images: np.ndarray) -> None:
        """Append ``images`` (k, size, size), converted to little-endian float32."""
        block = np.ascontiguousarray(images, dtype="<f4")
        if block.ndim != 3 or block.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected images of shape (k, {self.size}, {self.size}), got {block.shape}")
        if self.written + len(block) > self.n:
            raise ValueError(f"{self.written + len(block)} images written to a stack of {self.n}")
        self._file.write(block.tobytes())
        self.written += len(block)
        if block.size:
            self._min = min(self._min, float(block.min()))
            self._max = max(self._max, float(block.max()))
            as64 = block.astype(np.float64)
            self._sum += float(as64.sum())
            self._sumsq += float(np.square(as64).sum())

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._file.close()
        if exc_type is not None:  # the temporary file is removed, the error goes on
            self._atomic.__exit__(exc_type, exc, tb)
            return False
        if self.written != self.n:
            error = ValueError(f"{self.written} of {self.n} images written to {self.path}")
            self._atomic.__exit__(ValueError, error, None)
            raise error
        count = self.written * self.size * self.size
        mean = self._sum / count
        with mrcfile.mmap(self._tmp, mode="r+") as mrc:
            header = mrc.header
            header.dmin, header.dmax, header.dmean = self._min, self._max, mean
            header.rms = np.sqrt(max(self._sumsq / count - mean * mean, 0.0))
        self._atomic.__exit__(None, None, None)
        return False
