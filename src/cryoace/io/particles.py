"""The canonical particle table and the lazy, memory-mapped particle dataset.

:class:`ParticleTable` is what every metadata reader returns (RELION ``.star`` — :mod:`.star`,
cryoSPARC ``.cs`` — :mod:`.cryosparc`, cryoDRGN pickles + stack — :mod:`.cryodrgn`): one row per
particle, in our units (DESIGN.md §1):

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
but :class:`ParticleDataset` refuses them.

:class:`ParticleDataset` reads images lazily: each stack is memory-mapped (``open_mrc``) on first use,
one handle per stack path (a bounded LRU cache), and a batch read groups its particles by stack,
sorts their indices, fancy-indexes the memmap once per stack and restores the requested order — no
Python loop per particle, and memory does not grow with the number of particles. Handles are dropped
when the dataset is pickled, so ``torch.utils.data.DataLoader`` workers re-open their own::

    loader = DataLoader(dataset, batch_size=None, num_workers=4,
                        sampler=BatchSampler(RandomSampler(dataset), 256, drop_last=False))
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.utils.data

from ..errors import CryoaceInputError
from ..physics.fourier import fourier_crop
from ..types import CTFParams, ParticleBatch, Pose
from .mrc import open_mrc

__all__ = [
    "ParticleTable",
    "ParticleDataset",
    "read_particles",
    "no_ctf_params",
    "resolve_image_paths",
    "collate_particles",
]


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

def no_ctf_params(n: int, voltage_kv: np.ndarray | float = 300.0) -> CTFParams:
    """CTF parameters (float64, shape (n,)) for which the RELION CTF is identically 1 (see module doc)."""
    voltage = np.broadcast_to(np.asarray(voltage_kv, dtype=np.float64), (n,))
    voltage = np.where(np.isfinite(voltage) & (voltage > 0), voltage, 300.0)
    zeros = np.zeros(n)
    return CTFParams.create(defocus_u=zeros, defocus_v=zeros, defocus_angle=zeros, voltage_kv=voltage,
                            cs_mm=zeros, amplitude_contrast=np.ones(n), phase_shift=zeros,
                            bfactor=zeros, dtype=torch.float64)


@dataclasses.dataclass
class ParticleTable:
    """Particle metadata, one row per particle, in cryoace units.

    source        : the metadata file this table was read from (absolute path).
    image_paths   : (N,) object array of absolute stack paths (str), or None when the file
                    references no images. Stacks need not exist until a dataset is built.
    image_indices : (N,) int64 0-based index of each image in its stack (None with image_paths).
    pixel_size    : (N,) float64 Å/px of the images as stored.
    ctf           : CTFParams, float64 tensors of shape (N,) (identically-1 CTF if not has_ctf).
    has_ctf       : whether the file had CTF parameters (defocus).
    pose          : Pose (float64: rotmat (N,3,3) = RELION's matrix, shift_angst (N,2) = rlnOriginX/YAngst)
                    or None when the file has no angles.
    image_size    : (N,) int64 box size the metadata promises (rlnImageSize / blob/shape), or None.
    optics        : the file's optics table (RELION 3.1+ ``data_optics``), or None.
    extra         : (N rows) the file's other per-particle columns — everything that is not represented
                    by the fields above (RELION: all columns except image name, angles, origins, CTF,
                    pixel size and optics values; ``rlnOpticsGroup`` is kept here). Written back by
                    ``write_star``.
    """

    source: Path
    image_paths: np.ndarray | None
    image_indices: np.ndarray | None
    pixel_size: np.ndarray
    ctf: CTFParams
    has_ctf: bool = True
    pose: Pose | None = None
    image_size: np.ndarray | None = None
    optics: pd.DataFrame | None = None
    extra: pd.DataFrame | None = None

    def __post_init__(self):
        self.source = Path(self.source)
        self.pixel_size = np.asarray(self.pixel_size, dtype=np.float64).reshape(-1)
        n = len(self.pixel_size)
        if self.image_paths is not None:
            self.image_paths = np.asarray(self.image_paths, dtype=object).reshape(-1)
            if self.image_indices is None:
                raise CryoaceInputError("image paths given without image indices", self.source)
        if self.image_indices is not None:
            self.image_indices = np.asarray(self.image_indices, dtype=np.int64).reshape(-1)
        if self.image_size is not None:
            self.image_size = np.asarray(self.image_size, dtype=np.int64).reshape(-1)
        if self.extra is None:
            self.extra = pd.DataFrame(index=pd.RangeIndex(n))
        counts = {"pixel_size": n, "ctf": int(self.ctf.defocus_u.shape[0]) if self.ctf.defocus_u.ndim else 1,
                  "extra": len(self.extra)}
        for name in ("image_paths", "image_indices", "image_size"):
            value = getattr(self, name)
            if value is not None:
                counts[name] = len(value)
        if self.pose is not None:
            counts["pose.rotmat"] = int(self.pose.rotmat.shape[0])
            counts["pose.shift_angst"] = int(self.pose.shift_angst.shape[0])
        if len(set(counts.values())) != 1:
            listing = ", ".join(f"{k}={v}" for k, v in counts.items())
            raise CryoaceInputError(f"particle counts do not match ({listing})", self.source)
        bad = ~(np.isfinite(self.pixel_size) & (self.pixel_size > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CryoaceInputError(f"pixel size must be a positive number, particle row {i} has "
                                    f"{self.pixel_size[i]:g} ({int(bad.sum())} bad rows)", self.source)
        if self.image_indices is not None and len(self.image_indices) and self.image_indices.min() < 0:
            i = int(np.argmin(self.image_indices))
            raise CryoaceInputError(f"negative image index at particle row {i}", self.source)

    def __len__(self) -> int:
        return len(self.pixel_size)

    @property
    def has_images(self) -> bool:
        return self.image_paths is not None

    @property
    def stack_paths(self) -> list[str]:
        """The distinct stack paths, in order of first appearance (empty without images)."""
        if self.image_paths is None:
            return []
        return list(pd.unique(self.image_paths))

    def subset(self, indices) -> "ParticleTable":
        """A new table with the rows ``indices`` (int array, list, slice or boolean mask), in that order."""
        idx = _as_row_indices(indices, len(self))
        tidx = torch.as_tensor(idx, dtype=torch.long)

        def take(a):
            return None if a is None else a[idx]

        return dataclasses.replace(
            self,
            image_paths=take(self.image_paths), image_indices=take(self.image_indices),
            pixel_size=self.pixel_size[idx], image_size=take(self.image_size),
            ctf=self.ctf[tidx], pose=None if self.pose is None else self.pose[tidx],
            extra=self.extra.iloc[idx].reset_index(drop=True),
            optics=None if self.optics is None else self.optics.copy(),
        )

    def remap_stacks(self, mapping: Mapping[str, str | os.PathLike]) -> "ParticleTable":
        """Point stacks elsewhere: keys are absolute stack paths or stack file names (basenames).

        E.g. ``table.remap_stacks({"batch_0_restacked.mrc": "/data/trpv1_small_stack.mrcs"})``.
        """
        if self.image_paths is None or not mapping:
            return self
        codes, uniques = pd.factorize(self.image_paths)
        by_key = {os.fspath(k): os.path.abspath(os.fspath(v)) for k, v in mapping.items()}
        new = [by_key.get(u, by_key.get(os.path.basename(u), u)) for u in uniques]
        return dataclasses.replace(self, image_paths=np.asarray(new, dtype=object)[codes])


def _as_row_indices(indices, n: int) -> np.ndarray:
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


def read_particles(path: str | os.PathLike, datadir: str | os.PathLike | None = None,
                   pixel_size: float | None = None,
                   stack_map: Mapping[str, str | os.PathLike] | None = None) -> ParticleTable:
    """Read particle metadata, dispatching on the suffix.

    ``.star`` → RELION 3.0 / 3.1 / 5 (:func:`cryoace.io.star.read_star`); ``.cs`` → cryoSPARC
    (:func:`cryoace.io.cryosparc.read_cs`); ``.mrcs`` / ``.mrc`` → a bare stack with no poses and no
    CTF (:func:`cryoace.io.cryodrgn.table_from_stack`).

    datadir    : where image stacks live, when not where the metadata file says (tried as
                 ``datadir/path`` then ``datadir/basename``).
    pixel_size : Å/px replacing the file's pixel size (needed for files that have none).
    stack_map  : {stack path or basename: replacement path}, see :meth:`ParticleTable.remap_stacks`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        from .star import read_star
        return read_star(path, datadir=datadir, pixel_size=pixel_size, stack_map=stack_map)
    if suffix == ".cs":
        from .cryosparc import read_cs
        return read_cs(path, datadir=datadir, pixel_size=pixel_size, stack_map=stack_map)
    if suffix in (".mrcs", ".mrc"):
        from .cryodrgn import table_from_stack
        table = table_from_stack(path, pixel_size=pixel_size)
        return table.remap_stacks(stack_map or {})
    if not path.exists():
        raise CryoaceInputError("file not found", path)
    raise CryoaceInputError(f"unsupported particle file type {path.suffix!r}: expected a RELION .star, "
                            "a cryoSPARC .cs or an .mrcs stack", path)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

def collate_particles(items: Sequence[ParticleBatch]) -> ParticleBatch:
    """Stack unbatched ParticleBatch items (``dataset[i]`` with an int) into a batch (a DataLoader
    ``collate_fn``). Pose is kept only if every item has one."""
    def stack(objs):
        first = objs[0]
        changes = {}
        for f in dataclasses.fields(first):
            values = [getattr(o, f.name) for o in objs]
            if isinstance(values[0], torch.Tensor):
                changes[f.name] = torch.stack(values)
            elif dataclasses.is_dataclass(values[0]) and all(v is not None for v in values):
                changes[f.name] = stack(values)
            else:
                changes[f.name] = None
        return dataclasses.replace(first, **changes)

    return stack(list(items))


class ParticleDataset(torch.utils.data.Dataset):
    """Lazy images + metadata; ``dataset[indices]`` returns a :class:`~cryoace.types.ParticleBatch`.

    table           : a :class:`ParticleTable` that references images.
    downsample      : output box size (even, ≤ stack box); images are Fourier-cropped and the pixel size
                      scales by box/downsample. None keeps the stored box.
    invert_contrast : multiply images by -1 (for stacks with dark particles; DESIGN.md §1).
    normalize       : return ``(img - norm_mean) / norm_std``, with mean and std estimated once (after
                      inversion and downsampling) from a seeded random sample of up to ``norm_sample``
                      images (attributes ``norm_mean``, ``norm_std``).
    max_open_stacks : memory-mapped stacks kept open at once (least recently used are closed).

    Indexing: an int gives an unbatched item (images (L, L)); an int array / list / slice / bool mask /
    tensor gives a batch (B, L, L) in the requested order. Images are float32; CTF, pose and pixel
    size float32; ``index`` holds the table rows. NaN/Inf pixels raise :class:`CryoaceInputError`
    naming the stack and the particle.
    """

    def __init__(self, table: ParticleTable, downsample: int | None = None, invert_contrast: bool = False,
                 normalize: bool = True, norm_sample: int = 1000, seed: int = 0,
                 max_open_stacks: int = 64):
        self.table = table
        self.invert_contrast = bool(invert_contrast)
        self.normalize = bool(normalize)
        self.max_open_stacks = max(1, int(max_open_stacks))
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        if len(table) == 0:
            raise CryoaceInputError("the particle table is empty", table.source)
        if table.image_paths is None:
            raise CryoaceInputError("the file references no particle images (missing column "
                                    "rlnImageName / field blob/path)", table.source)
        codes, uniques = pd.factorize(table.image_paths)
        self._stack_codes = codes.astype(np.int32)
        self._stack_paths = [str(u) for u in uniques]
        self._validate_stacks()
        box = self.box_size
        if downsample is None or int(downsample) == box:
            self._out_size = box
        else:
            d = int(downsample)
            if d <= 0 or d % 2 or d > box:
                raise CryoaceInputError(f"downsample size must be even, positive and at most the box "
                                        f"size {box}, got {downsample}", table.source)
            self._out_size = d
        self._scale = box / self._out_size
        # Per-row tensors, built once (float32 for batches).
        self._pixel_size = torch.as_tensor(table.pixel_size * self._scale, dtype=torch.float32)
        self._ctf = table.ctf.to(torch.float32)
        self._pose = None if table.pose is None else table.pose.to(torch.float32)
        self.norm_mean, self.norm_std = 0.0, 1.0
        if self.normalize:
            self.norm_mean, self.norm_std = self._estimate_norm(norm_sample, seed)

    # -- validation ---------------------------------------------------------------------------
    def _validate_stacks(self) -> None:
        table = self.table
        missing = [p for p in self._stack_paths if not os.path.isfile(p)]
        if missing:
            more = f" ({len(missing)} of {len(self._stack_paths)} stacks are missing)" if len(missing) > 1 else ""
            raise CryoaceInputError(f"image stack referenced by {table.source} not found{more}; "
                                    "pass datadir=/--datadir or remap the stacks", missing[0])
        n_images = np.zeros(len(self._stack_paths), dtype=np.int64)
        boxes = np.zeros(len(self._stack_paths), dtype=np.int64)
        for k, p in enumerate(self._stack_paths):
            shape = self._open(k).shape
            ny, nx = shape[-2], shape[-1]
            if ny != nx:
                raise CryoaceInputError(f"images are not square ({ny} x {nx} pixels)", p)
            if nx % 2:
                raise CryoaceInputError(f"box size {nx} is odd; cryoace needs an even box "
                                        "(crop or pad the stack by one pixel)", p)
            n_images[k], boxes[k] = shape[0], nx
        self._cache.clear()
        row_n = n_images[self._stack_codes]
        bad = table.image_indices >= row_n
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CryoaceInputError(
                f"particle row {i} of {table.source} asks for image {table.image_indices[i] + 1} (1-based) "
                f"but the stack holds {row_n[i]} images ({int(bad.sum())} of {len(bad)} rows out of range)",
                self._stack_paths[self._stack_codes[i]])
        if len(set(boxes.tolist())) > 1:
            k = int(np.flatnonzero(boxes != boxes[0])[0])
            raise CryoaceInputError(f"box size {boxes[k]} differs from {boxes[0]} of "
                                    f"{self._stack_paths[0]}; all stacks must share one box",
                                    self._stack_paths[k])
        if table.image_size is not None:
            bad = table.image_size != boxes[self._stack_codes]
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise CryoaceInputError(
                    f"the metadata gives image size {table.image_size[i]} for particle row {i} of "
                    f"{table.source} but the stack's box is {boxes[self._stack_codes[i]]}",
                    self._stack_paths[self._stack_codes[i]])
        self._box = int(boxes[0])

    # -- stacks -------------------------------------------------------------------------------
    def _open(self, code: int) -> np.ndarray:
        data = self._cache.get(code)
        if data is not None:
            self._cache.move_to_end(code)
            return data
        data = open_mrc(self._stack_paths[code], mmap=True).data
        if data.ndim == 2:
            data = data[None]
        elif data.ndim != 3:
            raise CryoaceInputError(f"expected an image stack, got an array of shape {data.shape}",
                                    self._stack_paths[code])
        self._cache[code] = data
        while len(self._cache) > self.max_open_stacks:
            self._cache.popitem(last=False)
        return data

    def stack_array(self, path_or_code: int | str) -> np.ndarray:
        """The memory-mapped (n, L, L) array of one stack (by code or path), as the dataset reads it."""
        code = path_or_code if isinstance(path_or_code, (int, np.integer)) else \
            self._stack_paths.index(os.path.normpath(os.path.abspath(path_or_code)))
        return self._open(int(code))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = collections.OrderedDict()  # memmaps are re-opened in the new process
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    # -- reading ------------------------------------------------------------------------------
    def _read_raw(self, rows: np.ndarray) -> np.ndarray:
        """Stored images of table rows (B, L, L) float32, one fancy-index per stack, order preserved."""
        box = self._box
        out = np.empty((len(rows), box, box), dtype=np.float32)
        if len(rows) == 0:
            return out
        codes = self._stack_codes[rows]
        local = self.table.image_indices[rows]
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(order)]):
            group = order[start:stop]
            code = int(sorted_codes[start])
            li = local[group]
            o = np.argsort(li, kind="stable")
            images = self._open(code)[li[o]]
            out[group[o]] = images
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            j = int(np.flatnonzero(~finite)[0])
            raise CryoaceInputError(
                f"image {local[j] + 1} (1-based; particle row {rows[j]} of {self.table.source}) "
                "contains NaN or Inf pixels", self._stack_paths[codes[j]])
        return out

    def _images(self, rows: np.ndarray, normalize: bool) -> torch.Tensor:
        images = torch.from_numpy(self._read_raw(rows))
        if self._out_size != self._box:
            images = fourier_crop(images, self._out_size)
        if self.invert_contrast:
            images = images.neg()
        if normalize:
            images = (images - self.norm_mean) / self.norm_std
        return images.contiguous()

    def _estimate_norm(self, sample: int, seed: int) -> tuple[float, float]:
        n = len(self)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=min(n, max(1, int(sample))), replace=False))
        total, total_sq, count = 0.0, 0.0, 0
        chunk = max(1, (64 * 2 ** 20) // (4 * self._box * self._box))  # ~64 MiB of raw pixels
        for start in range(0, len(rows), chunk):
            x = self._images(rows[start:start + chunk], normalize=False).double()
            total += float(x.sum())
            total_sq += float((x * x).sum())
            count += x.numel()
        mean = total / count
        var = max(total_sq / count - mean * mean, 0.0)
        std = math.sqrt(var)
        return float(mean), float(std if std > 0 else 1.0)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key) -> ParticleBatch:
        single = isinstance(key, (int, np.integer))
        rows = _as_row_indices([key] if single else key, len(self))
        batch = self.make_batch(rows, self._images(rows, self.normalize))
        return batch[0] if single else batch

    def make_batch(self, rows: np.ndarray, images: torch.Tensor) -> ParticleBatch:
        """The batch of table ``rows`` (int64 array) with ``images`` already read (e.g. preloaded)."""
        t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return ParticleBatch(
            images=images,
            pixel_size=self._pixel_size[t],
            ctf=self._ctf[t],
            index=t.clone(),
            pose=None if self._pose is None else self._pose[t],
        )

    def subset(self, indices) -> "ParticleDataset":
        """A dataset of the rows ``indices`` of this one (in that order), prepared exactly like it: the
        same box, contrast and normalization (``norm_mean``/``norm_std`` are copied, not re-estimated,
        so e.g. two half sets see the same image scale)."""
        sub = ParticleDataset(self.table.subset(indices), downsample=self._out_size,
                              invert_contrast=self.invert_contrast, normalize=False,
                              max_open_stacks=self.max_open_stacks)
        sub.normalize, sub.norm_mean, sub.norm_std = self.normalize, self.norm_mean, self.norm_std
        return sub

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | int | None = None, indices=None,
                drop_last: bool = False) -> "_BatchIterable":
        """Iterate over the dataset (or ``indices`` of it) in batches; the result has ``len()`` (tqdm).

        ``shuffle`` uses ``generator`` (a torch.Generator or an int seed) and reshuffles on each
        iteration.
        """
        return _BatchIterable(self, int(batch_size), shuffle, generator, indices, drop_last)

    # -- properties ---------------------------------------------------------------------------
    @property
    def box_size(self) -> int:
        """Box size of the stored images (px)."""
        return self._box

    @property
    def image_size(self) -> int:
        """Box size of the returned images (after any downsampling)."""
        return self._out_size

    @property
    def pixel_sizes(self) -> np.ndarray:
        """(N,) float64 Å/px of the returned images (after any downsampling)."""
        return self.table.pixel_size * self._scale

    @property
    def pixel_size(self) -> float:
        """The returned images' pixel size (Å/px); raises if it differs between particles."""
        ps = self.pixel_sizes
        if not np.allclose(ps, ps[0], rtol=1e-6, atol=0):
            raise CryoaceInputError(f"pixel size varies between particles ({ps.min():.6g} to "
                                    f"{ps.max():.6g} Å); use pixel_sizes", self.table.source)
        return float(ps[0])

    @property
    def has_ctf(self) -> bool:
        return self.table.has_ctf

    @property
    def has_pose(self) -> bool:
        return self.table.pose is not None

    @property
    def stack_paths(self) -> list[str]:
        return list(self._stack_paths)


class _BatchIterable:
    def __init__(self, dataset: ParticleDataset, batch_size: int, shuffle: bool, generator, indices,
                 drop_last: bool):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        if isinstance(generator, int):
            generator = torch.Generator().manual_seed(generator)
        self.generator = generator
        self.rows = (np.arange(len(dataset), dtype=np.int64) if indices is None
                     else _as_row_indices(indices, len(dataset)))
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[ParticleBatch]:
        rows = self.rows
        if self.shuffle:
            perm = torch.randperm(len(rows), generator=self.generator).numpy()
            rows = rows[perm]
        for b in range(len(self)):
            yield self.dataset[rows[b * self.batch_size:(b + 1) * self.batch_size]]
