"""cryoDRGN pickles (poses, CTF) + an image stack → :class:`~cryoace.io.particles.ParticleTable`.

Formats (as written by cryoDRGN's ``parse_pose_star`` / ``parse_pose_csparc`` / ``parse_ctf_star``):

* **poses pickle**: a tuple ``(rots, trans)`` with ``rots`` (N, 3, 3) and ``trans`` (N, 2) a fraction
  of the box; older/synthetic files (e.g. cryoDRGN's ``hand_rot.pkl``) hold only ``rots`` — zero
  shifts then.
* **CTF pickle**: (N, 9) float array ``[D, Apix, dfU (Å), dfV (Å), dfang (deg), kV, Cs (mm), w,
  phase shift (deg)]``; no B-factor (0).

**Rotation: cryoDRGN's matrix is our R** (RELION's ``Euler_angles2matrix``), not its transpose.
cryoDRGN's ``parse_pose_star`` stores ``utils.R_from_relion(rot, tilt, psi)``, which is
``D·Rz(psi)·Ry(tilt)·Rz(rot)·D`` with active z-rotations, RELION's y-rotation and
``D = diag(1, −1, 1)`` (the sign flips of the (0,1), (1,0), (1,2), (2,1) entries); conjugating an
active z-rotation by ``D`` gives RELION's passive one, so the product is exactly
``Euler_angles2matrix``. cryoDRGN then samples the volume at ``coords @ rot`` (row vectors), i.e.
``Rᵀ·k`` — the same central-slice convention as docs/conventions.md §1. Checked numerically on
``hand.mrcs`` + ``hand_rot.pkl`` with common lines (tests/io/test_cryodrgn.py): line projections of
image pairs agree with correlation ≈ 0.99 using R and ≈ 0.83 using Rᵀ.

**Shift: cryoDRGN's trans = +origin / D**: ``parse_pose_star`` copies ``rlnOriginX/Y`` (px, or
``rlnOriginX/YAngst`` / Apix) without a sign change and divides by the box ``D``; so
``shift_angst = trans · D · pixel_size``.

Pickles can run code when loaded: only read files you trust.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import CryoaceInputError
from ..types import CTFParams, Pose
from .atomic import atomic_path
from .mrc import open_mrc
from .table import ParticleTable, no_ctf_params

__all__ = ["read_cryodrgn_poses", "read_cryodrgn_ctf", "write_cryodrgn_poses", "write_cryodrgn_ctf",
           "table_from_stack", "read_index_file"]


def _load_pickle(path: Path):
    if not path.is_file():
        raise CryoaceInputError("file not found", path)
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise CryoaceInputError(f"not a readable pickle ({type(exc).__name__}: {msg})", path) from None


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def read_cryodrgn_poses(path: str | os.PathLike, box_size: int, pixel_size: float | np.ndarray,
                        count: int | None = None) -> Pose:
    """cryoDRGN poses pickle → Pose (float64; rotmat = RELION's R, shift_angst = trans·box·pixel_size).

    box_size   : D, the box (px) the fractional shifts refer to (the stack's box).
    pixel_size : Å/px, scalar or (N,).
    count      : the number of images the poses must describe (checked), if known.
    """
    path = Path(path)
    obj = _load_pickle(path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        rots, trans = _as_array(obj[0]), _as_array(obj[1])
    elif isinstance(obj, (tuple, list)) and len(obj) == 1:
        rots, trans = _as_array(obj[0]), None
    else:
        try:
            rots, trans = _as_array(obj), None
        except (TypeError, ValueError):
            raise CryoaceInputError(f"expected (rotations, translations), got {type(obj).__name__}",
                                    path) from None
    if rots.ndim != 3 or rots.shape[1:] != (3, 3):
        raise CryoaceInputError(f"rotations must have shape (N, 3, 3), got {rots.shape}", path)
    n = rots.shape[0]
    if count is not None and n != count:
        raise CryoaceInputError(f"the poses pickle has {n} rows but the stack holds {count} images", path)
    ps = np.asarray(pixel_size, dtype=np.float64)
    if ps.ndim and ps.shape != (n,):
        raise CryoaceInputError(f"the poses pickle has {n} rows but {ps.shape[0]} pixel sizes were given", path)
    if trans is None:
        trans = np.zeros((n, 2))
    if trans.shape != (n, 2):
        raise CryoaceInputError(f"translations must have shape ({n}, 2), got {trans.shape}", path)
    if not (np.isfinite(rots).all() and np.isfinite(trans).all()):
        raise CryoaceInputError("poses contain NaN or Inf", path)
    det = np.linalg.det(rots)
    if not np.allclose(det, 1.0, atol=1e-3):
        i = int(np.argmax(np.abs(det - 1)))
        raise CryoaceInputError(f"rotation {i} is not a rotation matrix (det {det[i]:.4f})", path)
    ps = np.broadcast_to(ps, (n,))
    shift = trans * float(box_size) * ps[:, None]
    return Pose(rotmat=torch.from_numpy(np.ascontiguousarray(rots)),
                shift_angst=torch.from_numpy(np.ascontiguousarray(shift)))


def read_cryodrgn_ctf(path: str | os.PathLike) -> tuple[CTFParams, np.ndarray, np.ndarray]:
    """cryoDRGN CTF pickle (N, 9) → (CTFParams float64, box sizes D (N,), pixel sizes Apix (N,))."""
    path = Path(path)
    arr = _as_array(_load_pickle(path))
    if arr.ndim != 2 or arr.shape[1] != 9:
        raise CryoaceInputError(f"CTF array must have shape (N, 9), got {arr.shape}", path)
    if not np.isfinite(arr).all():
        raise CryoaceInputError("CTF parameters contain NaN or Inf", path)
    ctf = CTFParams.create(defocus_u=arr[:, 2], defocus_v=arr[:, 3], defocus_angle=np.deg2rad(arr[:, 4]),
                           voltage_kv=arr[:, 5], cs_mm=arr[:, 6], amplitude_contrast=arr[:, 7],
                           phase_shift=np.deg2rad(arr[:, 8]), bfactor=0.0, dtype=torch.float64)
    return ctf, arr[:, 0].astype(np.int64), arr[:, 1].copy()


def write_cryodrgn_poses(path: str | os.PathLike, pose: Pose, box_size: int,
                         pixel_size: float | np.ndarray) -> None:
    """Write a cryoDRGN poses pickle ``(rots float32 (N,3,3), trans float32 (N,2) = shift/(D·Apix))``."""
    rots = pose.rotmat.detach().cpu().double().numpy()
    ps = np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (rots.shape[0],))
    trans = pose.shift_angst.detach().cpu().double().numpy() / (float(box_size) * ps[:, None])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump((rots.astype(np.float32), trans.astype(np.float32)), fh)


def write_cryodrgn_ctf(path: str | os.PathLike, ctf: CTFParams, box_size: int | np.ndarray,
                       pixel_size: float | np.ndarray) -> None:
    """Write a cryoDRGN CTF pickle (N, 9) float32 (B-factors are not representable and are dropped)."""
    n = int(ctf.defocus_u.shape[0])
    cols = [np.broadcast_to(np.asarray(box_size, dtype=np.float64), (n,)),
            np.broadcast_to(np.asarray(pixel_size, dtype=np.float64), (n,)),
            ctf.defocus_u.double().numpy(), ctf.defocus_v.double().numpy(),
            np.rad2deg(ctf.defocus_angle.double().numpy()), ctf.voltage_kv.double().numpy(),
            ctf.cs_mm.double().numpy(), ctf.amplitude_contrast.double().numpy(),
            np.rad2deg(ctf.phase_shift.double().numpy())]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(np.stack(cols, axis=1).astype(np.float32), fh)


def table_from_stack(stack_path: str | os.PathLike, poses: str | os.PathLike | None = None,
                     ctf: str | os.PathLike | None = None,
                     pixel_size: float | None = None) -> ParticleTable:
    """A particle table for every image of an ``.mrcs`` stack, with optional cryoDRGN pickles.

    Pixel size: ``pixel_size`` if given, else the CTF pickle's Apix (rescaled by D_ctf / box when the
    pickle describes a different box, as cryoDRGN does for downsampled stacks), else the MRC header's
    voxel size if positive, else an error. Counts of poses / CTF rows must match the stack.
    """
    stack_path = Path(os.path.abspath(stack_path))
    mrc = open_mrc(stack_path, mmap=True)
    shape = mrc.data.shape
    if mrc.data.ndim == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise CryoaceInputError(f"expected an image stack, got an array of shape {shape}", stack_path)
    n, box = int(shape[0]), int(shape[-1])
    header_voxel = float(mrc.voxel_size)
    del mrc

    ctf_params, has_ctf = no_ctf_params(n), False
    ps = None if pixel_size is None else np.full(n, float(pixel_size))
    if ctf is not None:
        ctf_params, d_ctf, apix = read_cryodrgn_ctf(ctf)
        if len(apix) != n:
            raise CryoaceInputError(f"the CTF pickle has {len(apix)} rows but the stack {stack_path} "
                                    f"holds {n} images", ctf)
        has_ctf = True
        if ps is None:
            ps = apix * d_ctf / box
    if ps is None:
        if header_voxel > 0:
            ps = np.full(n, header_voxel)
        else:
            raise CryoaceInputError("no pixel size: the MRC header has none and no CTF pickle was given "
                                    "(give the pixel size explicitly)", stack_path)
    pose = None
    if poses is not None:
        pose = read_cryodrgn_poses(poses, box, ps, count=n)
    return ParticleTable(source=stack_path, image_paths=np.full(n, str(stack_path), dtype=object),
                         image_indices=np.arange(n, dtype=np.int64), pixel_size=ps, ctf=ctf_params,
                         has_ctf=has_ctf, pose=pose, image_size=np.full(n, box, dtype=np.int64))



def read_index_file(path: str | os.PathLike, n_particles: int) -> np.ndarray:
    """A cryoDRGN index file (``--ind``) → int64 0-based particle rows, in the file's order.

    ``.pkl`` / ``.pickle``: a pickled integer array (what cryoDRGN's ``filter`` / ``select_random``
    write); anything else: a text file of integers separated by white space or commas (``#`` starts a
    comment). Every index must lie in ``[0, n_particles)``.
    """
    path = Path(path)
    if path.suffix.lower() in (".pkl", ".pickle"):
        values = _load_pickle(path)
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        try:
            values = np.asarray(values)
        except (TypeError, ValueError):
            raise CryoaceInputError(f"expected an array of particle indices, got {type(values).__name__}",
                                    path) from None
    else:
        if not path.is_file():
            raise CryoaceInputError("file not found", path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CryoaceInputError(f"not a readable text file of particle indices ({type(exc).__name__})",
                                    path) from None
        words = " ".join(line.split("#", 1)[0] for line in text.splitlines()).replace(",", " ").split()
        try:
            values = np.array([int(w) for w in words], dtype=np.int64)
        except ValueError:
            bad = next(w for w in words if not w.lstrip("+-").isdigit())
            raise CryoaceInputError(f"{bad!r} is not a particle index (expected integers)", path) from None
    if values.ndim != 1 or values.dtype.kind not in "iub":
        if values.ndim == 1 and values.dtype.kind == "f" and np.all(np.isfinite(values)) \
                and np.all(values == np.round(values)):
            values = values.astype(np.int64)  # integers stored as floats
        else:
            raise CryoaceInputError(f"expected a 1-D array of integer particle indices, got dtype "
                                    f"{values.dtype} and shape {values.shape}", path)
    rows = values.astype(np.int64)
    if len(rows) == 0:
        raise CryoaceInputError("the index file selects no particles", path)
    bad = (rows < 0) | (rows >= n_particles)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CryoaceInputError(f"index {rows[i]} (entry {i + 1} of {len(rows)}) is out of range: the particle "
                                f"file has {n_particles} particles, indices 0 to {n_particles - 1} "
                                f"({int(bad.sum())} of the {len(rows)} are)", path)
    return rows
