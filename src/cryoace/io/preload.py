"""Getting images to the model fast: preloading the prepared dataset, or prefetching batches.

``--preload`` (:func:`choose_preload`, :func:`prepare_dataset`):

* ``gpu``  — every image, Fourier-cropped, contrast-inverted and normalized exactly as
  :class:`~cryoace.io.particles.ParticleDataset` returns it (float32), in one tensor on the GPU;
  a batch is one index operation on the device (no disk, no host-to-device copy).
* ``ram``  — the same tensor in host memory (pinned when training on CUDA, for fast asynchronous
  copies).
* ``none`` — read each batch from the stacks (positional reads: constant memory in the number of
  particles); batches are read ahead by a background thread (:func:`prefetch`), pinned for CUDA.
* ``auto`` — on a CUDA device, ``gpu`` if the whole prepared set fits in ``fraction`` (½) of the free
  GPU memory (the rest is for activations), else ``ram`` if it fits in that fraction of the available
  RAM (divided among the processes of this node: every rank holds its own copy), else ``none``. On a
  CPU device always ``none``: there a batch read from the page cache costs ~0.1 % of a training step
  (32 random images of 64 px in ~0.3 ms, measured by hand, against ~0.27 s per step of the cpu preset
  in bench/results/scaling_flat_cpu.json's runs), while a copy in RAM would make the run's memory grow
  with the number of particles (1 GB at 64k particles of 64 px).

Preloaded batches equal the lazily read ones (same preparation code, see tests/io/test_preload.py).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ..defaults import PRELOAD_MODES
from ..errors import CryoaceInputError
from .particles import BatchIterable, ParticleDataset
from .table import as_row_indices

__all__ = ["PRELOAD_MODES", "choose_preload", "dataset_nbytes", "available_ram_bytes", "free_gpu_bytes",
           "PreloadedDataset", "prepare_dataset", "prefetch"]



def dataset_nbytes(dataset: ParticleDataset) -> int:
    """Bytes of the whole prepared (downsampled, float32) image set."""
    return len(dataset) * int(dataset.image_size) ** 2 * 4


def available_ram_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (free + reclaimable), else the free physical pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_gpu_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (0 for other devices)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.mem_get_info(device)[0])


def choose_preload(mode: str, nbytes: int, device: torch.device, *, free_gpu: int | None = None,
                   available_ram: int | None = None, local_world_size: int = 1, fraction: float = 0.5) -> str:
    """Resolve ``--preload`` to ``gpu``, ``ram`` or ``none`` for a prepared set of ``nbytes``.

    ``free_gpu`` / ``available_ram`` default to the machine's (given explicitly by tests).
    """
    if mode not in PRELOAD_MODES:
        raise CryoaceInputError(f"--preload must be one of {', '.join(PRELOAD_MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "gpu" and device.type != "cuda":
        raise CryoaceInputError(f"--preload gpu needs a CUDA device, but the run uses {device}")
    if mode != "auto":
        return mode
    if device.type != "cuda":  # reading costs little beside a CPU step; memory stays flat in N
        return "none"
    free_gpu = free_gpu_bytes(device) if free_gpu is None else free_gpu
    if nbytes <= fraction * free_gpu:
        return "gpu"
    available_ram = available_ram_bytes() if available_ram is None else available_ram
    if nbytes * max(1, local_world_size) <= fraction * available_ram:
        return "ram"
    return "none"


class PreloadedDataset:
    """A :class:`ParticleDataset` with every prepared image held in one tensor on ``device``.

    Indexing and :meth:`batches` behave as the wrapped dataset's (ParticleBatch with table-row
    ``index``), but the images come from memory (on ``device``; the metadata stays on the CPU).
    Other attributes (``table``, ``image_size``, ``norm_mean``...) are the wrapped dataset's.
    """

    in_memory = True

    def __init__(self, dataset: ParticleDataset, device: torch.device | str = "cpu", pin_memory: bool = False,
                 chunk_bytes: int = 256 * 2 ** 20, progress: bool = False):
        from tqdm.auto import tqdm

        self.base = dataset
        device = torch.device(device)
        n, size = len(dataset), int(dataset.image_size)
        shape = (n, size, size)
        try:
            self.images = torch.empty(shape, dtype=torch.float32, device=device,
                                      pin_memory=pin_memory and device.type == "cpu")
        except RuntimeError:  # the pinned (page-locked) allocation was refused: pageable memory works too
            self.images = torch.empty(shape, dtype=torch.float32, device=device)
        chunk = max(1, chunk_bytes // (4 * size * size))
        for start in tqdm(range(0, n, chunk), desc="preloading images", unit="chunk",
                          disable=None if progress else True, leave=False):
            rows = np.arange(start, min(n, start + chunk), dtype=np.int64)
            self.images[start:start + len(rows)].copy_(dataset[rows].images)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        single = isinstance(key, (int, np.integer))
        rows = as_row_indices([key] if single else key, len(self))
        index = torch.from_numpy(rows).to(self.images.device, non_blocking=True)
        batch = self.base.make_batch(rows, self.images.index_select(0, index))
        return batch[0] if single else batch

    def batches(self, batch_size: int, shuffle: bool = False, generator=None, indices=None,
                drop_last: bool = False) -> BatchIterable:
        """As :meth:`ParticleDataset.batches`."""
        return BatchIterable(self, int(batch_size), shuffle, generator, indices, drop_last)

    def __getattr__(self, name: str):
        if name == "base":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)


def prepare_dataset(dataset: ParticleDataset, mode: str, device: torch.device, local_world_size: int = 1,
                    log: Callable[[str], None] | None = None, progress: bool = False):
    """``dataset`` preloaded as ``--preload mode`` resolves (or itself for ``none``)."""
    device = torch.device(device)
    nbytes = dataset_nbytes(dataset)
    choice = choose_preload(mode, nbytes, device, local_world_size=local_world_size)
    if log is not None:
        log(f"preload {mode} -> {choice} ({nbytes / 2 ** 30:.2f} GiB of prepared images)")
    if choice == "none":
        return dataset
    target = device if choice == "gpu" else torch.device("cpu")
    return PreloadedDataset(dataset, target, pin_memory=device.type == "cuda", progress=progress)


_DONE = object()


def prefetch(batches: Iterable, depth: int = 2, pin_memory: bool = False) -> Iterator:
    """Iterate over ``batches`` read ahead by a background thread (``depth`` in flight), pinned if asked.

    Reading (memmap + FFT crop) releases the GIL, so it overlaps the training step. Exceptions are
    re-raised in the consumer; closing the generator stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if pin_memory:
                    batch = dataclasses.replace(batch, images=batch.images.pin_memory())
                if not put(batch):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name="cryoace-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()  # it stops after the batch it is reading: nothing runs on behind our back
