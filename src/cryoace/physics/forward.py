"""THE image-formation path: Fourier volume representation + pose + CTF → image (docs/conventions.md §2).

Simulation, training (every decoder) and evaluation go through :func:`render_spectra`, so there is
one image-formation model in the code base:

    Ŷ(k) = CTF(k) · exp(+2πi k·t) · V̂(Rᵀ k)        (k in cycles/px on the centred image grid)

A *Fourier volume* is any callable mapping volume-frame frequencies (*Q, 3) in cycles/px to complex
values (*Q): a voxel grid (:class:`VoxelFourierVolume`) or a neural field.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..types import CTFParams, Pose
from .ctf import compute_ctf
from .fourier import fft3_centered, freq_grid_2d, freq_grid_2d_half, irfft2_centered
from .shift import phase_ramp
from .slicing import central_slice_coords, extract_slices

FourierVolume = Callable[[torch.Tensor], torch.Tensor]


class VoxelFourierVolume:
    """A centred complex Fourier voxel grid (D, D, D), sampled trilinearly (DC at voxel D//2)."""

    def __init__(self, volume_ft: torch.Tensor):
        self.volume_ft = volume_ft

    @classmethod
    def from_real(cls, volume: torch.Tensor, pad_factor: int = 1) -> VoxelFourierVolume:
        """From a real-space volume (L, L, L), zero-padded to ``pad_factor``·L for finer Fourier sampling.

        Padding does not change the pixel size, so frequencies in cycles/px mean the same; the padded
        spectrum samples the same continuous transform ``pad_factor`` times more densely, which makes
        trilinear interpolation of off-grid slices more accurate.
        """
        size = volume.shape[-1]
        padded_size = pad_factor * size
        if pad_factor > 1:
            lo = padded_size // 2 - size // 2
            padded = volume.new_zeros((padded_size,) * 3)
            padded[lo:lo + size, lo:lo + size, lo:lo + size] = volume
            volume = padded
        return cls(fft3_centered(volume))

    def __call__(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        return extract_slices(self.volume_ft, coords_cyc_px)


def render_spectra(volume: FourierVolume, pose: Pose, pixel_size: torch.Tensor | float, size: int,
                   ctf: CTFParams | None = None, freq_cyc_px: torch.Tensor | None = None,
                   half: bool = False) -> torch.Tensor:
    """Centred image spectra (*P, size, size) of particles with ``pose`` (leading shape P).

    pixel_size : Å/px (number or tensor broadcastable to P) converts the shift (Å) and the CTF.
    ctf        : CTF parameters with leading shape P, or None for no CTF (ideal, CTF = 1).
    freq_cyc_px: an optional precomputed frequency grid (saves its allocation per call); any grid
                 of (kx, ky) works, e.g. only the points inside the Nyquist disc.
    half       : render only the half spectrum (*P, size, size//2 + 1) in the ``rfft2_centered``
                 layout — the rest is its Hermitian mirror (a real image), so this halves the
                 decoder's work. Ignored when ``freq_cyc_px`` is given.
    """
    rotmat = pose.rotmat
    if freq_cyc_px is None:
        grid = freq_grid_2d_half if half else freq_grid_2d
        freq_cyc_px = grid(size, device=rotmat.device, dtype=rotmat.dtype)
    spectra = volume(central_slice_coords(rotmat, freq_cyc_px))
    pixel_size = torch.as_tensor(pixel_size, dtype=rotmat.dtype, device=rotmat.device)
    shift_px = pose.shift_angst / pixel_size[..., None] if pixel_size.ndim else pose.shift_angst / pixel_size
    spectra = spectra * phase_ramp(freq_cyc_px, shift_px)
    if ctf is not None:
        spectra = spectra * compute_ctf(ctf, freq_cyc_px, pixel_size)
    return spectra


def render_images(volume: FourierVolume, pose: Pose, pixel_size: torch.Tensor | float, size: int,
                  ctf: CTFParams | None = None) -> torch.Tensor:
    """Real-space images (*P, size, size) from :func:`render_spectra` (evaluated on the half grid)."""
    return irfft2_centered(render_spectra(volume, pose, pixel_size, size, ctf, half=True), size)
