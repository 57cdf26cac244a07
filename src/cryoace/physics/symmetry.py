"""Point-group symmetry: the operators of C\\ :sub:`n` and D\\ :sub:`n`, and where a map's axes lie.

A map ``v`` is symmetric under a rotation ``g`` (acting on (x, y, z) about the box centre ``L//2``)
when ``v(g r) = v(r)``. With the projection convention of docs/conventions.md
(``image(x, y) = Σ_z v(Rᵀ (x, y, z))``), ``v(Rᵀ r) = v(g Rᵀ r) = v((R gᵀ)ᵀ r)``: the poses ``R`` and
``R g`` (g over the group, which holds every ``gᵀ``) give the same image. So a particle's pose is
only determined up to its **symmetry mates** ``{R g}``, and pose errors of a symmetric (or nearly
symmetric) molecule are measured to the nearest mate (:mod:`cryoace.evaluate.align`).

Standard frame, as RELION's: the n-fold axis of C\\ :sub:`n` and D\\ :sub:`n` is z; D\\ :sub:`n`'s
first two-fold axis is x. A map built from an atomic model has its axes wherever the model put them;
:func:`cryoace.evaluate.symmetry.symmetry_frame` finds the rotation ``Q`` that carries the standard
frame onto the map's, whose operators are then ``Q g Qᵀ`` (:func:`operators_in_frame`). The axes
pass through the box centre.
"""

from __future__ import annotations

import math
import re

import torch

from .rotations import axis_angle_to_rotmat

__all__ = ["symmetry_operators", "operators_in_frame", "nearest_mates", "parse_group"]

_GROUP = re.compile(r"^([CD])([1-9][0-9]*)$")


def parse_group(name: str) -> tuple[str, int]:
    """(``"C"`` or ``"D"``, n) of a group name such as ``"c3"``; ValueError for anything else."""
    match = _GROUP.match(str(name).strip().upper())
    if match is None:
        raise ValueError(f"unknown symmetry group {name!r}: expected Cn or Dn (C1, C3, D2, D7, ...); "
                         "T, O and I are not supported")
    return match.group(1), int(match.group(2))


def _about(axis: tuple[float, float, float], angle: float, dtype: torch.dtype) -> torch.Tensor:
    v = torch.tensor(axis, dtype=torch.float64)
    return axis_angle_to_rotmat(v / v.norm() * angle).to(dtype)


def symmetry_operators(name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The rotations (K, 3, 3) of the point group ``name`` (``"C1"``, ``"C3"``, ``"D2"``, …; case
    ignored) in the standard frame (module docstring), the identity first. K = n for Cn, 2n for Dn."""
    kind, n = parse_group(name)
    turns = [_about((0.0, 0.0, 1.0), 2 * math.pi * k / n, dtype) for k in range(n)]
    if kind == "D":
        flip = _about((1.0, 0.0, 0.0), math.pi, dtype)
        turns += [turn @ flip for turn in turns]
    ops = torch.stack(turns)
    ops[0] = torch.eye(3, dtype=dtype)  # exactly
    return ops


def operators_in_frame(operators: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """``Q g Qᵀ`` for each operator ``g`` (K, 3, 3) of the standard frame and ``frame`` = ``Q`` (3, 3)."""
    q = torch.as_tensor(frame, dtype=operators.dtype, device=operators.device)
    return q @ operators @ q.T


def nearest_mates(rotmat: torch.Tensor, reference: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """For each (N, 3, 3) ``reference[i]``, the symmetry mate ``reference[i] g`` (over the K
    ``operators``) nearest to ``rotmat[i]`` (chordal distance): (N, 3, 3)."""
    mates = reference[:, None] @ operators.to(reference)[None]  # (N, K, 3, 3)
    distance = ((mates - rotmat[:, None].to(reference)) ** 2).sum((-1, -2))
    best = distance.argmin(1)
    return mates[torch.arange(len(reference), device=reference.device), best]
