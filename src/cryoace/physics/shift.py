"""The Fourier phase ramp of a pose shift (the one place the shift sign is decided).

A pose shift t = (tx, ty) is RELION's origin (docs/conventions.md §1): the observed image is the centred
projection translated by −t, ``observed(x) = projection(x + t)``. With unnormalized, centred FFTs
that is ``observed^(k) = exp(+2πi k·t) · projection^(k)`` — :func:`phase_ramp`. Centring an observed
image (translating it by +t) multiplies by the conjugate, i.e. ``phase_ramp(freq, -t)``.
"""

from __future__ import annotations

import math

import torch

from .fourier import fft2_centered, freq_grid_2d, ifft2_centered


def phase_ramp(freq_cyc_px: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """exp(+2πi k·t): multiply a projection's spectrum by this to apply the pose shift ``shift_px``.

    freq_cyc_px : (*G, 2) grid of (kx, ky) in cycles/px.
    shift_px    : (*P, 2) pose shifts (x, y) in pixels (Å / pixel_size).
    Returns a complex tensor of shape P + G.
    """
    grid_ndim = freq_cyc_px.ndim - 1
    t = shift_px.reshape(shift_px.shape[:-1] + (1,) * grid_ndim + (2,))
    phase = 2 * math.pi * (freq_cyc_px * t).sum(-1)
    return torch.polar(torch.ones_like(phase), phase)


def apply_shift(images: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Apply pose shifts to real images (..., L, L) in real space (result = images translated by −t).

    For whole-pixel shifts this equals ``torch.roll(images, (-ty, -tx), dims=(-2, -1))``.
    """
    size = images.shape[-1]
    freq = freq_grid_2d(size, device=images.device, dtype=images.real.dtype)
    return ifft2_centered(fft2_centered(images) * phase_ramp(freq, shift_px)).real
