"""Central-slice coordinates and trilinear extraction of slices from a centred Fourier voxel grid.

A pose ``R`` (volume → image coordinates) sees the central slice ``slice(k) = V̂(Rᵀ k)`` with
k = (kx, ky, 0) (docs/conventions.md §1); the Fourier slice theorem then gives
``fft2_centered(projection) == slice`` exactly when Rᵀk falls on grid points.
"""

from __future__ import annotations

import torch


def central_slice_coords(rotmat: torch.Tensor, freq_cyc_px: torch.Tensor) -> torch.Tensor:
    """Volume-frame coordinates Rᵀ·(kx, ky, 0) of an image frequency grid.

    rotmat      : (*P, 3, 3) pose rotations.
    freq_cyc_px : (*G, 2) image frequency grid in cycles/px.
    Returns (*P, *G, 3) coordinates (kx, ky, kz) in the volume frame, cycles/px.
    """
    grid_shape = freq_cyc_px.shape[:-1]
    flat = freq_cyc_px.reshape(-1, 2).to(rotmat.dtype)
    # (Rᵀ k)_j = Σ_i k_i R_ij over the two in-plane rows i = x, y of R.
    coords = torch.einsum("gi,...ij->...gj", flat, rotmat[..., :2, :])
    return coords.reshape(rotmat.shape[:-2] + grid_shape + (3,))


def _to_grid_sample_coords(index_xyz: torch.Tensor, shape_zyx: tuple[int, ...]) -> torch.Tensor:
    """Voxel indices (x, y, z) → grid_sample's normalized [-1, 1] coordinates (align_corners=True)."""
    if shape_zyx[0] == shape_zyx[1] == shape_zyx[2]:  # cube: one scalar factor (the common case)
        return index_xyz * (2.0 / (shape_zyx[-1] - 1)) - 1.0
    scale = index_xyz.new_tensor([2.0 / (n - 1) for n in shape_zyx[::-1]])
    return index_xyz * scale - 1.0


def sample_grid(volume: torch.Tensor, index_xyz: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a real volume (..C, D, H, W) at fractional voxel indices (*Q, 3).

    ``index_xyz`` is (x, y, z) = (last, middle, first) array axis; points outside the grid read 0.
    ``volume`` is (D, H, W) or (C, D, H, W) (usually a cube; box-shaped grids such as a Hermitian
    half are allowed); the result is (*Q) or (C, *Q). Differentiable in both.
    """
    squeeze = volume.ndim == 3
    vol = volume[None] if squeeze else volume
    query_shape = index_xyz.shape[:-1]
    grid = _to_grid_sample_coords(index_xyz.reshape(1, 1, 1, -1, 3).to(vol.dtype), tuple(vol.shape[-3:]))
    out = torch.nn.functional.grid_sample(vol[None], grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)  # (1, C, 1, 1, Q)
    out = out.reshape(vol.shape[0], *query_shape)
    return out[0] if squeeze else out


def extract_slices(volume_ft: torch.Tensor, coords_cyc_px: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a centred complex Fourier voxel grid (D, D, D) at (*Q, 3) coordinates.

    Coordinates are (kx, ky, kz) in cycles/px; DC is voxel D//2 (``fft3_centered`` layout). Points
    beyond the grid read 0. Returns a complex tensor (*Q); differentiable in volume and coordinates.
    """
    size = volume_ft.shape[-1]
    parts = torch.view_as_real(volume_ft).movedim(-1, 0)  # (2, D, D, D): real and imaginary parts
    values = sample_grid(parts, coords_cyc_px * size + size // 2)
    return torch.complex(values[0], values[1])
