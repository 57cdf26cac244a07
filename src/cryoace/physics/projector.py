"""A plain real-space projector (rotate + sum along z), the independent reference for the Fourier path.

``image(x, y) = Σ_z v(Rᵀ·(x, y, z))`` with coordinates in voxels relative to the centre index L//2
(docs/conventions.md §1; checked against RELION's ``relion_project``). Trilinear interpolation, zero outside.
"""

from __future__ import annotations

import torch

from .slicing import sample_grid


def project_real_space(volume: torch.Tensor, rotmat: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Project a real volume (D, D, D) along image z for poses ``rotmat`` (*P, 3, 3) → (*P, D, D).

    Work is chunked over poses (``chunk`` at a time) because each pose samples D³ points.
    """
    size = volume.shape[-1]
    offsets = torch.arange(size, device=volume.device, dtype=rotmat.dtype) - size // 2
    z, y, x = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
    image_xyz = torch.stack([x, y, z], -1)  # (z, y, x, 3) points in the image frame
    batch_shape = rotmat.shape[:-2]
    flat = rotmat.reshape(-1, 3, 3)
    images = []
    for start in range(0, flat.shape[0], chunk):
        r = flat[start:start + chunk]
        # volume-frame coordinates Rᵀ·r_img: (Rᵀ r)_j = Σ_i r_i R_ij
        vol_xyz = torch.einsum("zyxi,bij->bzyxj", image_xyz, r) + size // 2
        images.append(sample_grid(volume.to(rotmat.dtype), vol_xyz).sum(dim=1))
    return torch.cat(images).reshape(batch_shape + (size, size))
