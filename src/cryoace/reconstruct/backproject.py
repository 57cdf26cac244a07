"""Direct Fourier inversion: CTF-weighted slice insertion with a Wiener/ε-regularized division.

Each centred image spectrum Y (zero-padded ``pad_factor`` times for finer Fourier sampling) is
un-shifted with the pose shift, multiplied by its CTF c and spread trilinearly at the slice
coordinates Rᵀk (the adjoint of :func:`cryoace.physics.slicing.extract_slices`):

    N(q) += Σ w_q · c · Y,     W(q) += Σ w_q · c²,     V̂ = N / (W + ε)

with ε = ``wiener_eps`` × the mean of W over the voxels that received data. This is the estimate
that minimises Σ|Y − c·V̂|² + ε|V̂|², the regularizer acting where c² is small (CTF zeros, sparse
coverage). The inverse 3D FFT of V̂ is cropped back to the original box.
"""

from __future__ import annotations

import torch

from ..physics.ctf import compute_ctf
from ..physics.fourier import fft2_centered, freq_grid_2d, ifft3_centered, radial_distance
from ..physics.shift import phase_ramp
from ..physics.slicing import central_slice_coords
from ..types import CTFParams


def _pad_images(images: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Zero-pad images (B, L, L) to (B, P, P) keeping the centre L//2 at P//2."""
    size = images.shape[-1]
    if padded_size == size:
        return images
    lo = padded_size // 2 - size // 2
    out = images.new_zeros(images.shape[:-2] + (padded_size, padded_size))
    out[..., lo:lo + size, lo:lo + size] = images
    return out


def splat_trilinear(grid: torch.Tensor, index_xyz: torch.Tensor, values: torch.Tensor) -> None:
    """Add ``values`` (Q, C) at fractional voxel indices (Q, 3) = (x, y, z) into ``grid`` (D³, C).

    The adjoint of trilinear interpolation: each value is shared among its 8 neighbouring voxels with
    the trilinear weights; points whose neighbours fall outside the grid lose those shares.
    """
    size = round(grid.shape[0] ** (1 / 3))
    base = torch.floor(index_xyz)
    frac = index_xyz - base
    base = base.long()
    for corner in range(8):
        offset = torch.tensor([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1],
                              device=index_xyz.device)
        idx = base + offset
        weight = torch.where(offset.bool(), frac, 1 - frac).prod(-1)
        inside = ((idx >= 0) & (idx < size)).all(-1)
        flat = (idx[:, 2] * size + idx[:, 1]) * size + idx[:, 0]
        grid.index_add_(0, flat[inside], values[inside] * weight[inside, None])


class FourierAccumulator:
    """Accumulates CTF-weighted slices of a (pad_factor·L)³ Fourier grid; :meth:`volume` inverts it.

    size       : box L of the images (px).
    pad_factor : zero-padding of images and volume (2 as in RELION: accurate trilinear gridding).
    """

    def __init__(self, size: int, pad_factor: int = 2, device=None, dtype: torch.dtype = torch.float64):
        self.size = size
        self.padded_size = pad_factor * size
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        n = self.padded_size ** 3
        # columns: Re(N), Im(N), W — one scatter per corner for all three
        self.grid = torch.zeros(n, 3, dtype=dtype, device=self.device)
        self.freq = freq_grid_2d(self.padded_size, device=self.device, dtype=dtype)
        # only frequencies inside the Nyquist disc of the original pixels carry information
        self.in_disc = (self.freq.norm(dim=-1) <= 0.5).reshape(-1)
        self.count = 0

    def insert(self, images: torch.Tensor, rotmat: torch.Tensor, shift_px: torch.Tensor,
               pixel_size: torch.Tensor | float, ctf: CTFParams | None = None) -> None:
        """Insert a batch: images (B, L, L) real, rotmat (B, 3, 3), shift_px (B, 2) pose shifts in px."""
        images = images.to(self.device, self.dtype)
        rotmat = rotmat.to(self.device, self.dtype)
        shift_px = shift_px.to(self.device, self.dtype)
        spectra = fft2_centered(_pad_images(images, self.padded_size))
        spectra = spectra * phase_ramp(self.freq, -shift_px)  # centre the particles
        if ctf is not None:
            ctf_values = compute_ctf(ctf.to(self.device, self.dtype), self.freq,
                                     torch.as_tensor(pixel_size, dtype=self.dtype, device=self.device))
        else:
            ctf_values = torch.ones(spectra.shape, dtype=self.dtype, device=self.device)
        numerator = spectra * ctf_values
        values = torch.stack([numerator.real, numerator.imag, ctf_values * ctf_values], -1)
        values = values.reshape(images.shape[0], -1, 3)[:, self.in_disc].reshape(-1, 3)
        coords = central_slice_coords(rotmat, self.freq).reshape(images.shape[0], -1, 3)
        coords = coords[:, self.in_disc].reshape(-1, 3)
        splat_trilinear(self.grid, coords * self.padded_size + self.padded_size // 2, values)
        self.count += images.shape[0]

    def volume(self, wiener_eps: float = 1e-2) -> torch.Tensor:
        """The reconstructed real-space volume (L, L, L), in the images' intensity units."""
        weight = self.grid[:, 2]
        received = weight > 0
        if not bool(received.any()):
            raise ValueError("no data were inserted")
        eps = wiener_eps * weight[received].mean()
        spectrum = torch.complex(self.grid[:, 0], self.grid[:, 1]) / (weight + eps)
        p = self.padded_size
        spectrum = spectrum.reshape(p, p, p)
        spectrum = spectrum * (radial_distance(p, 3, self.device, self.dtype) <= p / 2)
        padded = ifft3_centered(spectrum).real
        lo = p // 2 - self.size // 2
        return padded[lo:lo + self.size, lo:lo + self.size, lo:lo + self.size]
