"""Centred FFT helpers, frequency grids, radial shells, circular masks, Fourier cropping.

"Centred" means both domains keep their origin at index L//2 on every axis: the real-space centre
(rotation origin, as in RELION) and the Fourier DC term. Forward transforms are unnormalized
(``norm="backward"``), so ``fft2_centered(projection) == central slice of fft3_centered(volume)``
with no scale factor. This is the only module that calls (i)fftshift.
"""

from __future__ import annotations

import torch


def _dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(-ndim, 0))


def fftn_centered(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Unnormalized FFT over the last ``ndim`` axes, centre L//2 → DC at index L//2 (both centred)."""
    dims = _dims(ndim)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifftn_centered(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Inverse of :func:`fftn_centered` (normalized by 1/N); returns a complex tensor."""
    dims = _dims(ndim)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def fft2_centered(images: torch.Tensor) -> torch.Tensor:
    """Centred 2D spectrum of images (..., L, L); DC at index [L//2, L//2]."""
    return fftn_centered(images, 2)


def ifft2_centered(spectra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_centered` (complex result; take ``.real`` for real images)."""
    return ifftn_centered(spectra, 2)


def fft3_centered(volume: torch.Tensor) -> torch.Tensor:
    """Centred 3D spectrum of volumes (..., L, L, L); DC at index [L//2]*3."""
    return fftn_centered(volume, 3)


def ifft3_centered(spectra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3_centered` (complex result)."""
    return ifftn_centered(spectra, 3)


def rfft2_centered(images: torch.Tensor) -> torch.Tensor:
    """Half spectrum (..., L, L//2 + 1) of real images: columns kx = 0 … 0.5 (``rfftfreq``), rows ky
    centred (index L//2 is ky = 0). The other half follows from Hermitian symmetry."""
    half = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))
    return torch.fft.fftshift(half, dim=-2)


def irfft2_centered(half_spectra: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`rfft2_centered`: real images (..., size, size) with the centre at size//2."""
    images = torch.fft.irfft2(torch.fft.ifftshift(half_spectra, dim=-2), s=(size, size))
    return torch.fft.fftshift(images, dim=(-2, -1))


def freq_grid_2d_half(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frequency grid (size, size//2 + 1, 2) of the :func:`rfft2_centered` layout, in cycles/px."""
    ky = freq_1d(size, device, dtype)
    kx = torch.fft.rfftfreq(size, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def half_grid_weights(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Column weights (size//2 + 1,) that make a sum over the half grid equal the sum over the full
    grid for Hermitian spectra: 1 for kx = 0 and kx = 0.5 (their own mirror columns), 2 otherwise."""
    weights = torch.full((size // 2 + 1,), 2.0, device=device, dtype=dtype)
    weights[0] = 1.0
    weights[-1] = 1.0
    return weights


def freq_1d(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centred frequencies in cycles/px: ``fftshift(fftfreq(size))``; index size//2 is 0, range [-0.5, 0.5)."""
    return torch.fft.fftshift(torch.fft.fftfreq(size, device=device, dtype=dtype))


def freq_grid_2d(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centred 2D frequency grid (size, size, 2) in cycles/px; ``[..., 0]`` is kx, ``[..., 1]`` is ky."""
    f = freq_1d(size, device, dtype)
    ky, kx = torch.meshgrid(f, f, indexing="ij")
    return torch.stack([kx, ky], dim=-1)


def freq_grid_3d(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Centred 3D frequency grid (size, size, size, 3) in cycles/px, last axis (kx, ky, kz)."""
    f = freq_1d(size, device, dtype)
    kz, ky, kx = torch.meshgrid(f, f, f, indexing="ij")
    return torch.stack([kx, ky, kz], dim=-1)


def radial_distance(size: int, ndim: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Distance (in px, or frequency-index units) of every grid point from the centre index size//2."""
    f = freq_1d(size, device, dtype) * size  # integer offsets from the centre
    grids = torch.meshgrid(*([f] * ndim), indexing="ij")
    return torch.sqrt(sum(g * g for g in grids))


def radial_shell_index(size: int, ndim: int, device=None) -> torch.Tensor:
    """Integer Fourier shell of every point of a centred grid: round(|k| · size), shells 1 voxel wide."""
    return torch.round(radial_distance(size, ndim, device, torch.float64)).long()


def circular_mask(size: int, radius: float | None = None, ndim: int = 2, device=None) -> torch.Tensor:
    """Boolean disc/ball of ``radius`` (px / frequency-index units, default size/2) about index size//2.

    On a centred Fourier grid the default radius is the Nyquist disc (0.5 cycles/px).
    """
    radius = size / 2 if radius is None else radius
    return radial_distance(size, ndim, device, torch.float64) <= radius


def fourier_crop(x: torch.Tensor, new_size: int, ndim: int = 2) -> torch.Tensor:
    """Downsample real images (..., L, L) — or volumes with ``ndim=3`` — to ``new_size`` per axis by
    cropping their centred spectrum.

    Values keep their scale (a constant stays the same constant); the pixel size grows by
    L / new_size. ``new_size`` must be even and at most L.
    """
    size = x.shape[-1]
    if new_size == size:
        return x
    if new_size > size or new_size % 2:
        raise ValueError(f"Fourier crop needs an even new size <= {size}, got {new_size}")
    start = size // 2 - new_size // 2
    crop = (Ellipsis,) + (slice(start, start + new_size),) * ndim
    return ifftn_centered(fftn_centered(x, ndim)[crop], ndim).real * (new_size / size) ** ndim
