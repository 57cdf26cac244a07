"""Writing a :class:`~cryoace.io.table.ParticleTable` as a RELION 3.1 star file, streamed.

:func:`write_star` writes an optics table plus a particle table with ``rlnImageName``,
``rlnOpticsGroup``, ``rlnAngleRot/Tilt/Psi`` (deg), ``rlnOriginX/YAngst`` (Å), ``rlnDefocusU/V`` (Å),
``rlnDefocusAngle`` and ``rlnPhaseShift`` (deg), ``rlnCtfBfactor`` (Å²), plus every extra column,
atomically (a temporary file renamed at the end). Rows are written chunk by chunk; extra columns that
are still in the source star file are copied from it as their text, so memory stays flat in the number
of particles. The original optics table is reused when it still describes every particle, otherwise
one optics group per distinct (pixel size, voltage, Cs, w, box) is made. Image paths are written
relative to the output file's directory when they lie under it, else absolute.

Numbers: values the table stores in float32 are written with the shortest text that reads back to the
same float32; angles stored in radians (defocus angle, phase shift) in degrees with 9 significant
digits (reading back gives the same float32); float64 values with 12 significant digits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..physics.rotations import rotmat_to_euler_relion
from ..types import Pose
from .atomic import atomic_path
from .columns import CHUNK_ROWS, row_chunks, take
from .relion import ANGLES, OWNED_COLUMNS
from .starloop import format_rows, write_loop, write_loop_header
from .table import ParticleTable

__all__ = ["write_star", "relative_stack_names"]

PoseSource = Pose | Callable[[np.ndarray], Pose] | None


def _optics_values(table: ParticleTable, rows: np.ndarray) -> pd.DataFrame:
    """Per-row optics values of ``rows`` (as stored: pixel size float64, CTF values float32)."""
    values = {"rlnImagePixelSize": take(table.pixel_size, rows)}
    if table.has_ctf:
        ctf = table.ctf[torch.from_numpy(rows)]
        values["rlnVoltage"] = ctf.voltage_kv.numpy()
        values["rlnSphericalAberration"] = ctf.cs_mm.numpy()
        values["rlnAmplitudeContrast"] = ctf.amplitude_contrast.numpy()
    if table.image_size is not None:
        values["rlnImageSize"] = take(table.image_size, rows)
    return pd.DataFrame(values)


def _keys(values: pd.DataFrame) -> tuple[np.ndarray, list[tuple]]:
    """Each row's code among the distinct rows of ``values`` (rounded to 10 decimals), and those rows."""
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(values.round(10)))
    return codes, list(uniques)


class _OpticsPlan:
    """The optics table to write and each particle's group in it, decided in a first pass over the rows."""

    def __init__(self, table: ParticleTable, chunk_rows: int):
        self.table = table
        self.optics = self._reusable(chunk_rows)
        self.reuse = self.optics is not None
        if not self.reuse:
            self.optics = self._build(chunk_rows)

    def _reusable(self, chunk_rows: int) -> pd.DataFrame | None:
        """The table's own optics table if it still describes every particle exactly, else None."""
        table, optics = self.table, self.table.optics
        if optics is None or "rlnOpticsGroup" not in optics.columns or "rlnOpticsGroup" not in table.extra_columns:
            return None
        try:
            index = pd.Index(pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy())
            columns = list(_optics_values(table, np.zeros(0, dtype=np.int64)).columns)
            reference = {c: pd.to_numeric(optics[c]).to_numpy() for c in columns}
        except (ValueError, TypeError, KeyError):
            return None
        if not index.is_unique:
            return None
        for extra in table.extra_frames(["rlnOpticsGroup"], chunk_rows):
            pos = index.get_indexer(pd.to_numeric(extra["rlnOpticsGroup"], errors="coerce"))
            if (pos < 0).any():
                return None
            values = _optics_values(self.table, extra.index.to_numpy().astype(np.int64))
            for col in columns:
                mine = values[col].to_numpy()
                if not np.array_equal(reference[col].astype(mine.dtype)[pos], mine):
                    return None
        return optics.reset_index(drop=True)

    def _build(self, chunk_rows: int) -> pd.DataFrame:
        """One optics group per distinct row of optics values, numbered in order of appearance."""
        table = self.table
        self.groups: dict[tuple, int] = {}
        firsts: list[int] = []
        for start, stop in row_chunks(len(table), chunk_rows):
            codes, keys = _keys(_optics_values(table, np.arange(start, stop)))
            first = np.unique(codes, return_index=True)[1]
            for key, row in zip(keys, first, strict=True):
                if key not in self.groups:
                    self.groups[key] = len(self.groups) + 1
                    firsts.append(start + int(row))
        firsts_arr = np.asarray(firsts, dtype=np.int64)
        optics = _optics_values(table, firsts_arr)
        groups = np.arange(1, len(optics) + 1)
        optics.insert(0, "rlnOpticsGroupName", [f"opticsGroup{g}" for g in groups])
        optics.insert(0, "rlnOpticsGroup", groups)
        optics["rlnImageDimensionality"] = 2
        if not table.has_ctf:  # keep a (placeholder) voltage so that RELION accepts the table
            optics["rlnVoltage"] = table.ctf.voltage_kv[torch.from_numpy(firsts_arr)].numpy()
        return optics

    def group_of(self, rows: np.ndarray, extra: pd.DataFrame) -> np.ndarray:
        """The optics group number of each of ``rows`` (``extra``: their extra columns)."""
        if self.reuse:
            return pd.to_numeric(extra["rlnOpticsGroup"]).to_numpy().astype(np.int64)
        codes, keys = _keys(_optics_values(self.table, rows))
        return np.asarray([self.groups[k] for k in keys], dtype=np.int64)[codes]


def relative_stack_names(stacks: list[str], out_dir: Path, absolute: frozenset[str] = frozenset()) -> np.ndarray:
    """Each stack path as RELION resolves names: relative to ``out_dir`` (the written file's folder, with
    ``..`` where needed), so a project moved to another machine with its data still reads; absolute
    only for the stacks in ``absolute`` (named so in the file read)."""
    out_dir = os.path.abspath(out_dir)
    rel = []
    for u in stacks:
        u = os.path.abspath(u)
        if u in absolute:
            rel.append(u)
            continue
        try:
            rel.append(os.path.relpath(u, out_dir))
        except ValueError:  # different drive (Windows): no relative path exists
            rel.append(u)
    return np.asarray(rel, dtype=object)


def _degrees(radians: torch.Tensor) -> np.ndarray:
    """float32 radians as degrees with 9 significant digits (text that reads back to the same float32)."""
    return np.char.mod("%.9g", np.rad2deg(radians.double().numpy()))


def _pose_columns(table: ParticleTable, pose: PoseSource, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Angles (deg) and origins (Å) of ``rows``: the table's stored values, or ``pose``'s."""
    if pose is None:
        angles = table.pose_angles
        if angles is None:
            return {}
        part = angles.take(torch.from_numpy(rows))
        values = [part.rot, part.tilt, part.psi, part.shift_x, part.shift_y]
        return dict(zip(ANGLES + ("rlnOriginXAngst", "rlnOriginYAngst"), (v.numpy() for v in values), strict=True))
    part = pose[torch.from_numpy(rows)] if isinstance(pose, Pose) else pose(rows)
    if len(part.rotmat) != len(rows):
        raise ValueError(f"the pose source gave {len(part.rotmat)} poses for {len(rows)} rows")
    euler = np.rad2deg(rotmat_to_euler_relion(part.rotmat.double()).numpy())
    shift = part.shift_angst.double().numpy()
    return {ANGLES[0]: euler[:, 0], ANGLES[1]: euler[:, 1], ANGLES[2]: euler[:, 2],
            "rlnOriginXAngst": shift[:, 0], "rlnOriginYAngst": shift[:, 1]}


def _particle_rows(table: ParticleTable, extra: pd.DataFrame, plan: _OpticsPlan, names: np.ndarray | None,
                   pose: PoseSource, columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The particle table rows of ``extra``'s rows: extra columns (``columns`` replacing or added),
    then the ones the table represents."""
    rows = extra.index.to_numpy().astype(np.int64)
    frame = extra.drop(columns=[c for c in extra.columns if c in OWNED_COLUMNS or c == "rlnOpticsGroup"])
    for name, values in columns.items():
        frame[name] = values[rows]
    if names is not None:
        index = pd.Series(table.image_indices[rows].astype(np.int64) + 1).astype(str).str.zfill(6)
        stacks = pd.Series(names[table.image_paths.codes[rows]], dtype=object).astype(str)
        frame["rlnImageName"] = (index + "@" + stacks).to_numpy()
    frame["rlnOpticsGroup"] = plan.group_of(rows, extra)
    for col, values in _pose_columns(table, pose, rows).items():
        frame[col] = values
    if table.has_ctf:
        ctf = table.ctf[torch.from_numpy(rows)]
        frame["rlnDefocusU"] = ctf.defocus_u.numpy()
        frame["rlnDefocusV"] = ctf.defocus_v.numpy()
        frame["rlnDefocusAngle"] = _degrees(ctf.defocus_angle)
        frame["rlnPhaseShift"] = _degrees(ctf.phase_shift)
        frame["rlnCtfBfactor"] = ctf.bfactor.numpy()
    return frame


def write_star(path: str | os.PathLike, table: ParticleTable, pose: PoseSource = None,
               chunk_rows: int = CHUNK_ROWS, columns: Mapping[str, np.ndarray] | None = None) -> None:
    """Write ``table`` as a RELION 3.1 star file (optics + particles), atomically and chunk by chunk.

    pose       : poses to write instead of the table's — a Pose of every row, or a function from row
                 numbers (an int64 array of consecutive rows) to the Pose of those rows, called once
                 per chunk in order (so predictions can be made and written chunk by chunk); the
                 chunks are ``row_chunks(len(table), chunk_rows)``, all of one size but the last.
    chunk_rows : rows formatted at once (bounds the memory used while writing).
    columns    : {star label: (N,) values} written in place of the table's extra column of that name,
                 or added after them (e.g. ``rlnRandomSubset``); not a column the table represents.
    """
    path = Path(path)
    columns = dict(columns or {})
    for name, values in columns.items():
        if name in OWNED_COLUMNS or name == "rlnOpticsGroup":
            raise ValueError(f"{name} is written from the table itself; change the table instead")
        if len(values) != len(table):
            raise ValueError(f"column {name} has {len(values)} values for {len(table)} particles")
    plan = _OpticsPlan(table, chunk_rows)
    names = None if table.image_paths is None else relative_stack_names(
        [str(p) for p in table.image_paths.categories], path.parent, table.absolute_stacks)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("# RELION 3.1 particles written by cryoace\n")
            write_loop(fh, "optics", plan.optics)
            header = False
            for extra in table.extra_frames(chunk_rows=chunk_rows):
                frame = _particle_rows(table, extra, plan, names, pose, columns)
                if not header:
                    write_loop_header(fh, "particles", [str(c) for c in frame.columns])
                    header = True
                fh.write(format_rows(frame))
