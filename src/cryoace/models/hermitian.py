"""The Hermitian-symmetric decoder base class shared by the neural fields and the voxel grids.

A real volume has ``V̂(−k) = conj V̂(k)``; :class:`HermitianDecoder` evaluates its network only on
the canonical half-space of :func:`hermitian_canonicalize` and fills the rest by conjugation (see
:mod:`cryoace.models.decoders` for the full statement). It lives in its own module so that
:mod:`cryoace.models.decoders` (the registry) and :mod:`cryoace.models.voxel` (grid subclasses)
both import it without importing each other.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["HermitianDecoder", "hermitian_canonicalize"]


def hermitian_canonicalize(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map points (..., 3) = (kx, ky, kz) into the canonical half-space H (module docstring).

    Returns ``(canonical, flipped, is_dc)``: ``canonical = −k`` where ``flipped`` else ``k``; ``is_dc``
    marks k = 0. Comparisons are exact (−0.0 counts as 0), so k and −k always share one canonical
    point.
    """
    kx, ky, kz = coords.unbind(-1)
    z0 = kz == 0
    y0 = ky == 0
    flipped = (kz < 0) | (z0 & (ky < 0)) | (z0 & y0 & (kx < 0))
    is_dc = z0 & y0 & (kx == 0)
    canonical = torch.where(flipped[..., None], -coords, coords)
    return canonical, flipped, is_dc


class HermitianDecoder(nn.Module):
    """Base class: Hermitian-symmetric complex field from a real network ``f: (N, 3) → (N, 2)``.

    Subclasses implement :meth:`network` on canonical coordinates in cycles/px. ``output_scale`` is a
    constant (non-trainable, saved in the state dict) multiplying the output, so a trainer can put the
    decoder's values on the scale of its data (unnormalized FFTs are large) without waiting for the
    last layer's bias to drift there.

    Under ``torch.autocast`` the network still runs in its own dtype (float32) unless
    ``allow_autocast=True``: a SIREN's ``sin(30·(Wx+b))`` in bfloat16 is off by several per cent, so
    mixed precision should speed up the encoder, not the neural field.
    """

    hermitian = True
    # Suggested learning rate for this decoder's own optimizer parameter group; None = use the
    # run's learning rate (neural fields). Voxel grids (models.voxel) set 1.0, the ACE-EM setting.
    default_lr: float | None = None

    def __init__(self, output_scale: float = 1.0, allow_autocast: bool = False):
        super().__init__()
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))
        # radial amplitude profile (n,) on |k| = 0, 0.5/(n−1), ..., 0.5 cycles/px (linear in between,
        # constant beyond): a constant preconditioner set from the data (set_shell_scale); empty = 1
        self.register_buffer("shell_scale", torch.ones(0))
        self.allow_autocast = allow_autocast

    def set_shell_scale(self, scale: torch.Tensor) -> None:
        """Multiply the output by a radial profile ``scale`` (n ≥ 2,) sampled at |k| = i·0.5/(n−1)
        cycles/px (e.g. per Fourier shell of the data, so that the initial decoder has the data's
        radial amplitude); an empty tensor removes it."""
        if scale.ndim != 1 or scale.numel() == 1:
            raise ValueError(f"shell_scale must be empty or have >= 2 shells, got shape {tuple(scale.shape)}")
        self.shell_scale = scale.detach().to(device=self.output_scale.device, dtype=self.output_scale.dtype)

    def _radial_scale(self, coords: torch.Tensor) -> torch.Tensor:
        """The profile of :meth:`set_shell_scale` at points (N, 3), linearly interpolated."""
        n = self.shell_scale.numel()
        pos = torch.nan_to_num(coords.norm(dim=-1) * (2 * (n - 1))).clamp(0, n - 1)  # NaN: the network's own
        lo = pos.floor().long().clamp(max=n - 2)
        frac = pos - lo
        return self.shell_scale[lo] * (1 - frac) + self.shell_scale[lo + 1] * frac

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the profile's length is the data's (L/2 + 1 shells); checkpoints from before it had none
        key = prefix + "shell_scale"
        saved = state_dict.setdefault(key, torch.ones(0))
        self.shell_scale = torch.empty(saved.shape, dtype=self.output_scale.dtype, device=self.output_scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def network(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(N, 3) canonical coordinates in cycles/px → (N, 2) real (Re, Im) before symmetrisation."""
        raise NotImplementedError

    def forward(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        """V̂ at (..., 3) frequencies in cycles/px → complex (...) (complex64 for float32 weights).

        Coordinates are cast to the decoder's parameter dtype.
        """
        batch_shape = coords_cyc_px.shape[:-1]
        dtype = self.output_scale.dtype
        k = coords_cyc_px.reshape(-1, 3).to(dtype)
        canonical, flipped, is_dc = hermitian_canonicalize(k)
        no_autocast = (contextlib.nullcontext() if self.allow_autocast
                       else torch.autocast(device_type=k.device.type, enabled=False))
        with no_autocast:
            out = self.network(canonical)
        if out.dtype in (torch.float16, torch.bfloat16):  # autocast: no complex half arithmetic
            out = out.float()
        scale = self.output_scale.to(out.dtype)
        if self.shell_scale.numel():
            scale = scale * self._radial_scale(canonical).to(out.dtype)
        re = out[:, 0] * scale
        im = out[:, 1] * scale
        im = torch.where(flipped, -im, im)
        im = torch.where(is_dc, torch.zeros_like(im), im)
        return torch.complex(re, im).reshape(batch_shape)
