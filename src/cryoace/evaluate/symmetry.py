"""Where a map's symmetry axes lie (:mod:`cryoace.physics.symmetry` for the groups and conventions).

A map built from an atomic model has its axes wherever the model put them, not along RELION's
standard frame. :func:`symmetry_frame` finds them by aligning the map with itself: the n-fold axis is
the direction about which the map best matches itself turned by 360°/n (a search over a hemisphere
of directions on a Fourier-cropped copy, then a local refinement on the full map); for Dn the first
two-fold is the best direction perpendicular to it. The axes pass through the box centre ``L//2``.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..physics.fourier import fourier_crop
from ..physics.rotations import axis_angle_to_rotmat
from ..physics.symmetry import operators_in_frame, parse_group, symmetry_operators
from .align import resample_volume

__all__ = ["SymmetryFrame", "symmetry_frame"]


def _fibonacci_hemisphere(n: int) -> torch.Tensor:
    """``n`` near-uniform unit vectors with z ≥ 0 (float64)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1.0 - i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = torch.sqrt(1.0 - z * z)
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


def _frame_with_z(axis: torch.Tensor, spin: float = 0.0) -> torch.Tensor:
    """A rotation Q with Q e_z = ``axis`` (unit); ``spin`` turns it about that axis (radians)."""
    a = axis / axis.norm()
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=a.dtype) if abs(float(a[0])) < 0.9 else \
        torch.tensor([0.0, 1.0, 0.0], dtype=a.dtype)
    x = helper - (helper @ a) * a
    x = x / x.norm()
    y = torch.linalg.cross(a, x)
    q = torch.stack([x, y, a], 1)  # columns: images of e_x, e_y, e_z
    return axis_angle_to_rotmat(a * spin) @ q


@dataclasses.dataclass
class SymmetryFrame:
    """Where a map's symmetry axes lie.

    group       : the point group's name (``"C3"``).
    frame       : (3, 3) ``Q``: the map's operators are ``Q g Qᵀ`` (g of :func:`symmetry_operators`).
    operators   : (K, 3, 3) those operators, in the map's frame.
    correlation : the mean real-space correlation of the map with itself under each non-identity
                  operator (1 for an exactly symmetric map; a pseudo-symmetric one scores lower).
    """

    group: str
    frame: torch.Tensor
    operators: torch.Tensor
    correlation: float


def _correlation(volume: torch.Tensor, operators: torch.Tensor) -> float:
    """The map's mean real-space correlation with itself turned by each of ``operators`` (K, 3, 3)."""
    v = volume - volume.mean()
    scores = []
    for g in operators:
        w = resample_volume(volume, g, oversample=1)
        w = w - w.mean()
        scores.append(float((v * w).sum() / (v.norm() * w.norm()).clamp_min(1e-30)))
    return sum(scores) / max(1, len(scores))


def symmetry_frame(volume: torch.Tensor, name: str, directions: int = 1500, search_box: int = 32,
                   refine_box: int = 64) -> SymmetryFrame:
    """Find the axes of the point group ``name`` in a real (L, L, L) map (axes through the box centre).

    The n-fold axis is the direction (of ``directions`` over a hemisphere, then refined locally) about
    which the map best matches itself turned by 360°/n; for Dn the first two-fold is then the best
    direction perpendicular to it. The search runs on the map Fourier-cropped to ``search_box``
    (cheap), the refinement and the reported correlation on it cropped to at most ``refine_box``.
    For C1 the frame is the identity."""
    kind, n = parse_group(name)
    group = f"{kind}{n}"
    standard = symmetry_operators(group)
    v = torch.as_tensor(volume).to(torch.float64)
    if kind == "C" and n == 1:
        return SymmetryFrame(group=group, frame=torch.eye(3, dtype=torch.float64), operators=standard, correlation=1.0)
    small = fourier_crop(v, search_box, ndim=3) if v.shape[-1] > search_box else v
    v = fourier_crop(v, refine_box, ndim=3) if v.shape[-1] > refine_box else v
    n_fold = symmetry_operators(f"C{n}")[1:2]  # one generator is enough to place the axis

    def score_axis(map_, axis: torch.Tensor) -> float:
        return _correlation(map_, operators_in_frame(n_fold, _frame_with_z(axis)))

    candidates = _fibonacci_hemisphere(directions)
    scores = torch.tensor([score_axis(small, a) for a in candidates])
    axis = candidates[int(scores.argmax())]
    step = math.sqrt(4 * math.pi / (2 * directions)) / 2  # half the hemisphere grid's spacing (rad)
    best = score_axis(v, axis)
    while step > math.radians(0.25):  # local refinement on the refinement box: a shrinking cross of tilts
        moved = False
        q = _frame_with_z(axis)
        for tilt in ((step, 0.0), (-step, 0.0), (0.0, step), (0.0, -step)):
            trial = q @ torch.tensor([math.sin(tilt[0]), math.sin(tilt[1]), 1.0], dtype=torch.float64)
            trial = trial / trial.norm()
            s = score_axis(v, trial)
            if s > best:
                best, axis, moved = s, trial, True
                break
        if not moved:
            step /= 2
    spin = 0.0
    if kind == "D":  # the two-fold perpendicular to the n-fold axis: a turn of the frame about it
        flip = symmetry_operators("D1")[1:2]
        spins = torch.linspace(0, math.pi / n, 61)[:-1]
        spin_scores = [_correlation(v, operators_in_frame(flip, _frame_with_z(axis, float(s)))) for s in spins]
        spin = float(spins[int(torch.tensor(spin_scores).argmax())])
    frame = _frame_with_z(axis, spin)
    operators = operators_in_frame(standard, frame)
    return SymmetryFrame(group=group, frame=frame, operators=operators, correlation=_correlation(v, operators[1:]))
