"""cryoSPARC ``.cs`` particle files (numpy structured arrays) → :class:`~cryoace.io.particles.ParticleTable`.

Fields read (everything else is kept in ``table.extra``, vector fields split into ``name/0``, ``name/1``…,
byte strings decoded):

* ``blob/path`` (bytes) + ``blob/idx`` (0-based): the image. Paths are relative to the cryoSPARC
  project directory (``J12/extract/...``) and may carry a ``>`` prefix (imported files), which is
  stripped. Without ``datadir`` they are looked up next to the ``.cs`` file, then in its parent
  directory (the project directory when the ``.cs`` sits in ``Pxx/Jyy/``), then by basename next to
  the ``.cs``; with ``datadir`` as ``datadir/path`` then ``datadir/basename``.
* ``blob/psize_A`` (Å/px), ``blob/shape`` (box, px).
* ``ctf/df1_A``, ``ctf/df2_A`` (Å), ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``,
  ``ctf/amp_contrast``, ``ctf/phase_shift_rad``, ``ctf/bfactor``: the same quantities and signs as
  RELION's ``rlnDefocusU/V``, ``rlnDefocusAngle`` (in radians here), ``rlnVoltage``,
  ``rlnSphericalAberration``, ``rlnAmplitudeContrast``, ``rlnPhaseShift``, ``rlnCtfBfactor`` —
  pyem's ``csparc2star`` maps them one to one (only ``rad2deg`` on the angles), and the test pair
  ``empiar_10076_7.cs`` / ``.star`` agrees numerically (df_angle_rad 0.0921534 = 5.28°). No
  ``ctf/df1_A`` → ``has_ctf = False``.
* ``alignments3D/pose`` (rotation vector, radians) and ``alignments3D/shift`` (px).
  ``alignments2D`` / ``alignments_class_*`` are not 3D poses and are only kept in ``extra``.

**Rotation.** cryoSPARC's pose is the axis–angle vector ``v`` of a rotation whose (active, Rodrigues)
matrix ``exp([v]×)`` is the *transpose* of RELION's Euler matrix, so our ``R = exp([v]×)ᵀ``.
Evidence, two independent converters that agree:

1. cryoDRGN ``commands/parse_pose_csparc.py`` takes ``lie_tools.expmap(pose)`` (the standard
   Rodrigues matrix ``I + sin θ K + (1 − cos θ) K²``) and then *transposes* it ("Transposing rotation
   matrix"), storing the result in the same pose pickle that ``parse_pose_star`` fills with
   ``utils.R_from_relion(rot, tilt, psi)``. ``R_from_relion`` builds ``Rz(psi)·Ry(tilt)·Rz(rot)`` from
   active z-rotations and flips the signs of the (0,1), (1,0), (1,2), (2,1) entries, i.e.
   ``D·M·D`` with ``D = diag(1, −1, 1)``, which turns each active z-rotation into RELION's passive one:
   it is exactly RELION's ``Euler_angles2matrix`` (our ``R``). Hence ``R = expmap(pose)ᵀ``.
2. pyem ``metadata/cryosparc2.py`` converts ``alignments3D/pose`` with
   ``rot2euler(expmap(pose))``, where pyem's ``geom.expmap`` returns the *transposed* Rodrigues matrix
   and ``rot2euler`` is RELION's ``Euler_matrix2angles``. Same conclusion.

**Shift.** ``alignments3D/shift`` is in pixels with the *same sign* as RELION's ``rlnOriginX/Y``:
pyem copies it straight into ``rlnOriginX/Y`` (no sign change), and cryoDRGN divides it by the box
exactly as it divides ``rlnOriginX/Y`` from a star file. We convert to Å with ``alignments3D/psize_A``
(the pixel size the alignment was done at) when present and positive, else ``blob/psize_A``. (Old
cryoSPARC heterogeneous refinements stored shifts at half size — cryoDRGN's ``--hetrefine`` doubles
them; that is not detected here.)

``blob/sign`` (−1 for the usual dark-particle data) is kept in ``extra``; it is not applied — use
``ParticleDataset(invert_contrast=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import CryoaceInputError
from ..physics.rotations import axis_angle_to_rotmat
from ..types import CTFParams, Pose
from .table import ParticleTable, absolute_as_written, no_ctf_params, particle_number, resolve_image_paths

__all__ = ["read_cs", "write_cs", "OWNED_FIELDS"]

#: Fields represented by ParticleTable fields (not kept in ``extra``).
OWNED_FIELDS = frozenset({
    "blob/path", "blob/idx", "blob/psize_A", "blob/shape", "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad",
    "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast", "ctf/phase_shift_rad", "ctf/bfactor",
    "alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A",
})


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CryoaceInputError("file not found", path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # ValueError, OSError, EOFError, UnpicklingError...
        msg = " ".join(str(exc).split())[:200]
        raise CryoaceInputError(f"not a readable cryoSPARC .cs file ({msg})", path) from None
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise CryoaceInputError("not a cryoSPARC .cs file (expected a 1-D numpy structured array)", path)
    if len(data) == 0:
        raise CryoaceInputError("the .cs file holds no particles", path)
    return data


def _field(data: np.ndarray, name: str, path: Path, width: int | None = None) -> np.ndarray:
    if data.dtype[name].base.kind not in "biuf":  # e.g. text where numbers belong
        raise CryoaceInputError(f"field {name} holds {data.dtype[name]} values, expected numbers", path)
    values = np.array(data[name], dtype=np.float64)
    if width is not None and (values.ndim != 2 or values.shape[1] != width):
        raise CryoaceInputError(f"field {name} has shape {values.shape[1:]}, expected ({width},)", path)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CryoaceInputError(f"field {name} is not finite at {particle_number(i)}", path)
    return values


def _extra(data: np.ndarray) -> pd.DataFrame:
    columns: dict[str, np.ndarray] = {}
    for name in data.dtype.names:
        if name in OWNED_FIELDS:
            continue
        values = data[name]
        if values.dtype.kind == "S":
            columns[name] = np.char.decode(values, "utf-8", errors="replace").astype(object)
        elif values.ndim > 1:
            flat = values.reshape(len(values), -1)
            for k in range(flat.shape[1]):
                columns[f"{name}/{k}"] = np.array(flat[:, k])
        else:
            columns[name] = np.array(values)
    return pd.DataFrame(columns, index=pd.RangeIndex(len(data)))


def read_cs(path: str | os.PathLike, datadir: str | os.PathLike | None = None,
            pixel_size: float | None = None,
            stack_map: Mapping[str, str | os.PathLike] | None = None) -> ParticleTable:
    """Read a cryoSPARC particle ``.cs`` file (see the module docstring for fields and conventions).

    datadir    : directory holding the stacks (``datadir/path``, then ``datadir/basename``).
    pixel_size : Å/px replacing ``blob/psize_A`` (needed when the file has none).
    stack_map  : {stack path or basename: replacement path}, applied after resolution.
    """
    path = Path(os.path.abspath(path))
    data = _load(path)
    names = set(data.dtype.names)
    n = len(data)

    if pixel_size is not None:
        ps = np.full(n, float(pixel_size))
    elif "blob/psize_A" in names:
        ps = _field(data, "blob/psize_A", path)
    else:
        raise CryoaceInputError("no pixel size: field blob/psize_A is missing (give the pixel size "
                                "explicitly)", path)
    bad = ~(np.isfinite(ps) & (ps > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CryoaceInputError(f"pixel size is zero or negative ({ps[i]:g} Å at {particle_number(i)}); "
                                "give the pixel size explicitly", path)

    image_paths = image_indices = image_size = None
    absolute = frozenset()
    if "blob/path" in names:
        if "blob/idx" not in names:
            raise CryoaceInputError("field blob/idx is missing (needed with blob/path)", path)
        raw = data["blob/path"]
        if raw.dtype.kind not in "SU" or raw.ndim != 1:
            raise CryoaceInputError(f"field blob/path holds {data.dtype['blob/path']} values, expected the "
                                    "stack paths (text)", path)
        if data.dtype["blob/idx"].kind not in "iu" or data["blob/idx"].ndim != 1:
            raise CryoaceInputError(f"field blob/idx holds {data.dtype['blob/idx']} values, expected image "
                                    "indices (integers)", path)
        raw = np.char.decode(raw, "utf-8", errors="replace") if raw.dtype.kind == "S" else raw.astype(str)
        raw = np.char.lstrip(np.char.strip(raw), ">")
        image_paths = resolve_image_paths(raw.astype(object), path.parent, datadir,
                                          extra_bases=(path.parent.parent,))
        first = np.unique(raw, return_index=True)[1]  # one row per distinct name
        absolute = absolute_as_written(raw[first], image_paths[first])
        image_indices = np.array(data["blob/idx"], dtype=np.int64)
    if "blob/shape" in names:
        shape = _field(data, "blob/shape", path).astype(np.int64).reshape(n, -1)
        image_size = shape[:, -1]

    if "ctf/df1_A" in names:
        for name in ("ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast"):
            if name not in names:
                raise CryoaceInputError(f"field {name} is missing (needed with ctf/df1_A)", path)

        def get(name, default):
            return _field(data, name, path) if name in names else np.full(n, default)

        df1 = _field(data, "ctf/df1_A", path)
        ctf = CTFParams.create(
            defocus_u=df1, defocus_v=get("ctf/df2_A", 0.0) if "ctf/df2_A" in names else df1,
            defocus_angle=get("ctf/df_angle_rad", 0.0), voltage_kv=_field(data, "ctf/accel_kv", path),
            cs_mm=_field(data, "ctf/cs_mm", path), amplitude_contrast=_field(data, "ctf/amp_contrast", path),
            phase_shift=get("ctf/phase_shift_rad", 0.0), bfactor=get("ctf/bfactor", 0.0),
            dtype=torch.float64)
        has_ctf = True
    else:
        ctf = no_ctf_params(n, _field(data, "ctf/accel_kv", path) if "ctf/accel_kv" in names else 300.0)
        has_ctf = False

    pose = None
    if "alignments3D/pose" in names and "alignments3D/shift" in names:
        rotvec = torch.from_numpy(_field(data, "alignments3D/pose", path, width=3))
        rotmat = axis_angle_to_rotmat(rotvec).transpose(-1, -2).contiguous()
        shift_px = _field(data, "alignments3D/shift", path, width=2)
        align_ps = ps
        if "alignments3D/psize_A" in names:
            aps = np.array(data["alignments3D/psize_A"], dtype=np.float64)
            align_ps = np.where(np.isfinite(aps) & (aps > 0), aps, ps)
        pose = Pose(rotmat=rotmat.to(torch.float64),
                    shift_angst=torch.from_numpy(shift_px * align_ps[:, None]))

    table = ParticleTable(source=path, image_paths=image_paths, image_indices=image_indices,
                          pixel_size=ps, ctf=ctf, has_ctf=has_ctf, pose=pose, image_size=image_size,
                          optics=None, extra=_extra(data), absolute_stacks=absolute)
    return table.remap_stacks(stack_map or {})


def write_cs(path: str | os.PathLike, table: ParticleTable, pose: Pose | None = None) -> None:
    """Write ``table`` (with ``pose`` instead of its own poses, if given) as a cryoSPARC particle ``.cs``
    file, atomically, with cryoSPARC's field types (float32 values, so ~1e-7 relative rounding):

    ``uid`` (the table's ``uid`` column if it has one, else 0..N−1), ``blob/path`` (relative to the
    file's folder, as in star files, absolute only where the file read had absolute names), ``blob/idx``
    (0-based), ``blob/shape``, ``blob/psize_A``; ``ctf/*`` when the table has a CTF; and with poses
    ``alignments3D/pose`` = rotation vector of ``Rᵀ`` (module docstring), ``alignments3D/shift`` (px
    at ``blob/psize_A``, RELION's sign) and ``alignments3D/psize_A``. Other columns are not written.
    """
    from ..physics.rotations import rotmat_to_axis_angle
    from .atomic import atomic_path
    from .starwrite import relative_stack_names

    path = Path(path)
    n = len(table)
    pose = table.pose if pose is None else pose
    fields: list[tuple[str, np.ndarray]] = []
    uid = table.extra_column("uid")
    fields.append(("uid", np.asarray(uid if uid is not None else np.arange(n), dtype="<u8")))
    if table.image_paths is not None:
        names = relative_stack_names([str(p) for p in table.image_paths.categories], path.parent,
                                table.absolute_stacks)
        encoded = np.char.encode(names.astype(str), "utf-8")
        fields.append(("blob/path", encoded[table.image_paths.codes]))
        fields.append(("blob/idx", np.asarray(table.image_indices, dtype="<u4")))
    if table.image_size is not None:
        fields.append(("blob/shape", np.repeat(np.asarray(table.image_size, dtype="<u4")[:, None], 2, axis=1)))
    ps = np.asarray(table.pixel_size, dtype=np.float64)
    fields.append(("blob/psize_A", ps.astype("<f4")))
    if table.has_ctf:
        ctf = table.ctf
        for name, values in (("ctf/accel_kv", ctf.voltage_kv), ("ctf/cs_mm", ctf.cs_mm),
                             ("ctf/amp_contrast", ctf.amplitude_contrast), ("ctf/df1_A", ctf.defocus_u),
                             ("ctf/df2_A", ctf.defocus_v), ("ctf/df_angle_rad", ctf.defocus_angle),
                             ("ctf/phase_shift_rad", ctf.phase_shift), ("ctf/bfactor", ctf.bfactor)):
            fields.append((name, values.double().numpy().astype("<f4")))
    if pose is not None:
        rotvec = rotmat_to_axis_angle(pose.rotmat.detach().cpu().double().transpose(-1, -2))
        fields.append(("alignments3D/pose", rotvec.numpy().astype("<f4")))
        shift_px = pose.shift_angst.detach().cpu().double().numpy() / ps[:, None]
        fields.append(("alignments3D/shift", shift_px.astype("<f4")))
        fields.append(("alignments3D/psize_A", ps.astype("<f4")))
    dtype = np.dtype([(name, values.dtype, values.shape[1:]) for name, values in fields])
    data = np.empty(n, dtype=dtype)
    for name, values in fields:
        data[name] = values
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.save would add ".npy" to a name
            np.save(fh, data, allow_pickle=False)
