"""The half-spectrum disc where predicted and observed images are compared (training loss, pose search).

Points: the half spectrum of :func:`~cryoace.physics.fourier.rfft2_centered` (columns kx = 0 … 0.5,
rows ky centred) inside a disc of radius ≤ 0.5 cycles/px. Each point's squared error is weighted by
:func:`~cryoace.physics.fourier.half_grid_weights` (1 on the self-mirror columns kx = 0 and 0.5, 2
elsewhere) so that the sum equals the full-disc sum for real images, and divided by L⁴: with the
unnormalized FFT (Parseval: Σ|Ŷ|² = L²·Σ y²) the error of an image is then the mean squared
real-space pixel error of the disc-band-limited images.
"""

from __future__ import annotations

import math

import torch

from .fourier import freq_grid_2d_half, half_grid_weights, irfft2_centered, rfft2_centered

__all__ = ["HalfDiscGrid"]


class HalfDiscGrid:
    """The frequencies where the loss is measured: the half spectrum inside the Nyquist disc (or a
    smaller disc of ``radius_cyc_px``, for a coarse-to-fine band schedule).

    size      : image box L.
    freq      : (Q, 2) (kx, ky) cycles/px of the kept points, in the flattened rfft2_centered order.
    index     : (Q,) positions of those points in the flattened (L·(L//2+1)) half spectrum.
    weights   : (Q,) half-grid weights (1 or 2) divided by L⁴ (see the module docstring).
    """

    def __init__(self, size: int, device=None, dtype: torch.dtype = torch.float32, radius_cyc_px: float = 0.5):
        self.size = int(size)
        self.radius_cyc_px = float(radius_cyc_px)
        freq = freq_grid_2d_half(self.size, device=device, dtype=torch.float64)
        inside = ((freq * freq).sum(-1) <= min(self.radius_cyc_px, 0.5) ** 2).reshape(-1)
        self.index = torch.nonzero(inside).squeeze(1)
        self.freq = freq.reshape(-1, 2)[self.index].to(dtype)
        columns = half_grid_weights(self.size, device=device, dtype=torch.float64)
        weights = columns.expand(self.size, -1).reshape(-1)[self.index]
        self.weights = (weights / float(self.size) ** 4).to(dtype)

    def to(self, device) -> HalfDiscGrid:
        out = object.__new__(HalfDiscGrid)
        out.size, out.radius_cyc_px = self.size, self.radius_cyc_px
        out.index, out.freq, out.weights = (t.to(device) for t in (self.index, self.freq, self.weights))
        return out

    def target(self, images: torch.Tensor, lowpass_sigma_px: float | None = None) -> torch.Tensor:
        """The observed spectra (B, Q) of real images (B, L, L) at the grid's points, optionally
        low-passed by a Gaussian of ``lowpass_sigma_px`` (transfer ``exp(−2π²σ²|k|²)``)."""
        half = rfft2_centered(images)
        spectra = half.reshape(*half.shape[:-2], -1)[..., self.index]
        if lowpass_sigma_px:
            k2 = (self.freq.to(spectra.real.dtype) ** 2).sum(-1)
            spectra = spectra * torch.exp(-2 * math.pi ** 2 * float(lowpass_sigma_px) ** 2 * k2)
        return spectra

    def error(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per image (B,) ≈ mean squared real-space pixel error."""
        return self.power(predicted - target)

    def images(self, spectra: torch.Tensor) -> torch.Tensor:
        """Real images (B, L, L) whose spectrum is ``spectra`` (B, Q) at the grid's points and zero
        everywhere else: images band-limited to the grid's disc (the inverse of :meth:`target`)."""
        half = spectra.new_zeros(*spectra.shape[:-1], self.size * (self.size // 2 + 1))
        half[..., self.index] = spectra
        return irfft2_centered(half.reshape(*spectra.shape[:-1], self.size, self.size // 2 + 1), self.size)

    def power(self, spectra: torch.Tensor) -> torch.Tensor:
        """Weighted power per image (B,) of spectra (B, Q) at the grid's points: the mean squared pixel
        value of the band-limited images (the :meth:`error` of predicting them as 0)."""
        return ((spectra.real ** 2 + spectra.imag ** 2) * self.weights).sum(-1)
