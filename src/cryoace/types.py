"""Typed containers of tensors that flow between modules (units documented per field).

Every field is a tensor with the same leading (batch) shape; ``map_tensors`` lets a container be moved
to a device, cast, or indexed as a whole, so no code passes dicts of tensors around by string keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def map_tensors(obj: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
    """Apply ``fn`` to every tensor field (recursing into nested containers); return a new container."""
    changes = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, torch.Tensor):
            changes[field.name] = fn(value)
        elif dataclasses.is_dataclass(value):
            changes[field.name] = map_tensors(value, fn)
    return dataclasses.replace(obj, **changes)


class _TensorContainer:
    def to(self, *args, **kwargs):
        """``tensor.to`` on every field; float fields only take a dtype (indices stay integer)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point() or t.is_complex():
                return t.to(*args, **kwargs)
            return t.to(device=kwargs.get("device", _device_arg(args)))
        return map_tensors(self, move)

    def __getitem__(self, index):
        return map_tensors(self, lambda t: t[index])


def _device_arg(args) -> torch.device | None:
    for a in args:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
    return None


@dataclasses.dataclass(frozen=True)
class CTFParams(_TensorContainer):
    """RELION CTF parameters, one set per image (any leading shape).

    defocus_u, defocus_v : Å, positive = underfocus.
    defocus_angle        : radians, angle of the defocus_u axis from the image x axis.
    voltage_kv           : kV.
    cs_mm                : spherical aberration, mm.
    amplitude_contrast   : fraction w, so that CTF(0) = +w.
    phase_shift          : radians (phase plate), 0 if none.
    bfactor              : Å², envelope exp(-B s²/4); 0 if none.
    """

    defocus_u: torch.Tensor
    defocus_v: torch.Tensor
    defocus_angle: torch.Tensor
    voltage_kv: torch.Tensor
    cs_mm: torch.Tensor
    amplitude_contrast: torch.Tensor
    phase_shift: torch.Tensor
    bfactor: torch.Tensor

    @classmethod
    def create(cls, defocus_u, defocus_v=None, defocus_angle=0.0, voltage_kv=300.0, cs_mm=2.7,
               amplitude_contrast=0.1, phase_shift=0.0, bfactor=0.0,
               dtype: torch.dtype = torch.float64) -> CTFParams:
        """Build from numbers/arrays (broadcast to a common shape); defocus_v defaults to defocus_u."""
        defocus_v = defocus_u if defocus_v is None else defocus_v
        values = [torch.as_tensor(v, dtype=dtype) for v in
                  (defocus_u, defocus_v, defocus_angle, voltage_kv, cs_mm, amplitude_contrast,
                   phase_shift, bfactor)]
        values = torch.broadcast_tensors(*values)
        return cls(*(v.contiguous() for v in values))


@dataclasses.dataclass(frozen=True)
class Pose(_TensorContainer):
    """A particle pose.

    rotmat      : (..., 3, 3) RELION's Euler_angles2matrix(rot, tilt, psi): maps volume coordinates
                  to image coordinates (docs/conventions.md §1).
    shift_angst : (..., 2) (x, y) in Å, exactly RELION's rlnOriginX/YAngst: the observed image is the
                  centred projection translated by -shift.
    """

    rotmat: torch.Tensor
    shift_angst: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ParticleBatch(_TensorContainer):
    """A batch of particle images with what is needed to model them.

    images     : (B, L, L) real-space images, (y, x), particle centre near index L//2.
    pixel_size : (B,) Å/px of these images (after any downsampling).
    ctf        : CTFParams with leading shape (B,).
    index      : (B,) int64 row of each image in the particle table.
    pose       : Pose with leading shape (B,), or None when the file has no poses.
    """

    images: torch.Tensor
    pixel_size: torch.Tensor
    ctf: CTFParams
    index: torch.Tensor
    pose: Pose | None = None
