"""The canonical particle table, stored compactly (about 40 bytes per particle).

:class:`ParticleTable` is what every metadata reader returns (RELION ``.star`` — :mod:`.star`,
cryoSPARC ``.cs`` — :mod:`.cryosparc`, cryoDRGN pickles + stack — :mod:`.cryodrgn`): one row per
particle, in our units (docs/conventions.md §1):

* rotations are matrices ``R`` equal to RELION's ``Euler_angles2matrix(rot, tilt, psi)``;
* shifts are in Å with exactly the meaning of RELION's ``rlnOriginX/YAngst``;
* CTF parameters follow RELION (defocus in Å, angles in radians inside, Cs in mm).

**Files without CTF.** A file with no defocus column has ``has_ctf = False`` and CTF parameters
chosen so that the RELION CTF is identically 1: defocus 0, Cs 0, amplitude contrast ``w = 1``,
phase shift 0, B 0 (then ``χ = arcsin(1) = π/2`` at every frequency and ``sin χ = 1``); the voltage
is the file's when positive, else 300 kV (any positive value gives the same result). So code that
always multiplies by the CTF is still right; code that wants to skip it checks ``has_ctf``.

**Files without angles** have ``pose = None``. Files that reference no images (no ``rlnImageName`` /
``blob/path``) have ``image_paths = image_indices = None``; they can be read, converted and written,
but :class:`~cryoace.io.particles.ParticleDataset` refuses them.

**Storage** (so that millions of particles fit; see :mod:`.columns`): stack paths are a
``pandas.Categorical`` (a small integer code per particle + the distinct paths), image indices int32,
CTF parameters float32 (≈1e-3 Å on a defocus), poses RELION's Euler angles and origins in float32
(:class:`EulerPoses`, ≈1e-7 on a matrix entry); a column whose values are all equal is one number
behind a read-only broadcast view. ``table.pose`` *computes* float64 matrices for every particle on
each access — code that needs some rows uses :meth:`ParticleTable.pose_rows`. ``table.extra`` of a
star file stays in the file until first asked for (then it is read and kept); writers stream it
with :meth:`ParticleTable.extra_frames` without loading it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import CryoaceInputError
from ..physics.rotations import euler_relion_to_rotmat, rotmat_to_euler_relion
from ..types import CTFParams, Pose, map_tensors
from .columns import CHUNK_ROWS, compact_array, compact_tensor, pack, row_chunks, take, unpack
from .starloop import LoopColumns

__all__ = ["ParticleTable", "EulerPoses", "no_ctf_params", "resolve_image_paths", "absolute_as_written",
           "as_row_indices"]


def no_ctf_params(n: int, voltage_kv: np.ndarray | float = 300.0) -> CTFParams:
    """CTF parameters (float32, shape (n,)) for which the RELION CTF is identically 1 (see module doc)."""
    voltage = np.broadcast_to(np.asarray(voltage_kv, dtype=np.float64), (n,))
    voltage = np.where(np.isfinite(voltage) & (voltage > 0), voltage, 300.0)
    zeros = torch.zeros(()).expand(n)
    return CTFParams(defocus_u=zeros, defocus_v=zeros, defocus_angle=zeros,
                     voltage_kv=compact_tensor(voltage, torch.float32), cs_mm=zeros,
                     amplitude_contrast=torch.ones(()).expand(n), phase_shift=zeros, bfactor=zeros)


def _take_tensor(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``values[rows]``, staying expanded for a constant column."""
    if len(values) and values.stride()[0] == 0:
        return values[:1].expand(len(rows))
    return values[rows]


@dataclasses.dataclass(frozen=True)
class EulerPoses:
    """Poses as RELION writes them, 20 bytes per particle: ``rot, tilt, psi`` (degrees) and the origins
    ``shift_x, shift_y`` (Å, ``rlnOriginX/YAngst``), each a float32 (N,) tensor (expanded when constant).
    :meth:`pose` turns rows into matrices."""

    rot: torch.Tensor
    tilt: torch.Tensor
    psi: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor

    @classmethod
    def from_degrees(cls, rot, tilt, psi, shift_x, shift_y) -> EulerPoses:
        return cls(*(compact_tensor(v, torch.float32) for v in (rot, tilt, psi, shift_x, shift_y)))

    @classmethod
    def from_pose(cls, pose: Pose) -> EulerPoses:
        """From matrices (RELION's ``Euler_matrix2angles``) and shifts."""
        degrees = torch.rad2deg(rotmat_to_euler_relion(pose.rotmat.double()))
        shift = pose.shift_angst.double()
        return cls.from_degrees(degrees[:, 0], degrees[:, 1], degrees[:, 2], shift[:, 0], shift[:, 1])

    def __len__(self) -> int:
        return len(self.rot)

    def take(self, rows: torch.Tensor) -> EulerPoses:
        return map_tensors(self, lambda t: _take_tensor(t, rows))

    def pose(self, dtype: torch.dtype = torch.float64) -> Pose:
        """The matrices ``R = Euler_angles2matrix(rot, tilt, psi)`` and shifts of every row."""
        rot, tilt, psi = (torch.deg2rad(t.double()) for t in (self.rot, self.tilt, self.psi))
        shift = torch.stack([self.shift_x, self.shift_y], dim=-1)
        return Pose(rotmat=euler_relion_to_rotmat(rot, tilt, psi).to(dtype).contiguous(),
                    shift_angst=shift.to(dtype))


def _drop_unused(paths: pd.Categorical) -> pd.Categorical:
    """``paths`` without categories no row uses (checked chunk by chunk: no O(N) temporaries)."""
    k = len(paths.categories)
    if k <= 1 and len(paths):
        return paths
    codes = paths.codes
    used = np.zeros(k, dtype=bool)
    for start, stop in row_chunks(len(codes)):
        used[np.unique(codes[start:stop])] = True
    if used.all():
        return paths
    renumber = (np.cumsum(used) - 1).astype(codes.dtype)
    new = np.empty_like(codes)
    for start, stop in row_chunks(len(codes)):
        new[start:stop] = renumber[codes[start:stop]]
    return pd.Categorical.from_codes(new, paths.categories[used])


@dataclasses.dataclass(init=False, eq=False)
class ParticleTable:
    """Particle metadata, one row per particle, in cryoace units (storage: see the module docstring).

    source        : the metadata file this table was read from (absolute path).
    image_paths   : (N,) absolute stack paths as a ``pandas.Categorical`` (any sequence of str is
                    accepted), or None when the file references no images. Stacks need not exist
                    until a dataset is built.
    image_indices : (N,) int32 0-based index of each image in its stack (None with image_paths).
    pixel_size    : (N,) float64 Å/px of the images as stored.
    ctf           : CTFParams, float32 tensors of shape (N,) (identically-1 CTF if not has_ctf).
    has_ctf       : whether the file had CTF parameters (defocus).
    pose          : Pose (float64: rotmat (N,3,3) = RELION's matrix, shift_angst (N,2) = rlnOriginX/YAngst)
                    computed from the stored :class:`EulerPoses` on access; None when the file has no
                    angles. Assigning a Pose (or EulerPoses) stores it compactly.
    image_size    : (N,) int64 box size the metadata promises (rlnImageSize / blob/shape), or None.
    optics        : the file's optics table (RELION 3.1+ ``data_optics``), or None.
    extra         : (N rows) the file's other per-particle columns — everything that is not represented
                    by the fields above (RELION: all columns except image name, angles, origins, CTF,
                    pixel size and optics values; ``rlnOpticsGroup`` is kept here). Written back by
                    ``write_star``. May be given as a :class:`~cryoace.io.starloop.LoopColumns` (read
                    from the file on first access).
    absolute_stacks : the stack paths (as in ``image_paths``) that the file named by an absolute path;
                    written back absolute, every other one relative to the written file's folder.
    """

    # A dataclass so that dataclasses.fields/replace work as on any table; image_paths, pose and extra
    # are properties over their compact stored forms (_image_paths, _pose, _extra).
    source: Path
    image_paths: pd.Categorical | None
    image_indices: np.ndarray | None
    pixel_size: np.ndarray
    ctf: CTFParams
    has_ctf: bool
    pose: Pose | None
    image_size: np.ndarray | None
    optics: pd.DataFrame | None
    extra: pd.DataFrame
    absolute_stacks: frozenset[str]
    #: the folder the stacks were looked up in when one was given (--datadir); only for messages
    datadir = None

    def __init__(self, source: str | os.PathLike, image_paths, image_indices, pixel_size, ctf: CTFParams,
                 has_ctf: bool = True, pose: Pose | EulerPoses | None = None, image_size=None,
                 optics: pd.DataFrame | None = None, extra: pd.DataFrame | LoopColumns | None = None,
                 absolute_stacks=frozenset()):
        self.source = Path(source)
        self.pixel_size = compact_array(pixel_size, np.float64)
        if image_paths is not None and image_indices is None:
            raise CryoaceInputError("image paths given without image indices", self.source)
        self.image_paths = image_paths
        self.image_indices = None if image_indices is None else _int32_indices(image_indices, self.source)
        self.ctf = CTFParams(*(compact_tensor(getattr(ctf, f.name), torch.float32)
                               for f in dataclasses.fields(CTFParams)))
        self.has_ctf = bool(has_ctf)
        self.pose = pose
        self.image_size = None if image_size is None else compact_array(image_size, np.int64)
        self.optics = optics
        self.extra = extra
        self.absolute_stacks = frozenset(map(str, absolute_stacks))
        self._validate()

    def _validate(self) -> None:
        n = len(self)
        counts = {"pixel_size": n, "ctf": len(self.ctf.defocus_u), "extra": len(self._extra)}
        for name in ("image_paths", "image_indices", "image_size"):
            value = getattr(self, name)
            if value is not None:
                counts[name] = len(value)
        if self._pose is not None:
            counts["pose"] = len(self._pose)
        if len(set(counts.values())) != 1:
            listing = ", ".join(f"{k}={v}" for k, v in counts.items())
            raise CryoaceInputError(f"particle counts do not match ({listing})", self.source)
        ps = self.pixel_size
        bad = ~(np.isfinite(ps) & (ps > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CryoaceInputError(f"pixel size must be a positive number, {particle_number(i)} has "
                                    f"{ps[i]:g} ({int(bad.sum())} bad rows)", self.source)

    # -- stored compactly -------------------------------------------------------------------------
    @property
    def image_paths(self) -> pd.Categorical | None:
        return self._image_paths

    @image_paths.setter
    def image_paths(self, value) -> None:
        if value is not None and not isinstance(value, pd.Categorical):
            value = pd.Categorical(np.asarray(value, dtype=object).reshape(-1))
        self._image_paths = None if value is None else _drop_unused(value)

    @property
    def pose(self) -> Pose | None:
        """Float64 matrices and shifts of every particle, computed on each access (O(N) memory)."""
        return None if self._pose is None else self._pose.pose()

    @pose.setter
    def pose(self, value: Pose | EulerPoses | None) -> None:
        self._pose = value if value is None or isinstance(value, EulerPoses) else EulerPoses.from_pose(value)

    @property
    def pose_angles(self) -> EulerPoses | None:
        """The stored poses (RELION's Euler angles and origins, float32), or None."""
        return self._pose

    @property
    def extra(self) -> pd.DataFrame:
        """The other columns as a DataFrame (a star file's are read from it now, then kept)."""
        if isinstance(self._extra, LoopColumns):
            self._extra = self._extra.frame()
        return self._extra

    @extra.setter
    def extra(self, value: pd.DataFrame | LoopColumns | None) -> None:
        self._extra = pd.DataFrame(index=pd.RangeIndex(len(self))) if value is None else value

    def __getstate__(self) -> dict:
        return {k: pack(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({k: unpack(v) for k, v in state.items()})

    def __repr__(self) -> str:
        return (f"ParticleTable({len(self)} particles from {self.source}, "
                f"{len(self.stack_paths)} stacks, has_ctf={self.has_ctf}, has_pose={self.has_pose})")

    # -- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pixel_size)

    @property
    def has_images(self) -> bool:
        return self.image_paths is not None

    @property
    def has_pose(self) -> bool:
        return self._pose is not None

    @property
    def stack_paths(self) -> list[str]:
        """The distinct stack paths, in order of first appearance (empty without images)."""
        if self.image_paths is None:
            return []
        return [str(p) for p in pd.unique(self.image_paths)]

    def pose_rows(self, rows) -> Pose | None:
        """The float64 poses of the rows ``rows`` (int array, list, slice or boolean mask), or None."""
        if self._pose is None:
            return None
        return self._pose.take(torch.from_numpy(as_row_indices(rows, len(self)))).pose()

    @property
    def extra_columns(self) -> list[str]:
        """Names of the extra columns (without reading them)."""
        extra = self._extra
        return list(extra.names if isinstance(extra, LoopColumns) else extra.columns)

    def extra_column(self, name: str) -> np.ndarray | None:
        """The values of one extra column (numbers where all parse as numbers, else its text), or None
        when the table has no such column; reads only that column (chunk by chunk)."""
        if name not in self.extra_columns:
            return None
        values = pd.concat([chunk[name] for chunk in self.extra_frames([name])], ignore_index=True)
        numeric = pd.to_numeric(values, errors="coerce")
        return (numeric if numeric.notna().all() else values).to_numpy()

    def extra_frames(self, columns: Sequence[str] | None = None,
                     chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
        """The extra columns (``columns``, default all) in consecutive chunks of exactly ``chunk_rows``
        rows (the last one fewer: the chunks of :func:`~cryoace.io.columns.row_chunks`), each indexed
        by row number; columns still in a star file come as their text. At least one (maybe empty)
        chunk."""
        extra = self._extra
        if isinstance(extra, LoopColumns):
            chunks = _exact_chunks(extra.frames(columns, chunk_rows), chunk_rows)
        else:
            frame = extra if columns is None else extra[list(columns)]
            chunks = (frame.iloc[a:b].set_axis(pd.RangeIndex(a, b)) for a, b in row_chunks(len(self), chunk_rows))
        empty = True
        for chunk in chunks:
            empty = False
            yield chunk
        if empty:
            yield pd.DataFrame(columns=self.extra_columns if columns is None else list(columns))

    # -- new tables -------------------------------------------------------------------------------
    def subset(self, indices) -> ParticleTable:
        """A new table with the rows ``indices`` (int array, list, slice or boolean mask), in that order."""
        idx = as_row_indices(indices, len(self))
        rows = torch.from_numpy(idx)
        extra = self._extra
        extra = extra.take(idx) if isinstance(extra, LoopColumns) else extra.iloc[idx].reset_index(drop=True)
        return self._derived(
            self.source, None if self.image_paths is None else self.image_paths[idx],
            None if self.image_indices is None else self.image_indices[idx], take(self.pixel_size, idx),
            map_tensors(self.ctf, lambda t: _take_tensor(t, rows)), self.has_ctf,
            None if self._pose is None else self._pose.take(rows),
            None if self.image_size is None else take(self.image_size, idx),
            None if self.optics is None else self.optics.copy(), extra, self.absolute_stacks)

    def _derived(self, *fields) -> ParticleTable:
        """A new table of ``fields`` (the constructor's arguments) that keeps this one's ``datadir``."""
        table = ParticleTable(*fields)
        table.datadir = self.datadir
        return table

    def remap_stacks(self, mapping: Mapping[str, str | os.PathLike]) -> ParticleTable:
        """Point stacks elsewhere: keys are absolute stack paths or stack file names (basenames).

        E.g. ``table.remap_stacks({"batch_0_restacked.mrc": "/data/trpv1_small_stack.mrcs"})``.
        """
        if self.image_paths is None or not mapping:
            return self
        by_key = {os.fspath(k): os.path.abspath(os.fspath(v)) for k, v in mapping.items()}
        new = [by_key.get(u, by_key.get(os.path.basename(u), u)) for u in map(str, self.image_paths.categories)]
        codes, uniques = pd.factorize(np.asarray(new, dtype=object))
        old = self.image_paths.codes
        if not np.array_equal(codes, np.arange(len(codes))):
            old = codes.astype(old.dtype)[old]
        return self._derived(self.source, pd.Categorical.from_codes(old, uniques), self.image_indices,
                             self.pixel_size, self.ctf, self.has_ctf, self._pose, self.image_size,
                             self.optics, self._extra, self.absolute_stacks)


def _exact_chunks(chunks: Iterator[pd.DataFrame], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """Consecutive row-indexed ``chunks`` of any sizes regrouped into chunks of exactly ``chunk_rows``
    rows (the last one fewer). Fixed sizes matter downstream: a pose source called per chunk then
    always runs the same batch shapes, which keeps the C allocator from fragmenting (and the peak
    memory of predicting millions of poses flat)."""
    pending: list[pd.DataFrame] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        while held >= chunk_rows:
            whole = pending[0] if len(pending) == 1 else pd.concat(pending)
            yield whole.iloc[:chunk_rows]
            rest = whole.iloc[chunk_rows:]
            pending, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield pending[0] if len(pending) == 1 else pd.concat(pending)


def _int32_indices(values, source: Path) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if len(arr) and arr.dtype != np.int32:
        low, high = arr.min(), arr.max()
        if low < 0 or high > np.iinfo(np.int32).max:
            i = int(np.argmin(arr)) if low < 0 else int(np.argmax(arr))
            raise CryoaceInputError(f"image {arr[i] + 1} at {particle_number(i)} is out of range", source)
    elif len(arr) and arr.min() < 0:
        i = int(np.argmin(arr))
        raise CryoaceInputError(f"negative image index at {particle_number(i)}", source)
    return arr.astype(np.int32, copy=False)


def as_row_indices(indices, n: int) -> np.ndarray:
    """int / slice / list / array / bool mask / tensor → int64 array of rows in [0, n)."""
    if isinstance(indices, slice):
        return np.arange(n, dtype=np.int64)[indices]
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean mask of shape {arr.shape} for {n} particles")
        return np.flatnonzero(arr).astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexError(f"particle indices must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.min() < -n or arr.max() >= n:
        raise IndexError(f"particle index out of range for {n} particles")
    return np.where(arr < 0, arr + n, arr)


def absolute_as_written(raw_paths: Sequence[str] | np.ndarray, resolved: Sequence[str] | np.ndarray) -> frozenset[str]:
    """The resolved stack paths whose name in the file (``raw_paths``, same order) was absolute."""
    return frozenset(str(r) for w, r in zip(raw_paths, resolved, strict=True) if os.path.isabs(str(w)))


#: how particles and images are numbered in messages: both from 1, as RELION's image numbers are
COUNTED_FROM_1 = "particles and images counted from 1"


def particle_number(row: int) -> str:
    """``particle N``: the 0-based table ``row`` as the 1-based number a message shows."""
    return f"particle {int(row) + 1}"


def resolve_image_paths(raw_paths: Sequence[str] | np.ndarray, base_dir: str | os.PathLike,
                        datadir: str | os.PathLike | None = None,
                        extra_bases: Sequence[str | os.PathLike] = ()) -> np.ndarray:
    """Resolve stack paths as written in a metadata file to absolute paths (one lookup per distinct path).

    Without ``datadir``: ``base_dir/path``, then each of ``extra_bases``/path, then ``base_dir/basename``.
    With ``datadir``: ``datadir/path``, then ``datadir/basename``. Absolute paths are tried as they are
    first. The first candidate that exists wins; if none exists, the first candidate is kept (the
    dataset reports it as missing).
    """
    raw = np.asarray(raw_paths, dtype=object)
    codes, uniques = pd.factorize(raw)
    base_dir = Path(base_dir)
    resolved = []
    for u in uniques:
        u = str(u)
        name = os.path.basename(u)
        cands: list[Path] = []
        if os.path.isabs(u):
            cands.append(Path(u))
        if datadir is not None:
            d = Path(datadir)
            cands += [d / u, d / name]
        else:
            cands.append(base_dir / u)
            cands += [Path(b) / u for b in extra_bases]
            cands.append(base_dir / name)
        chosen = next((c for c in cands if c.is_file()), cands[0])
        resolved.append(os.path.normpath(os.path.abspath(chosen)))
    return np.asarray(resolved, dtype=object)[codes] if len(raw) else np.zeros(0, dtype=object)
