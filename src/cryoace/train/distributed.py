"""Data-parallel training across processes (PyTorch DDP, launched by ``torchrun``).

``torchrun --nproc-per-node G -m cryoace reconstruct ...`` starts G processes with the environment
variables ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` or a
rendezvous endpoint); :func:`init_distributed` reads them, joins the process group (NCCL on GPUs,
gloo on the CPU) and puts each process on ``cuda:LOCAL_RANK``. Without those variables (or with
``WORLD_SIZE=1``) everything here is a no-op and a run is an ordinary single process.

What each rank does (see :class:`~cryoace.train.trainer.Trainer`):

* **Data.** The global batch (``--batch-size``, what the user asked for) is split into ``WORLD_SIZE``
  equal contiguous parts of the trainer's per-epoch order (:meth:`DistContext.shard`), so rank r reads
  only its part; the union over ranks is exactly the single-process batch. The learning rate is not
  scaled: DDP averages the gradients, which is the gradient of the global-batch mean loss.
* **Gradients.** :class:`GradientSync` averages every gradient over the ranks after ``backward``
  (DDP's all-reduce, see its docstring for why not the ``DistributedDataParallel`` wrapper).
* **BatchNorm.** On GPUs the encoder's BatchNorm layers become ``SyncBatchNorm`` (statistics over the
  global batch), so G ranks train like one process with the same global batch. ``SyncBatchNorm``
  refuses CPU tensors in this torch, so with gloo on the CPU each rank normalizes with its own
  part's statistics: the trained parameters then differ slightly from a single-process run (as in
  any data-parallel CNN with plain BatchNorm); they are equal up to float rounding when BatchNorm
  uses running statistics (eval mode), which is what ``tests/train/test_distributed.py`` checks.
* **Files.** Rank 0 alone writes (config, checkpoints, metrics, TensorBoard, volumes, PNGs,
  poses.star); the others log nothing but errors. Checkpoints hold the unwrapped modules and global
  counters, so a run resumes on any number of processes. Multi-node runs need ``RUN_DIR`` on a
  shared filesystem (every rank reads ``last.pt`` on ``--resume`` and on a NaN rollback).
* **Metrics.** The logged loss and rates are averaged over ranks (:meth:`DistContext.all_reduce_mean`),
  inside the one host sync every ``log_every`` steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import CryoaceInputError
from ..runtime import resolve_device

__all__ = ["DistContext", "init_distributed", "current", "cleanup", "GradientSync", "env_world_size"]


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    def per_rank_batch(self, global_batch: int) -> int:
        """The batch each rank computes; the global batch must split evenly over the ranks."""
        if global_batch % self.world_size:
            raise CryoaceInputError(f"the batch size {global_batch} does not split evenly over {self.world_size} "
                                    f"processes; choose a --batch-size that is a multiple of {self.world_size}")
        return global_batch // self.world_size

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch's rows (all of them in a single process)."""
        if not self.enabled:
            return rows
        size = self.per_rank_batch(len(rows))
        return rows[self.rank * size:(self.rank + 1) * size]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a tensor (in place on a copy; the identity in a single process)."""
        if not self.enabled:
            return values
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.world_size


def current(device: torch.device | str | None = None) -> DistContext:
    """The context of the initialized process group (a single-process context if there is none)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext(device=device)
    return DistContext(world_size=dist.get_world_size(), rank=dist.get_rank(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device=device)


def init_distributed(device_name: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group that torchrun describes in the environment; return this rank's context.

    ``device_name`` ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` when CUDA is available (NCCL), else
    the CPU (gloo). A single process (no ``WORLD_SIZE`` > 1) gets the plain device and no group.
    """
    world = env_world_size()
    if world <= 1:
        return DistContext(device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CryoaceInputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                                    "use --nproc-per-node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return current(device)


def cleanup() -> None:
    """Leave the process group (after a barrier so no rank exits while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class GradientSync:
    """Averages gradients over the ranks after ``backward``: the data-parallel step of DDP.

    At construction it broadcasts rank 0's parameters and buffers (every rank then starts from the
    same model, whatever its RNG did) and, on GPUs, turns the encoder's BatchNorm layers into
    ``SyncBatchNorm`` (global-batch statistics; the parameter objects and state_dict keys stay the
    same). :meth:`average` all-reduces the gradients in flat buckets and divides by the world size —
    what ``DistributedDataParallel``'s reducer computes. We do not wrap the modules in
    ``DistributedDataParallel`` itself because a training step may leave parameters without a
    gradient (the PIP task's frozen decoder, PIP-only steps) and may call the encoder several times
    and through ``torch.compile``; DDP's reducer wants the same used-parameter set every step. All
    ranks run the same step logic, so the set of parameters with a gradient agrees across ranks,
    and parameters without one keep ``grad = None`` exactly as in a single process. The price is
    that communication does not overlap the backward pass (a few MB per step for these models).
    A no-op in a single process.
    """

    def __init__(self, modules: Sequence[nn.Module], context: DistContext, bucket_bytes: int = 25 * 2 ** 20):
        self.context = context
        self.bucket_bytes = int(bucket_bytes)
        if not context.enabled:
            return
        for module in modules:
            if context.device.type == "cuda":
                nn.SyncBatchNorm.convert_sync_batchnorm(module)
            with torch.no_grad():
                for tensor in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(tensor.data, src=0)

    @torch.no_grad()
    def average(self, params: Iterable[torch.Tensor]) -> None:
        """Replace each gradient by its mean over the ranks (parameters without a gradient are skipped)."""
        if not self.context.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        for bucket in _buckets(grads, self.bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.context.world_size
            for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(synced)


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``max_bytes`` (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > max_bytes or (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket
