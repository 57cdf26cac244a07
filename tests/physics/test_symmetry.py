"""Point groups: the operators, and that a symmetric map gives the same image at symmetry mates."""

from __future__ import annotations

import pytest
import torch

from cryoace.physics.projector import project_real_space
from cryoace.physics.rotations import geodesic_angle, random_rotmat
from cryoace.physics.symmetry import nearest_mates, operators_in_frame, parse_group, symmetry_operators

from helpers import c3_map


@pytest.mark.parametrize("name, count", [("C1", 1), ("C3", 3), ("c7", 7), ("D2", 4), ("D5", 10)])
def test_groups_are_closed_sets_of_rotations(name, count):
    ops = symmetry_operators(name)
    assert ops.shape == (count, 3, 3) and torch.equal(ops[0], torch.eye(3, dtype=torch.float64))
    assert torch.allclose(ops @ ops.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(count, 3, 3),
                          atol=1e-12)
    assert torch.allclose(torch.linalg.det(ops), torch.ones(count, dtype=torch.float64))
    # closed under products: every g·h is (numerically) one of the operators
    products = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    distance = ((products[:, None] - ops[None]) ** 2).sum((-1, -2)).min(1).values
    assert float(distance.max()) < 1e-20


def test_standard_frame_is_relions():
    """Cn turns about z by 360°/n; Dn's first two-fold is x: (x, y, z) → (x, −y, −z)."""
    c4 = symmetry_operators("C4")
    assert torch.allclose(c4[1], torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64),
                          atol=1e-12)
    d2 = symmetry_operators("D2")
    assert torch.allclose(d2[2], torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)), atol=1e-12)


@pytest.mark.parametrize("bad", ["", "C0", "T", "O", "I1", "X3", "C-2", "D"])
def test_unknown_groups_are_refused(bad):
    with pytest.raises(ValueError, match="symmetry group"):
        parse_group(bad)


def test_symmetry_mates_give_the_same_image():
    """The projection convention (image = Σ_z v(Rᵀ r)) makes R and R·g the same image of a map with
    v(g r) = v(r) — and not g·R, which is another view."""
    volume = c3_map()
    ops = symmetry_operators("C3")
    r = random_rotmat(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    image = project_real_space(volume, r)
    for g in ops[1:]:  # equal up to the trilinear interpolation's error (~0.7 % of the peak)
        assert torch.allclose(project_real_space(volume, r @ g), image, atol=2e-2 * float(image.abs().max()))
        assert not torch.allclose(project_real_space(volume, g @ r), image, atol=0.3 * float(image.abs().max()))


def test_nearest_mates_and_frames():
    q = random_rotmat(1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)[0]
    ops = operators_in_frame(symmetry_operators("C3"), q)
    assert torch.allclose(ops[1] @ q[:, 2], q[:, 2], atol=1e-12)  # the axis moved with the frame
    truth = random_rotmat(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    which = torch.randint(3, (50,), generator=torch.Generator().manual_seed(4))
    posed = truth @ ops[which]
    mates = nearest_mates(posed, truth, ops)
    assert float(torch.rad2deg(geodesic_angle(mates, posed)).max()) < 1e-5
