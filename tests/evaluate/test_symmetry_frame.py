"""Symmetry in the evaluation: finding a map's axes, and pose errors to the nearest symmetry mate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cryoace.evaluate.align import MIRROR, align_rotations, resample_volume
from cryoace.evaluate.symmetry import symmetry_frame
from cryoace.io.mrc import read_volume
from cryoace.physics.rotations import axis_angle_to_rotmat, geodesic_angle, random_rotmat
from cryoace.physics.symmetry import operators_in_frame, symmetry_operators

from helpers import c3_map

DATA = Path(__file__).resolve().parents[1] / "data"


def _rotation(seed: int) -> torch.Tensor:
    return random_rotmat(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[0]


def _axis_error_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(a @ b)))))


def test_finds_the_axis_of_a_turned_c3_map():
    q = _rotation(1)
    volume = resample_volume(c3_map(40), q.T, oversample=1)  # v'(r) = v(qᵀ r): the axis is now q·z
    found = symmetry_frame(volume, "C3")
    assert _axis_error_deg(found.frame[:, 2], q[:, 2]) < 1.0
    assert found.correlation > 0.99
    assert symmetry_frame(volume, "C4").correlation < 0.9  # not a four-fold


def test_finds_both_axes_of_a_d2_map():
    """A D2 map (an asymmetric blob pattern summed over D2 in a turned frame): the found operators are
    the true ones."""
    q = _rotation(5)
    truth_ops = operators_in_frame(symmetry_operators("D2"), q)
    c = torch.arange(40, dtype=torch.float64) - 20
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    seed = sum(torch.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / 6.0)
               for px, py, pz in ((6, 2, 1), (3, 8, -4), (-2, 5, 9)))
    volume = sum(resample_volume(seed, g, oversample=1) for g in truth_ops)
    found = symmetry_frame(volume, "D2")
    distance = ((found.operators[:, None] - truth_ops[None]) ** 2).sum((-1, -2)).min(1).values
    assert float(torch.rad2deg(2 * torch.asin(distance.sqrt().max() / math.sqrt(8)))) < 2.0
    assert found.correlation > 0.98


def test_the_spike_is_nearly_c3_about_its_long_axis():
    """The 6VYB spike map (one receptor-binding domain up): C3 to a correlation of ~0.88 about the axis
    the model gives it (near z), and far from two-fold."""
    spike = torch.tensor(read_volume(DATA / "volumes/spike_6vyb_L64_3.0A.mrc").data)
    found = symmetry_frame(spike, "C3")
    assert 0.8 < found.correlation < 0.97
    assert _axis_error_deg(found.frame[:, 2], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)) < 10
    assert symmetry_frame(spike, "C2").correlation < 0.7


@pytest.mark.parametrize("flip", [False, True])
def test_poses_at_symmetry_mates_are_right(flip):
    """Particles posed at random symmetry mates of the truth (in another frame and hand, with 2° of
    noise): modulo the symmetry the errors are the noise; without it most look wrong."""
    n = 600
    truth = random_rotmat(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ops = operators_in_frame(symmetry_operators("C3"), _rotation(2))
    mates = truth @ ops[torch.randint(3, (n,), generator=torch.Generator().manual_seed(1))]
    noise = axis_angle_to_rotmat(torch.randn(n, 3, generator=torch.Generator().manual_seed(4),
                                             dtype=torch.float64) * math.radians(2.0) / math.sqrt(3))
    g = _rotation(6)
    predicted = mates @ noise @ g.T
    if flip:
        predicted = MIRROR @ predicted @ MIRROR
    plain = align_rotations(predicted, truth)
    assert float(torch.rad2deg(geodesic_angle(plain.aligned, truth)).median()) > 30
    aligned = align_rotations(predicted, truth, operators=ops)
    errors = torch.rad2deg(geodesic_angle(aligned.aligned, aligned.reference))
    assert aligned.flip_hand is flip and float(errors.median()) < 3.0 and float(errors.max()) < 8.0
    # the reference holds each particle's nearest true mate
    assert float(torch.rad2deg(geodesic_angle(aligned.reference[:, None], truth[:, None] @ ops[None]))
                 .min(1).values.max()) < 1e-6
