"""Voxel-grid Fourier volumes (ACE-EM's grid decoders) with the neural decoders' interface.

Both classes are :class:`~cryoace.models.hermitian.HermitianDecoder` s: ``decoder(coords_cyc_px
(..., 3)) → complex (...)``, V̂ on the scale of ``fft3_centered`` of the map times the constant
``output_scale`` buffer, Hermitian by construction (``hermitian = True``: only the canonical half
space kz ≥ 0 is sampled, the rest is its conjugate — bit-exact). ``default_lr = 1.0`` is the
learning rate ACE-EM used for its voxel grid (AdamW; 1e-3 for the encoder), so a trainer can give
the grid its own parameter group; the grid is the single parameter (``grid`` resp. ``volume``).

* ``"voxel-fourier"`` — :class:`VoxelFourierDecoder`: a learnable complex Fourier grid, sliced
  directly (trilinear).
* ``"voxel-real"`` — :class:`VoxelRealDecoder`: a learnable real-space map (L, L, L) whose centred
  FFT (optionally of the map zero-padded to ``pad_factor``·L) is computed once per call and sliced
  trilinearly (the real-space voxel grid of cryoGAN/CryoPoseNet, projected in Fourier space).

**The Hermitian half grid.** A grid of FFT size ``n`` (even; spacing 1/n cycles/px, DC at offset 0)
is stored as a real tensor ``(2, n//2 + 1, n + 1, n + 1)`` = (Re/Im, kz, ky, kx) holding the kz
offsets 0 … n/2 and the ky, kx offsets −n/2 … +n/2. The extra +n/2 planes repeat the −n/2 ones:
the DFT is periodic, so V̂_DFT(+n/2) *is* V̂_DFT(−n/2) (the transform of a voxel map, 0.5 and −0.5
cycles/px are the same frequency). With them, every canonical point inside [−0.5, 0.5]³ has all
eight trilinear neighbours in the grid, and the decoder equals trilinear interpolation of the full,
periodic, Hermitian DFT grid *everywhere* in [−0.5, 0.5]³ (exactly, up to the FFT's rounding).
:func:`cryoace.physics.slicing.extract_slices` (the physics reference) instead reads zeros past
index n − 1, so the two agree wherever every component of k is ≤ 0.5 − 1/n and differ only in
that edge band (where ours is the right one); points beyond 0.5 in any component read 0.

Memory: a grid of size n holds 2·(n/2+1)·(n+1)² floats (n = 128: 2.2 M, 8.6 MB in float32).
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics.fourier import fft3_centered
from ..physics.slicing import sample_grid
from .hermitian import HermitianDecoder

__all__ = ["VoxelFourierDecoder", "VoxelRealDecoder", "hermitian_half_grid", "sample_half_grid"]


def _check_size(size: int, what: str = "size") -> int:
    if size < 2 or size % 2:
        raise ValueError(f"{what} must be an even integer >= 2, got {size}")
    return int(size)


def hermitian_half_grid(volume_ft: torch.Tensor) -> torch.Tensor:
    """Centred complex spectrum (n, n, n) (``fft3_centered`` layout) → real half grid
    (2, n//2 + 1, n + 1, n + 1) of the module docstring (kz ≥ 0, +n/2 planes copied from −n/2).

    Differentiable (indexing and concatenation only)."""
    c = volume_ft.shape[-1] // 2
    half = torch.cat([volume_ft[c:], volume_ft[:1]], dim=0)  # kz offsets 0 … n/2−1, then +n/2 ≡ −n/2
    half = torch.cat([half, half[:, :1]], dim=1)            # ky: append +n/2 ≡ −n/2
    half = torch.cat([half, half[:, :, :1]], dim=2)         # kx: append +n/2 ≡ −n/2
    return torch.view_as_real(half).movedim(-1, 0)


def sample_half_grid(half_grid: torch.Tensor, coords_cyc_px: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (N, 2) = (Re, Im) of a half grid (2, n//2+1, n+1, n+1) at canonical
    (kz ≥ 0) coordinates (N, 3) in cycles/px; points outside the grid read 0."""
    n = half_grid.shape[-1] - 1
    # index of offset 0: n/2 along x and y (centred), 0 along z (the half starts at kz = 0)
    origin = coords_cyc_px.new_tensor([n // 2, n // 2, 0])
    return sample_grid(half_grid, coords_cyc_px * n + origin).transpose(0, 1)


class VoxelFourierDecoder(HermitianDecoder):
    """Learnable Fourier voxel grid of FFT size ``size`` (spacing 1/size cycles/px), sliced trilinearly.

    size        : n, even. n = L matches the DFT of an L-box map; n = 2L samples twice as finely
                  (like a 2× zero-padded map) at 8× the parameters.
    init_std    : the grid starts at 0 (``init_std=0``, a zero volume) or N(0, init_std²) (in units
                  of ``output_scale``).
    The parameter ``grid`` (2, n//2+1, n+1, n+1) is the Hermitian half grid (module docstring) divided
    by ``output_scale``. Its kz = 0 plane holds both ±(ky, kx) and is used symmetrised,
    ``(P(k) + conj P(−k)) / 2``, so the decoder is trilinear interpolation of one Hermitian grid, with
    no jump across kz = 0 (the neural decoders' caveat) — the redundant half of that plane only
    shares gradients.
    """

    default_lr = 1.0

    def __init__(self, size: int, init_std: float = 0.0, output_scale: float = 1.0,
                 allow_autocast: bool = False):
        super().__init__(output_scale, allow_autocast)
        self.size = _check_size(size)
        grid = torch.zeros(2, self.size // 2 + 1, self.size + 1, self.size + 1)
        if init_std > 0:
            grid.normal_(0.0, float(init_std))
        self.grid = nn.Parameter(grid)

    def effective_grid(self) -> torch.Tensor:
        """The half grid actually sampled (×``output_scale`` = V̂): ``grid`` with its kz = 0 plane
        made Hermitian."""
        plane = self.grid[:, 0]  # (2, n+1, n+1); flipping both axes maps offset k to −k exactly
        conj_sign = plane.new_tensor([1.0, -1.0])[:, None, None]
        symmetric = 0.5 * (plane + conj_sign * plane.flip(-2, -1))
        return torch.cat([symmetric[:, None], self.grid[:, 1:]], dim=1)

    def network(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        return sample_half_grid(self.effective_grid(), coords_cyc_px)

    @torch.no_grad()
    def load_spectrum(self, volume_ft: torch.Tensor) -> None:
        """Set the grid to a centred complex spectrum (size, size, size) (``fft3_centered`` of a map)."""
        if volume_ft.shape != (self.size,) * 3:
            raise ValueError(f"expected a spectrum of shape {(self.size,) * 3}, got {tuple(volume_ft.shape)}")
        self.grid.copy_(hermitian_half_grid(volume_ft) / self.output_scale)


class VoxelRealDecoder(HermitianDecoder):
    """Learnable real-space map (size, size, size), axes (z, y, x), centre at size//2, whose centred
    FFT is sliced trilinearly.

    size       : L, even.
    pad_factor : the map is zero-padded to n = pad_factor·L before the FFT (as
                 :meth:`cryoace.physics.forward.VoxelFourierVolume.from_real`): same frequencies in
                 cycles/px, sampled pad_factor times more densely, so trilinear interpolation of
                 off-grid slice points is much more accurate (2 is the usual choice; 1 is cheapest).
                 The FFT costs O(n³ log n) per call, for forward and backward.
    init_std   : the map starts at 0 or N(0, init_std²) (in units of ``output_scale``).
    The parameter ``volume`` is the map divided by ``output_scale``; :meth:`real_space_volume` gives
    the map itself (exactly; :func:`~cryoace.models.evaluate_grid` + ``ifft3_centered`` gives it
    too, up to rounding, on the size-L grid).
    """

    default_lr = 1.0

    def __init__(self, size: int, pad_factor: int = 2, init_std: float = 0.0, output_scale: float = 1.0,
                 allow_autocast: bool = False):
        super().__init__(output_scale, allow_autocast)
        self.size = _check_size(size)
        if int(pad_factor) != pad_factor or pad_factor < 1:
            raise ValueError(f"pad_factor must be a positive integer, got {pad_factor}")
        self.pad_factor = int(pad_factor)
        volume = torch.zeros(self.size, self.size, self.size)
        if init_std > 0:
            volume.normal_(0.0, float(init_std))
        self.volume = nn.Parameter(volume)

    def spectrum(self) -> torch.Tensor:
        """Centred FFT (n, n, n), n = pad_factor·size, of the zero-padded parameter map
        (× ``output_scale`` = V̂)."""
        n = self.pad_factor * self.size
        lo = n // 2 - self.size // 2  # keeps the centre at index n//2, as VoxelFourierVolume.from_real
        hi = n - self.size - lo
        padded = nn.functional.pad(self.volume, (lo, hi) * 3) if n > self.size else self.volume
        return fft3_centered(padded)

    def network(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        # once per call: HermitianDecoder.forward evaluates the network once on all points
        return sample_half_grid(hermitian_half_grid(self.spectrum()), coords_cyc_px)

    def real_space_volume(self) -> torch.Tensor:
        """The map (size, size, size) = ``volume · output_scale`` (detached), axes (z, y, x)."""
        return (self.volume * self.output_scale).detach()

    @torch.no_grad()
    def load_volume(self, volume: torch.Tensor) -> None:
        """Set the map (size, size, size), axes (z, y, x), centre at size//2."""
        if volume.shape != (self.size,) * 3:
            raise ValueError(f"expected a map of shape {(self.size,) * 3}, got {tuple(volume.shape)}")
        self.volume.copy_(volume / self.output_scale)
