"""Rotation conventions: RELION Euler ZYZ, quaternions, axis-angle, 6D, Haar sampling, geodesics."""

import math

import numpy as np
import pytest
import torch

from cryoace.physics import rotations as rot

F64 = torch.float64


def deg(*angles):
    return [torch.tensor(math.radians(a), dtype=F64) for a in angles]


def test_relion_matrix_known_values():
    # rot = 90°: RELION's Euler_angles2matrix gives the passive z-rotation [[0,1,0],[-1,0,0],[0,0,1]]
    r = rot.euler_relion_to_rotmat(*deg(90, 0, 0))
    assert torch.allclose(r, torch.tensor([[0, 1, 0], [-1, 0, 0], [0, 0, 1.]], dtype=F64), atol=1e-12)
    # tilt = 90°: A(0,2) = -cos(psi) sin(tilt), A(2,0) = sin(tilt) cos(rot)
    r = rot.euler_relion_to_rotmat(*deg(0, 90, 0))
    assert torch.allclose(r, torch.tensor([[0, 0, -1], [0, 1, 0], [1, 0, 0.]], dtype=F64), atol=1e-12)
    # a generic triple, element by element from RELION's euler.cpp formulas
    a, b, g = deg(30, 50, 70)
    ca, sa, cb, sb, cg, sg = (float(f(x)) for x in (a, b, g) for f in (torch.cos, torch.sin))
    expected = [[cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                [sb * ca, sb * sa, cb]]
    assert torch.allclose(rot.euler_relion_to_rotmat(a, b, g), torch.tensor(expected, dtype=F64), atol=1e-12)


def test_relion_matrix_is_transpose_of_intrinsic_zyz():
    """docs/conventions.md §1: the active intrinsic ZYZ matrix of (rot, tilt, psi) (ASPIRE's / roma's) is Rᵀ."""
    spatial = pytest.importorskip("scipy.spatial.transform")
    angles = np.array([[10., 20., 30.], [200., 100., 300.], [-45., 170., 5.]])
    ours = rot.euler_relion_to_rotmat(*torch.tensor(np.radians(angles), dtype=F64).unbind(-1))
    theirs = spatial.Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix()
    np.testing.assert_allclose(ours.transpose(-1, -2).numpy(), theirs, atol=1e-12)


def test_euler_round_trip_including_gimbal_lock():
    g = torch.Generator().manual_seed(1)
    r = rot.random_rotmat(2000, g, F64)
    special = torch.stack([rot.euler_relion_to_rotmat(*deg(a, t, p))
                           for a, t, p in [(0, 0, 40), (20, 0, 10), (0, 180, 30), (15, 180, 0)]])
    r = torch.cat([r, special])
    angles = rot.rotmat_to_euler_relion(r)
    assert (angles[:, 1] >= 0).all() and (angles[:, 1] <= math.pi + 1e-12).all()
    back = rot.euler_relion_to_rotmat(*angles.unbind(-1))
    assert torch.allclose(back, r, atol=1e-10)


def test_quaternion_and_axis_angle_round_trips():
    g = torch.Generator().manual_seed(2)
    r = rot.random_rotmat(1000, g, F64)
    assert torch.allclose(rot.quaternion_to_rotmat(rot.rotmat_to_quaternion(r)), r, atol=1e-12)
    assert torch.allclose(rot.axis_angle_to_rotmat(rot.rotmat_to_axis_angle(r)), r, atol=1e-10)
    # a rotation by 90° about z is active: it takes x to y
    rz = rot.axis_angle_to_rotmat(torch.tensor([0, 0, math.pi / 2], dtype=F64))
    assert torch.allclose(rz @ torch.tensor([1., 0, 0], dtype=F64), torch.tensor([0, 1., 0], dtype=F64))
    # identity has a finite gradient
    v = torch.zeros(3, dtype=F64, requires_grad=True)
    rot.axis_angle_to_rotmat(v).sum().backward()
    assert torch.isfinite(v.grad).all()


def test_6d_gives_proper_rotations():
    x = torch.randn(500, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    r = rot.rotmat_from_6d(x)
    eye = torch.eye(3, dtype=F64).expand_as(r)
    assert torch.allclose(r @ r.transpose(-1, -2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(500, dtype=F64), atol=1e-12)
    assert torch.allclose(rot.rotmat_from_6d(rot.rotmat_to_6d(r)), r, atol=1e-12)


def test_random_rotations_are_haar_uniform_and_reproducible():
    a = rot.random_rotmat(20000, torch.Generator().manual_seed(4), F64)
    b = rot.random_rotmat(20000, torch.Generator().manual_seed(4), F64)
    assert torch.equal(a, b)
    # Haar measure: E[R] = 0 and the rotation angle ω has density (1 − cos ω)/π, so E[cos ω] = −1/2
    assert a.mean(0).abs().max() < 0.02
    omega = rot.geodesic_angle(torch.eye(3, dtype=F64).expand_as(a), a)
    assert abs(torch.cos(omega).mean().item() + 0.5) < 0.01
    # viewing directions (third row) are uniform on the sphere: z component uniform in [-1, 1]
    hist = torch.histc(a[:, 2, 2], bins=10, min=-1, max=1) / a.shape[0]
    assert (hist - 0.1).abs().max() < 0.01


def test_geodesic_angle():
    r1 = rot.euler_relion_to_rotmat(*deg(10, 20, 30))
    r2 = rot.axis_angle_to_rotmat(torch.tensor([0, 0, math.radians(37)], dtype=F64)) @ r1
    assert math.isclose(rot.geodesic_angle(r1, r2).item(), math.radians(37), abs_tol=1e-10)
    flip = rot.axis_angle_to_rotmat(torch.tensor([math.pi, 0, 0], dtype=F64))
    assert math.isclose(rot.geodesic_angle(torch.eye(3, dtype=F64), flip).item(), math.pi, abs_tol=1e-7)
