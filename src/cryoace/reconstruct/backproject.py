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

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..physics.ctf import compute_ctf
from ..physics.fourier import fft2_centered, freq_grid_2d, ifft3_centered, radial_distance
from ..physics.shift import phase_ramp
from ..physics.slicing import central_slice_coords
from ..types import CTFParams

if TYPE_CHECKING:
    from ..io.particles import ParticleDataset, ParticleTable


def _pad_images(images: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Zero-pad images (B, L, L) to (B, P, P) keeping the centre L//2 at P//2."""
    size = images.shape[-1]
    if padded_size == size:
        return images
    lo = padded_size // 2 - size // 2
    out = images.new_zeros(images.shape[:-2] + (padded_size, padded_size))
    out[..., lo:lo + size, lo:lo + size] = images
    return out


def splat_trilinear(grid: torch.Tensor, size: int, index_xyz: torch.Tensor, values: torch.Tensor) -> None:
    """Add ``values`` (Q, C) at fractional voxel indices (Q, 3) = (x, y, z) into ``grid`` (size³, C).

    The adjoint of trilinear interpolation: each value is shared among its 8 neighbouring voxels with
    the trilinear weights. Indices must lie in [0, size − 1) (the caller pads its grid so that every
    neighbour exists: no masking in the hot loop).
    """
    base = torch.floor(index_xyz)
    frac = (index_xyz - base).to(values.dtype)
    base = base.long()
    flat0 = (base[:, 2] * size + base[:, 1]) * size + base[:, 0]
    wx, wy, wz = ((1 - frac[:, a], frac[:, a]) for a in range(3))
    for dz in (0, 1):
        for dy in (0, 1):
            wzy = wz[dz] * wy[dy]
            for dx in (0, 1):
                flat = flat0 + ((dz * size + dy) * size + dx)
                grid.index_add_(0, flat, values * (wzy * wx[dx])[:, None])


class FourierAccumulator:
    """Accumulates CTF-weighted slices of a (pad_factor·L)³ Fourier grid; :meth:`volume` inverts it.

    size       : box L of the images (px).
    pad_factor : zero-padding of images and volume (2 as in RELION: accurate trilinear gridding).
    dtype      : of the sums; float32 (the default) is accurate to far below the data's noise and
                 several times faster to scatter into than float64.
    """

    def __init__(self, size: int, pad_factor: int = 2, device=None, dtype: torch.dtype = torch.float32):
        self.size = size
        self.padded_size = pad_factor * size
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Slice points (|k| ≤ 0.5) lie at indices 1 … P + 1 (one voxel of margin below), and a point at
        # P + 1 (rounding can put one a hair beyond) has its trilinear neighbour at P + 2: two voxels of
        # margin above, so every neighbour exists. Columns: Re(N), Im(N), W.
        self.grid_size = self.padded_size + 3
        self.grid = torch.zeros(self.grid_size ** 3, 3, dtype=dtype, device=self.device)
        self.freq = freq_grid_2d(self.padded_size, device=self.device, dtype=dtype)
        # only frequencies inside the Nyquist disc of the original pixels carry information
        self.in_disc = (self.freq.norm(dim=-1) <= 0.5).reshape(-1)
        self.count = 0

    def insert(self, images: torch.Tensor, rotmat: torch.Tensor, shift_px: torch.Tensor,
               pixel_size: torch.Tensor | float, ctf: CTFParams | None = None, weight: torch.Tensor | None = None,
               max_freq_cyc_px: float = 0.5) -> None:
        """Insert a batch: images (B, L, L) real, rotmat (B, 3, 3), shift_px (B, 2) pose shifts in px.

        Several poses per image: rotmat (B, K, 3, 3), shift_px (B, K, 2) and ``weight`` (B, K) (e.g.
        pose probabilities, summing to 1 per image) insert each image K times, weighting both its data
        and its CTF² sums (an expectation over poses, as in maximum-likelihood refinement); each image's
        spectrum and CTF are computed once.
        weight          : (B,) or (B, K) optional weights.
        max_freq_cyc_px : insert only frequencies up to this radius (cycles/px of the images) — a
                          low-resolution map costs a fraction of a full insertion.
        """
        batch = images.shape[0]
        images = images.to(self.device, self.dtype)
        rotmat = rotmat.to(self.device, self.dtype).reshape(batch, -1, 3, 3)          # (B, K, 3, 3)
        shift_px = shift_px.to(self.device, self.dtype).reshape(batch, -1, 2)         # (B, K, 2)
        keep = self.in_disc if max_freq_cyc_px >= 0.5 else (self.freq.norm(dim=-1) <= max_freq_cyc_px).reshape(-1)
        freq = self.freq.reshape(-1, 2)[keep]                                          # (Q, 2)
        spectra = fft2_centered(_pad_images(images, self.padded_size)).reshape(batch, -1)[:, keep]
        if ctf is not None:
            ctf_values = compute_ctf(ctf.to(self.device, self.dtype), freq,
                                     torch.as_tensor(pixel_size, dtype=self.dtype, device=self.device))
        else:
            ctf_values = torch.ones(spectra.shape, dtype=self.dtype, device=self.device)
        # centre the particles: un-apply each pose's shift
        numerator = (spectra * ctf_values)[:, None] * phase_ramp(freq, -shift_px)   # (B, K, Q)
        weights = (ctf_values * ctf_values)[:, None].expand_as(numerator.real)
        values = torch.stack([numerator.real, numerator.imag, weights], -1)
        if weight is not None:
            values = values * weight.to(self.device, self.dtype).reshape(batch, -1, 1, 1)
        coords = central_slice_coords(rotmat, freq)                                     # (B, K, Q, 3)
        index = coords.reshape(-1, 3) * self.padded_size + (self.padded_size // 2 + 1)  # +1: the margin
        splat_trilinear(self.grid, self.grid_size, index, values.reshape(-1, 3))
        self.count += batch

    def merged(self, other: FourierAccumulator) -> FourierAccumulator:
        """A new accumulator holding both this one's and ``other``'s data (e.g. two half sets)."""
        both = FourierAccumulator(self.size, self.padded_size // self.size, self.device, self.dtype)
        both.grid = self.grid + other.grid
        both.count = self.count + other.count
        return both

    def volume(self, wiener_eps: float = 1e-2) -> torch.Tensor:
        """The reconstructed real-space volume (L, L, L), in the images' intensity units."""
        p = self.padded_size
        grid = self.grid.reshape(self.grid_size, self.grid_size, self.grid_size, 3)[1:p + 1, 1:p + 1, 1:p + 1]
        weight = grid[..., 2]
        received = weight > 0
        if not bool(received.any()):
            raise ValueError("no data were inserted")
        eps = wiener_eps * weight[received].mean()
        spectrum = torch.complex(grid[..., 0], grid[..., 1]) / (weight + eps)
        spectrum = spectrum * (radial_distance(p, 3, self.device, self.dtype) <= p / 2)
        padded = ifft3_centered(spectrum).real
        lo = p // 2 - self.size // 2
        return padded[lo:lo + self.size, lo:lo + self.size, lo:lo + self.size]


def accumulate(dataset: ParticleDataset, rows: np.ndarray, accumulator: FourierAccumulator,
               batch_size: int = 128, use_ctf: bool = True, progress: bool = True,
               desc: str = "backprojecting") -> None:
    """Insert the particles ``rows`` of ``dataset`` (which must carry poses) into ``accumulator``.

    The CTF is applied when ``use_ctf`` and the particle file has CTF parameters.
    """
    use_ctf = use_ctf and dataset.has_ctf
    from tqdm.auto import tqdm

    batches = dataset.batches(batch_size, indices=rows)
    # disable=None: a bar only when stderr is a terminal (logs and pipes stay clean)
    for batch in tqdm(batches, desc=desc, unit="batch", disable=None if progress else True, leave=False):
        shift_px = batch.pose.shift_angst / batch.pixel_size[:, None]
        accumulator.insert(batch.images, batch.pose.rotmat, shift_px, batch.pixel_size,
                           batch.ctf if use_ctf else None)


def split_half_sets(table: ParticleTable, rows: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gold-standard halves of ``rows``: RELION's ``rlnRandomSubset`` (1/2) when the file has it,
    otherwise a seeded random split into two halves of (nearly) equal size."""
    subset = table.extra_column("rlnRandomSubset")
    if subset is not None:
        subset = subset[rows]
        if set(np.unique(subset).tolist()) <= {1, 2}:
            return rows[subset == 1], rows[subset == 2]
    perm = np.random.default_rng(seed).permutation(len(rows))
    half = (len(rows) + 1) // 2
    return np.sort(rows[perm[:half]]), np.sort(rows[perm[half:]])
