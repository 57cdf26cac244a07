"""Particle metadata reading (:func:`read_particles`) and the lazy particle dataset.

The metadata table is :class:`~cryoace.io.table.ParticleTable` (re-exported here with
:func:`no_ctf_params` and :func:`resolve_image_paths`); it stores about 40 bytes per particle.

:class:`ParticleDataset` reads images lazily: each stack is checked with ``open_mrc`` on first use and
kept open as a file (:class:`StackFile`, a bounded LRU cache of handles); a batch read groups its
particles by stack, sorts their indices, reads each run of consecutive images with one positional
read (``os.preadv``) and restores the requested order. Positional reads rather than a memmap because
a memmap's pages, once touched, count in the process's resident memory until it unmaps them: a pass
over 10⁶ particles would show the whole stack in RSS (it is page cache, but schedulers and users see
RSS). With reads the pages stay in the kernel's cache and RSS does not grow with the particles read.
The dataset shares the table's arrays (stack codes, indices, float32 CTF, compact poses) and builds
each batch's float32 tensors from them, so its memory does not grow with the number of particles
beyond the table's. Handles are dropped when the dataset is pickled, so
``torch.utils.data.DataLoader`` workers re-open their own::

    loader = DataLoader(dataset, batch_size=None, num_workers=4,
                        sampler=BatchSampler(RandomSampler(dataset), 256, drop_last=False))
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from ..errors import CryoaceInputError
from ..physics.fourier import fourier_crop
from ..types import ParticleBatch
from .columns import row_chunks
from .mrc import open_mrc
from .table import COUNTED_FROM_1, ParticleTable, as_row_indices, no_ctf_params, particle_number, resolve_image_paths

__all__ = [
    "ParticleTable",
    "ParticleDataset",
    "read_particles",
    "no_ctf_params",
    "resolve_image_paths",
    "collate_particles",
    "BatchIterable",
    "StackFile",
]


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
    if suffix in (".star", ".cs"):
        if suffix == ".star":
            from .star import read_star as reader
        else:
            from .cryosparc import read_cs as reader
        table = reader(path, datadir=datadir, pixel_size=pixel_size, stack_map=stack_map)
        table.datadir = None if datadir is None else Path(datadir)
        return table
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


def _stack_memmap(path: str) -> np.ndarray:
    """The checked (n, L, L) memmap of an image stack (one image: n = 1)."""
    data = open_mrc(path, mmap=True).data
    if data.ndim == 2:
        data = data[None]
    elif data.ndim != 3:
        raise CryoaceInputError(f"expected an image stack, got an array of shape {data.shape}", path)
    return data


class StackFile:
    """One image stack read by positional reads (``os.preadv``), not through a memmap.

    Opening checks the file with ``open_mrc`` (header, mode, size) and keeps only its layout (``shape``
    (n, L, L), stored ``dtype`` with its byte order, ``offset`` of the data block in bytes) and an
    unbuffered handle. Reads are thread-safe (positional; where ``os.preadv`` is missing, seek + read
    under a lock).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        data = _stack_memmap(self.path)
        self.shape: tuple[int, int, int] = tuple(int(n) for n in data.shape)
        self.dtype = data.dtype
        # np.memmap.offset is the data block's byte offset (the header's 1024 bytes + extended header)
        self.offset = int(data.offset)
        del data
        self.image_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 (held open; closed with the object)
        self._lock = threading.Lock()

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Images at sorted ``indices`` (0-based, within the stack), (k, L, L) in the stored dtype.

        One read per run of consecutive indices: a sequential pass is a few large reads, a random
        batch one small read per image.
        """
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices),) + self.shape[1:], dtype=self.dtype)
        if len(indices) == 0:
            return out
        buffer = memoryview(out).cast("B")
        starts = np.flatnonzero(np.r_[True, np.diff(indices) != 1])
        stops = np.r_[starts[1:], len(indices)]
        size = self.image_bytes
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            chunk = buffer[start * size:stop * size]
            position = self.offset + int(indices[start]) * size
            got = self._read_into(chunk, position)
            if got != len(chunk):
                raise CryoaceInputError(f"the stack is shorter than when it was opened: image "
                                        f"{int(indices[start]) + 1} could not be read (was the file changed "
                                        "during the run?)", self.path)
        return out

    def _read_into(self, chunk: memoryview, position: int) -> int:
        fd = self._file.fileno()
        if hasattr(os, "preadv"):
            got = 0
            while got < len(chunk):  # a regular file returns short reads only at its end
                n = os.preadv(fd, [chunk[got:]], position + got)
                if n == 0:
                    break
                got += n
            return got
        with self._lock:
            self._file.seek(position)
            return self._file.readinto(chunk) or 0


class ParticleDataset(torch.utils.data.Dataset):
    """Lazy images + metadata; ``dataset[indices]`` returns a :class:`~cryoace.types.ParticleBatch`.

    table           : a :class:`ParticleTable` that references images.
    downsample      : output box size (even, ≤ stack box); images are Fourier-cropped and the pixel size
                      scales by box/downsample. None keeps the stored box.
    invert_contrast : multiply images by -1 (for stacks with dark particles; docs/conventions.md §1).
    normalize       : return ``(img - norm_mean) / norm_std``, with mean and std estimated once (after
                      inversion and downsampling) from a seeded random sample of up to ``norm_sample``
                      images (attributes ``norm_mean``, ``norm_std``).
    max_open_stacks : stack files kept open at once (least recently used are closed).

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
        self._cache: collections.OrderedDict[int, StackFile] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        if len(table) == 0:
            raise CryoaceInputError("the particle table is empty", table.source)
        if table.image_paths is None:
            raise CryoaceInputError("the file references no particle images (missing column "
                                    "rlnImageName / field blob/path)", table.source)
        self._use_stacks(table)
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
        self.norm_mean, self.norm_std = 0.0, 1.0
        if self.normalize:
            self.norm_mean, self.norm_std = self._estimate_norm(norm_sample, seed)

    def _use_stacks(self, table: ParticleTable) -> None:
        """Stack codes and paths: the table's own (shared, not copied)."""
        self._stack_codes = table.image_paths.codes
        self._stack_paths = [str(p) for p in table.image_paths.categories]

    # -- validation ---------------------------------------------------------------------------
    def _validate_stacks(self) -> None:
        table = self.table
        missing = [p for p in self._stack_paths if not os.path.isfile(p)]
        if missing:
            more = f" ({len(missing)} of {len(self._stack_paths)} stacks are missing)" if len(missing) > 1 else ""
            where = (f"not in --datadir {table.datadir}" if table.datadir is not None else
                     "not found; if the stacks are in another folder, give it with --datadir")
            raise CryoaceInputError(f"image stack referenced by {table.source} {where}{more}", missing[0])
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
        if len(set(boxes.tolist())) > 1:
            k = int(np.flatnonzero(boxes != boxes[0])[0])
            raise CryoaceInputError(f"box size {boxes[k]} differs from {boxes[0]} of "
                                    f"{self._stack_paths[0]}; all stacks must share one box",
                                    self._stack_paths[k])
        self._check_rows(n_images, boxes)
        self._box = int(boxes[0])

    def _check_rows(self, n_images: np.ndarray, boxes: np.ndarray) -> None:
        """Every row's image index within its stack and promised box equal to the stack's (by chunks)."""
        table = self.table
        n_bad = 0
        first = None
        for start, stop in row_chunks(len(table)):
            codes = self._stack_codes[start:stop]
            bad = table.image_indices[start:stop] >= n_images[codes]
            n_bad += int(bad.sum())
            if first is None and bad.any():
                first = start + int(np.flatnonzero(bad)[0])
        if first is not None:
            i = first
            raise CryoaceInputError(
                f"{particle_number(i)} of {table.source} asks for image {table.image_indices[i] + 1} "
                f"but the stack holds {n_images[self._stack_codes[i]]} images ({n_bad} of {len(table)} "
                f"particles out of range; {COUNTED_FROM_1})", self._stack_paths[self._stack_codes[i]])
        if table.image_size is None:
            return
        for start, stop in row_chunks(len(table)):
            bad = table.image_size[start:stop] != boxes[self._stack_codes[start:stop]]
            if bad.any():
                i = start + int(np.flatnonzero(bad)[0])
                raise CryoaceInputError(
                    f"the metadata gives image size {table.image_size[i]} for {particle_number(i)} of "
                    f"{table.source} but the stack's box is {boxes[self._stack_codes[i]]}",
                    self._stack_paths[self._stack_codes[i]])

    # -- stacks -------------------------------------------------------------------------------
    def _open(self, code: int) -> StackFile:
        with self._cache_lock:  # the prefetch thread and the main thread may both read
            stack = self._cache.get(code)
            if stack is not None:
                self._cache.move_to_end(code)
                return stack
        stack = StackFile(self._stack_paths[code])
        with self._cache_lock:
            self._cache[code] = stack
            while len(self._cache) > self.max_open_stacks:
                self._cache.popitem(last=False)  # closed when no reader holds it any more
        return stack

    def stack_array(self, path_or_code: int | str) -> np.ndarray:
        """The memory-mapped (n, L, L) array of one stack (by code or path), as stored."""
        code = path_or_code if isinstance(path_or_code, (int, np.integer)) else \
            self._stack_paths.index(os.path.normpath(os.path.abspath(path_or_code)))
        return _stack_memmap(self._stack_paths[int(code)])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = collections.OrderedDict()  # files are re-opened in the new process
        del state["_cache_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()

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
        for start, stop in zip(starts, np.r_[starts[1:], len(order)], strict=True):
            group = order[start:stop]
            code = int(sorted_codes[start])
            li = local[group]
            o = np.argsort(li, kind="stable")
            out[group[o]] = self._open(code).read(li[o])
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            j = int(np.flatnonzero(~finite)[0])
            raise CryoaceInputError(
                f"{particle_number(rows[j])} (image {local[j] + 1} of "
                f"{os.path.basename(self._stack_paths[codes[j]])}) of {self.table.source} contains NaN or Inf "
                f"pixels ({COUNTED_FROM_1})", self._stack_paths[codes[j]])
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
        rows = as_row_indices([key] if single else key, len(self))
        batch = self.make_batch(rows, self._images(rows, self.normalize))
        return batch[0] if single else batch

    def make_batch(self, rows: np.ndarray, images: torch.Tensor) -> ParticleBatch:
        """The batch of table ``rows`` (int64 array) with ``images`` already read (e.g. preloaded)."""
        rows = np.asarray(rows, dtype=np.int64)
        t = torch.from_numpy(rows)
        table = self.table
        pose = table.pose_rows(rows)
        return ParticleBatch(
            images=images,
            pixel_size=torch.from_numpy(table.pixel_size[rows] * self._scale).to(torch.float32),
            ctf=table.ctf[t].to(torch.float32),
            index=t.clone(),
            pose=None if pose is None else pose.to(torch.float32),
        )

    def subset(self, indices) -> ParticleDataset:
        """A dataset of the rows ``indices`` of this one (in that order), prepared exactly like it: the
        same box, contrast and normalization (``norm_mean``/``norm_std`` are copied, not re-estimated,
        so e.g. two half sets see the same image scale). Cheap: the stacks are not checked again."""
        sub = copy.copy(self)  # the stacks are already validated; open handles are not shared
        sub.table = self.table.subset(indices)
        sub._use_stacks(sub.table)
        return sub

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | int | None = None, indices=None,
                drop_last: bool = False) -> BatchIterable:
        """Iterate over the dataset (or ``indices`` of it) in batches; the result has ``len()`` (tqdm).

        ``shuffle`` uses ``generator`` (a torch.Generator or an int seed) and reshuffles on each
        iteration.
        """
        return BatchIterable(self, int(batch_size), shuffle, generator, indices, drop_last)

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
        ps = self.table.pixel_size
        first, low, high = (float(v) * self._scale for v in (ps[0], ps.min(), ps.max()))
        if max(high - first, first - low) > 1e-6 * abs(first):
            raise CryoaceInputError(f"pixel size varies between particles ({low:.6g} to "
                                    f"{high:.6g} Å); use pixel_sizes", self.table.source)
        return first

    @property
    def has_ctf(self) -> bool:
        return self.table.has_ctf

    @property
    def has_pose(self) -> bool:
        return self.table.has_pose

    @property
    def stack_paths(self) -> list[str]:
        return list(self._stack_paths)


class BatchIterable:
    """Batches of a dataset (all rows or ``indices``), optionally reshuffled on each iteration. Over all
    rows no index array is kept and a shuffled pass holds one int32 permutation (4 bytes a particle)."""

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
        self.rows = None if indices is None else as_row_indices(indices, len(dataset))
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.dataset) if self.rows is None else len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[ParticleBatch]:
        n = len(self.dataset) if self.rows is None else len(self.rows)
        order = None
        if self.shuffle:  # int32 gives the same permutation as int64, in half the memory
            order = torch.randperm(n, generator=self.generator, dtype=torch.int32).numpy()
        for b in range(len(self)):
            start, stop = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            picked = np.arange(start, stop) if order is None else order[start:stop]
            yield self.dataset[picked if self.rows is None else self.rows[picked]]
