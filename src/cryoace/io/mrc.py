"""MRC / MRCS read and write (``mrcfile``), with voxel size (Å) and header origin (Å).

Arrays are in ``mrcfile`` order: volumes (z, y, x), stacks (n, y, x). Reads are memory-mapped so a
stack of millions of particles costs no RAM until images are indexed.
"""

from __future__ import annotations

import dataclasses
import os
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
