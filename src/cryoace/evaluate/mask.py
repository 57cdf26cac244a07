"""Real-space masks from a map: threshold, dilate, raised-cosine soft edge.

``make_mask`` binarizes a map at a threshold, dilates the result by ``extend_px`` voxels (Euclidean
ball) and adds a soft edge ``soft_px`` voxels wide: with ``d`` the Euclidean distance (voxels) from a
voxel to the nearest voxel above the threshold,

    mask = 1                                         for d ≤ extend
         = ½ (1 + cos(π (d − extend) / soft))        for extend < d < extend + soft
         = 0                                         beyond.

A hard-edged mask multiplies spurious correlation into an FSC at high frequency; the soft edge (and
the phase-randomization correction of :func:`cryoace.evaluate.fsc.masked_fsc`) keeps it small.

The distance is exact up to ``extend + soft`` (farther voxels only need to know they are farther): a
separable squared-distance transform, one axis at a time, ``D'(i) = min_{|j| ≤ R} D(i + j) + j²``,
whose truncation to ``|j| ≤ R`` keeps every optimal offset of a distance ≤ R.

Default threshold (:func:`default_threshold`): the box is mostly solvent, so the larger of 3 robust
noise standard deviations above the median (σ = 1.4826 · median absolute deviation) and 5% of the
way from the median to the maximum (which decides for noise-free maps, where the MAD is ~0).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..defaults import MASK_EXTEND_PX, MASK_SOFT_PX

__all__ = ["default_threshold", "distance_to_mask", "soft_edge", "make_mask"]

#: The default dilation and soft-edge width (voxels).
DEFAULT_EXTEND_PX = MASK_EXTEND_PX
DEFAULT_SOFT_PX = MASK_SOFT_PX


def default_threshold(volume) -> float:
    """The threshold used when none is given (module docstring): max(median + 3σ_MAD,
    median + 0.05 (max − median))."""
    x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    x = x.detach().to(torch.float64).flatten()
    med = float(x.median())
    sigma = 1.4826 * float((x - med).abs().median())
    return max(med + 3 * sigma, med + 0.05 * (float(x.max()) - med))


def distance_to_mask(binary: torch.Tensor, max_distance: float) -> torch.Tensor:
    """Euclidean distance (voxels, float64) from every voxel of a (z, y, x) grid to the nearest True
    voxel of ``binary``: exact where ≤ ``max_distance``; larger distances read ``inf``."""
    radius = max(0, math.ceil(max_distance))
    far = float(3 * (radius + 1) ** 2)  # beyond any distance the truncated passes can produce
    d = torch.where(binary.bool(), 0.0, far).to(torch.float64)
    for axis in range(d.ndim):
        src = d.movedim(axis, 0)
        out = src.clone()
        for off in range(1, radius + 1):
            step = float(off * off)
            out[off:] = torch.minimum(out[off:], src[:-off] + step)
            out[:-off] = torch.minimum(out[:-off], src[off:] + step)
        d = out.movedim(0, axis)
    dist = d.sqrt()
    return torch.where(dist <= max_distance, dist, torch.full_like(dist, math.inf))


def soft_edge(distance: torch.Tensor, extend_px: float, soft_px: float) -> torch.Tensor:
    """The mask profile as a function of the distance (module docstring), float32."""
    if soft_px > 0:
        edge = 0.5 * (1 + torch.cos(math.pi * ((distance - extend_px) / soft_px).clamp(0, 1)))
    else:
        edge = torch.zeros_like(distance)
    return torch.where(distance <= extend_px, torch.ones_like(distance), edge).to(torch.float32)


def make_mask(volume, threshold: float | None = None, extend_px: float = DEFAULT_EXTEND_PX,
              soft_px: float = DEFAULT_SOFT_PX, lowpass_angst: float | None = None,
              voxel_size: float | None = None) -> tuple[torch.Tensor, float]:
    """A soft mask (L, L, L) float32 in [0, 1] from a map, and the threshold used.

    volume        : (z, y, x) map (array or tensor).
    threshold     : density threshold (map units); None = :func:`default_threshold` of the (low-passed)
                    map.
    extend_px     : dilation of the thresholded region, voxels (≥ 0).
    soft_px       : width of the raised-cosine edge, voxels (≥ 0; 0 = hard edge).
    lowpass_angst : optional Gaussian low-pass (amplitude ½ at this resolution, Å; needs
                    ``voxel_size``, Å/px) before thresholding, for a smoother outline.
    Raises ValueError for negative widths or an empty thresholded region.
    """
    from .map_align import gaussian_lowpass

    if extend_px < 0 or soft_px < 0:
        raise ValueError(f"extend and soft widths must be >= 0, got {extend_px} and {soft_px}")
    v = volume.detach() if isinstance(volume, torch.Tensor) else torch.from_numpy(np.array(volume))
    v = v.to(torch.float64).cpu()
    if lowpass_angst:
        if not voxel_size or voxel_size <= 0 or lowpass_angst <= 0:
            raise ValueError("a low-pass needs a positive resolution and voxel size")
        # exp(−k²/2σ²) = ½ at k = voxel_size / lowpass_angst cycles/px
        v = gaussian_lowpass(v, voxel_size / lowpass_angst / math.sqrt(2 * math.log(2)))
    if threshold is None:
        threshold = default_threshold(v)
    binary = v > threshold
    if not bool(binary.any()):
        raise ValueError(f"no voxel is above the threshold {threshold:g} (map max {float(v.max()):g})")
    distance = distance_to_mask(binary, extend_px + soft_px)
    return soft_edge(distance, extend_px, soft_px), float(threshold)
