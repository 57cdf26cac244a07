"""Pose metrics against ground truth (docs/conventions.md §1 "Metrics"): rotation error, translation error,
the global-offset fit of shifts, and pose coverage on equal-area viewing-direction bins.

Rotations must be aligned first (:func:`cryoace.evaluate.align.align_rotations`): an ab initio frame is
arbitrary. Shifts need no alignment for rotation or hand (both leave every image unchanged, see
:mod:`cryoace.evaluate.align`), but a global *translation* of the predicted map changes every
particle's shift; :func:`fit_global_offset` measures and removes it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..physics.rotations import geodesic_angle

__all__ = ["RotationErrors", "rotation_errors", "translation_error", "fit_global_offset",
           "equal_area_bands", "viewing_direction_bin", "viewing_directions", "pose_coverage",
           "expected_uniform_coverage", "DEFAULT_COVERAGE_BINS"]

#: As many bins as HEALPix order 3 (Nside 8): cells about 7.3° across.
DEFAULT_COVERAGE_BINS = 768


@dataclasses.dataclass(frozen=True)
class RotationErrors:
    """Errors of aligned rotations against the truth, over all particles.

    mean_sq_frobenius, median_sq_frobenius : ``‖R_gt − R‖²_F`` = ``8 sin²(θ/2)`` (range 0–8).
    mean_angle_deg, median_angle_deg       : geodesic angle θ of ``R_gtᵀ R`` in degrees (0–180).
    """

    mean_sq_frobenius: float
    median_sq_frobenius: float
    mean_angle_deg: float
    median_angle_deg: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}


def _rot(x) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim != 3 or t.shape[-2:] != (3, 3) or t.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, 3, 3) stack of rotations, got {tuple(t.shape)}")
    return t


def rotation_errors(rot_aligned, rot_gt) -> RotationErrors:
    """Mean / median squared Frobenius distance and geodesic angle between (N, 3, 3) rotation stacks."""
    ra, rg = _rot(rot_aligned), _rot(rot_gt)
    if ra.shape != rg.shape:
        raise ValueError(f"shapes differ: {tuple(ra.shape)} vs {tuple(rg.shape)}")
    rg = rg.to(ra.device)
    sq = ((ra - rg) ** 2).sum((-1, -2))
    angle = torch.rad2deg(geodesic_angle(rg, ra))
    return RotationErrors(mean_sq_frobenius=float(sq.mean()), median_sq_frobenius=float(sq.median()),
                          mean_angle_deg=float(angle.mean()), median_angle_deg=float(angle.median()))


def _shifts(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim != 2 or t.shape[-1] != 2 or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, 2) array of (x, y) shifts, got {tuple(t.shape)}")
    return t


def translation_error(shift_pred_px, shift_gt_px) -> float:
    """Mean over particles of ``‖t_pred − t_gt‖²`` (px²), shifts (N, 2) in pixels (RELION's origin
    sign for both). No alignment is needed: a global rotation or hand flip leaves shifts unchanged."""
    tp, tg = _shifts(shift_pred_px, "shift_pred_px"), _shifts(shift_gt_px, "shift_gt_px")
    if tp.shape != tg.shape:
        raise ValueError(f"shapes differ: {tuple(tp.shape)} vs {tuple(tg.shape)}")
    return float(((tp - tg.to(tp.device)) ** 2).sum(-1).mean())


def fit_global_offset(rotmat, shift_pred_px, shift_gt_px) -> tuple[torch.Tensor, float]:
    """The global 3D offset of a predicted map that best explains the predicted shifts.

    If the (aligned) predicted map is the truth translated by ``d`` voxels, ``v_pred(r) = v(r − d)``,
    its projection with pose R is the true one translated in-plane by ``(R d)_xy``, so predicted
    shifts (RELION's origin: image = projection translated by −t) absorb it:
    ``t_pred = t_gt + (R d)_xy``. Solves that for ``d`` by least squares over all particles.

    rotmat : (N, 3, 3) the *aligned* predicted rotations (truth frame, see ``align_rotations``).
    Returns ``(d, mean_sq_px)``: d (3,) float64 (x, y, z) in px, and the translation error left after
    removing it (px²). ``d`` is zero (and the error unchanged) if the poses cannot determine it
    (e.g. all particles seen from one direction leave a component undetermined: it is set to 0).
    """
    r = _rot(rotmat)
    tp, tg = _shifts(shift_pred_px, "shift_pred_px"), _shifts(shift_gt_px, "shift_gt_px")
    if not (r.shape[0] == tp.shape[0] == tg.shape[0]):
        raise ValueError("rotmat, shift_pred_px and shift_gt_px must describe the same particles")
    a = r[:, :2, :].reshape(-1, 3)            # rows (R d)_x, (R d)_y
    b = (tp - tg.to(tp.device)).reshape(-1)
    # minimum-norm least squares (pinv with a relative cutoff): undetermined directions get 0
    d = torch.linalg.pinv(a, rtol=1e-8) @ b
    resid = (tp - tg - (r[:, :2, :] @ d)).pow(2).sum(-1).mean()
    return d, float(resid)


# ---------------------------------------------------------------------------------------------
# Pose coverage
# ---------------------------------------------------------------------------------------------

def equal_area_bands(n_bins: int) -> np.ndarray:
    """Cells per latitude band of an equal-area partition of the sphere into ``n_bins`` cells.

    Leopardi's zonal equal-area construction ("recursive zonal equal area", simplified to one
    level): two polar caps of one cell each; between them ``round((π − 2θ_cap) / √A)`` collars of
    about equal angular height (A = 4π / n_bins is the cell area); each collar gets the number of
    cells its area holds, rounded with the running remainder carried on so the total is exact.
    Collar boundaries are then moved so that band ``b`` spans exactly ``cells_b · A`` — i.e. bands
    are bounded by ``cos θ = 1 − 2 C_b / n_bins`` with ``C_b`` the cumulative cell count — and each
    band is cut into equal longitude sectors. Every cell has area exactly A, and cells are roughly
    square (HEALPix-like), unlike bands uniform in cos θ with a fixed number of sectors.
    """
    n = int(n_bins)
    if n < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if n <= 2:
        return np.ones(n, dtype=np.int64)
    area = 4 * math.pi / n
    theta_cap = math.acos(1 - 2 / n)
    n_collars = max(1, round((math.pi - 2 * theta_cap) / math.sqrt(area)))
    height = (math.pi - 2 * theta_cap) / n_collars
    counts, carry = [], 0.0
    for j in range(n_collars):
        t0, t1 = theta_cap + j * height, theta_cap + (j + 1) * height
        ideal = 2 * math.pi * (math.cos(t0) - math.cos(t1)) / area
        m = max(1, round(ideal + carry))
        carry += ideal - m
        counts.append(m)
    counts[-1] += (n - 2) - sum(counts)  # rounding of the floats; normally already exact
    if counts[-1] < 1:
        raise ValueError(f"cannot partition the sphere into {n} equal-area cells")
    return np.asarray([1, *counts, 1], dtype=np.int64)


def viewing_directions(rotmat) -> torch.Tensor:
    """Unit viewing directions (N, 3): the volume-frame direction of the image z axis (the beam),
    ``Rᵀ e_z`` = the third row of R."""
    return _rot(rotmat)[:, 2, :]


def viewing_direction_bin(directions, n_bins: int = DEFAULT_COVERAGE_BINS) -> np.ndarray:
    """Equal-area cell (0 .. n_bins−1) of each direction (N, 3) (see :func:`equal_area_bands`);
    cells are numbered band by band from the +z pole, by longitude φ = atan2(y, x) within a band."""
    d = torch.nn.functional.normalize(torch.as_tensor(directions).to(torch.float64), dim=-1).cpu().numpy()
    bands = equal_area_bands(n_bins)
    first = np.concatenate([[0], np.cumsum(bands)])        # cumulative cells C_b
    # cells' worth of area between the +z pole and the direction: 2π(1 − cos θ) / A
    above = (1.0 - np.clip(d[:, 2], -1.0, 1.0)) * n_bins / 2
    band = np.clip(np.searchsorted(first[1:-1], above, side="right"), 0, len(bands) - 1)
    phi = np.arctan2(d[:, 1], d[:, 0])                      # (−π, π]
    sector = np.floor((phi + math.pi) / (2 * math.pi) * bands[band]).astype(np.int64)
    sector = np.clip(sector, 0, bands[band] - 1)
    return first[band] + sector


def pose_coverage(rotmat, n_bins: int = DEFAULT_COVERAGE_BINS) -> float:
    """Fraction of the ``n_bins`` equal-area viewing-direction cells that at least one pose reaches.

    Viewing direction: :func:`viewing_directions` (the full sphere; directions d and −d are separate
    cells, although their central slices are the same plane, so poses confined to one hemisphere
    score about 0.5 while still sampling every Fourier plane). For N Haar-random poses the expected
    value is :func:`expected_uniform_coverage` — compare against it, or against the true poses'
    coverage, since the value grows with N.
    """
    bins = viewing_direction_bin(viewing_directions(rotmat), n_bins)
    return float(len(np.unique(bins)) / int(n_bins))


def expected_uniform_coverage(n_poses: int, n_bins: int = DEFAULT_COVERAGE_BINS) -> float:
    """Expected :func:`pose_coverage` of ``n_poses`` Haar-random poses: ``1 − (1 − 1/n_bins)^n``."""
    return float(1.0 - (1.0 - 1.0 / int(n_bins)) ** int(n_poses))

