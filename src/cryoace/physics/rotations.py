"""Rotation representations ↔ matrices (batched, differentiable, any float dtype/device).

The matrix ``R`` of a pose equals RELION's ``Euler_angles2matrix(rot, tilt, psi)``: it maps volume
coordinates to image coordinates (docs/conventions.md §1). Angles are radians here; degrees live only in ``io``.
"""

from __future__ import annotations

import torch


def rotmat_from_6d(x: torch.Tensor) -> torch.Tensor:
    """6D representation (..., 6) → rotation matrix (..., 3, 3) by Gram–Schmidt (Zhou et al. 2019).

    The two 3-vectors become the first two *rows* of R after orthonormalisation; the third row is
    their cross product, so det R = +1 always.
    """
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)


def rotmat_to_6d(rotmat: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rotmat_from_6d`: the first two rows, concatenated (..., 6)."""
    return torch.cat([rotmat[..., 0, :], rotmat[..., 1, :]], dim=-1)


def _rot_z(angle: torch.Tensor) -> torch.Tensor:
    """RELION's (passive) rotation about z: [[c, s, 0], [-s, c, 0], [0, 0, 1]]."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([c, s, z], -1), torch.stack([-s, c, z], -1),
                        torch.stack([z, z, o], -1)], -2)


def _rot_y(angle: torch.Tensor) -> torch.Tensor:
    """RELION's (passive) rotation about y: [[c, 0, -s], [0, 1, 0], [s, 0, c]]."""
    c, s = torch.cos(angle), torch.sin(angle)
    o, z = torch.ones_like(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([c, z, -s], -1), torch.stack([z, o, z], -1),
                        torch.stack([s, z, c], -1)], -2)


def euler_relion_to_rotmat(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION ZYZ Euler angles (radians) → R = Rz(psi) · Ry(tilt) · Rz(rot), as ``Euler_angles2matrix``."""
    rot, tilt, psi = torch.broadcast_tensors(torch.as_tensor(rot), torch.as_tensor(tilt),
                                             torch.as_tensor(psi))
    return _rot_z(psi) @ _rot_y(tilt) @ _rot_z(rot)


def rotmat_to_euler_relion(rotmat: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """R (..., 3, 3) → RELION Euler angles (..., 3) = (rot, tilt, psi) in radians, tilt in [0, π].

    Follows RELION's ``Euler_matrix2angles``; at tilt 0 or π (gimbal lock) rot is set to 0.
    """
    a = rotmat
    sin_tilt = torch.sqrt(a[..., 0, 2] ** 2 + a[..., 1, 2] ** 2)
    regular = sin_tilt > eps
    tilt = torch.atan2(sin_tilt, a[..., 2, 2])
    rot = torch.where(regular, torch.atan2(a[..., 2, 1], a[..., 2, 0]), torch.zeros_like(tilt))
    psi_regular = torch.atan2(a[..., 1, 2], -a[..., 0, 2])
    up = a[..., 2, 2] > 0
    psi_lock = torch.where(up, torch.atan2(-a[..., 1, 0], a[..., 0, 0]),
                           torch.atan2(a[..., 1, 0], -a[..., 0, 0]))
    psi = torch.where(regular, psi_regular, psi_lock)
    tilt = torch.where(regular, tilt, torch.where(up, torch.zeros_like(tilt), torch.full_like(tilt, torch.pi)))
    return torch.stack([rot, tilt, psi], dim=-1)


def quaternion_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternion (..., 4) as (w, x, y, z) → the matrix of the rotation v ↦ q v q* (..., 3, 3)."""
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rotmat_to_quaternion(rotmat: torch.Tensor) -> torch.Tensor:
    """Rotation matrix (..., 3, 3) → unit quaternion (w, x, y, z) with w ≥ 0 (numerically stable branch)."""
    m = rotmat
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate solutions; use the one with the largest denominator for each matrix.
    cands = torch.stack([
        torch.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                     m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0],
                     m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22,
                     m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m00 - m11 + m22], -1),
    ], -2)  # (..., 4 candidates, 4)
    diag = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                        1 - m00 - m11 + m22], -1)
    best = diag.argmax(-1, keepdim=True)
    q = torch.gather(cands, -2, best[..., None].expand(*best.shape[:-1], 1, 4)).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def axis_angle_to_rotmat(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation vector (..., 3) (axis × angle in radians) → matrix by Rodrigues' formula (active)."""
    angle = torch.linalg.vector_norm(rotvec, dim=-1, keepdim=True)
    half = angle / 2
    # sin(θ/2)/θ → 1/2 as θ → 0; the Taylor branch keeps gradients finite at the identity.
    small = angle < 1e-6
    scale = torch.where(small, 0.5 - angle ** 2 / 48, torch.sin(half) / torch.where(small, 1.0, angle))
    q = torch.cat([torch.cos(half), rotvec * scale], dim=-1)
    return quaternion_to_rotmat(q)


def rotmat_to_axis_angle(rotmat: torch.Tensor) -> torch.Tensor:
    """Rotation matrix (..., 3, 3) → rotation vector (..., 3), angle in [0, π]."""
    q = rotmat_to_quaternion(rotmat)
    w, xyz = q[..., :1], q[..., 1:]
    norm = torch.linalg.vector_norm(xyz, dim=-1, keepdim=True)
    angle = 2 * torch.atan2(norm, w)
    scale = torch.where(norm < 1e-12, 2.0 / w.clamp_min(1e-12), angle / norm.clamp_min(1e-12))
    return xyz * scale


def random_rotmat(n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """``n`` Haar-uniform random rotations (n, 3, 3): normalised Gaussian quaternions.

    Pass an explicit ``generator`` (on ``device``) for reproducibility.
    """
    q = torch.randn(n, 4, generator=generator, dtype=dtype, device=device)
    return quaternion_to_rotmat(q)


def geodesic_angle(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Angle (radians, [0, π]) of the relative rotation r1ᵀ r2, batched over leading dims."""
    rel = r1.transpose(-1, -2) @ r2
    trace = rel.diagonal(dim1=-2, dim2=-1).sum(-1)
    # atan2 form is accurate near 0 and π where arccos loses precision.
    skew = torch.stack([rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0],
                        rel[..., 1, 0] - rel[..., 0, 1]], -1)
    return torch.atan2(torch.linalg.vector_norm(skew, dim=-1) / 2, (trace - 1) / 2)
