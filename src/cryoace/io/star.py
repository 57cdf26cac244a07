"""RELION ``.star`` particle files (3.0, 3.1, 5) ↔ :class:`~cryoace.io.table.ParticleTable`.

Reading (streamed: :mod:`.starloop` locates the blocks, then the particle rows are parsed and
converted chunk by chunk into the table's compact columns — the file's text is never in memory
whole, so reading takes about 40 bytes per particle):

* **RELION 3.0** — a single table (``data_``, ``data_images``, ``data_particles`` without optics):
  per-particle pixel size from ``rlnImagePixelSize`` or ``rlnPixelSize`` (Å), else
  ``rlnDetectorPixelSize`` (µm) × 1e4 / ``rlnMagnification``; CTF columns per particle; shifts
  ``rlnOriginX/Y`` in pixels (converted to Å with the pixel size) or ``rlnOriginX/YAngst``.
* **RELION 3.1 / 5** — ``data_optics`` + ``data_particles``: every optics-table column (pixel size
  ``rlnImagePixelSize``, ``rlnVoltage``, ``rlnSphericalAberration``, ``rlnAmplitudeContrast``,
  ``rlnImageSize``…) is merged onto the particles by ``rlnOpticsGroup`` (the optics value wins over a
  particle column of the same name); then the 3.0 rules apply. Shifts ``rlnOriginX/YAngst`` (Å),
  or ``rlnOriginX/Y`` (px) converted with the pixel size when only those exist. The order of the two
  tables in the file does not matter.

Units: angles are degrees in the file and radians inside (``rlnDefocusAngle``, ``rlnPhaseShift``);
``rlnAngleRot/Tilt/Psi`` become ``R = euler_relion_to_rotmat(rot, tilt, psi)``. ``rlnCtfBfactor`` is
Å² (0 if absent), ``rlnDefocusV`` defaults to ``rlnDefocusU``, ``rlnDefocusAngle`` and
``rlnPhaseShift`` to 0. No ``rlnDefocusU`` means no CTF (``has_ctf = False``, see
:mod:`cryoace.io.table`). A defocus without ``rlnVoltage`` / ``rlnSphericalAberration`` /
``rlnAmplitudeContrast`` takes RELION's own defaults from ``CTF::read`` (200 kV, 0 mm, 0) with a
warning — e.g. the RELION 3.0 file FinalRefinement-OriginalParticles-PfCRT.star has no amplitude
contrast. Missing angles → ``pose = None``; angles without origins → zero shifts.

``rlnImageName`` is ``index@path`` (1-based index; a name without ``@`` is image 1 of that file); the
path is relative to the star file's directory (then its basename there), or looked up in ``datadir``
(``datadir/path``, then ``datadir/basename``). Other columns stay in the file as ``table.extra``
(read when first asked for) and are written back.

Writing: :func:`cryoace.io.starwrite.write_star` (RELION 3.1, streamed; re-exported here).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CryoaceInputError
from ..types import CTFParams
from .columns import CHUNK_ROWS, ColumnBuilder
from .relion import ANGLES, OWNED_COLUMNS
from .starloop import Loop, LoopColumns, iter_loop, read_loop, scan_star
from .starwrite import write_star
from .table import EulerPoses, ParticleTable, absolute_as_written, particle_number, resolve_image_paths

__all__ = ["read_star", "write_star", "OWNED_COLUMNS"]

#: RELION's own defaults (``CTF::read``) for microscope columns missing next to a defocus; using one
#: emits a warning.
_RELION_CTF_DEFAULTS = {"rlnVoltage": 200.0, "rlnSphericalAberration": 0.0, "rlnAmplitudeContrast": 0.0}

_OPTICS_KEYS = ("rlnOpticsGroup", "rlnOpticsGroupName")


def _select(blocks: dict[str, Loop], path: Path) -> tuple[Loop, Loop | None]:
    optics = blocks.get("optics")
    if "particles" in blocks:
        return blocks["particles"], optics
    others = {k: v for k, v in blocks.items() if k != "optics"}
    if len(others) > 1:
        with_images = {k: v for k, v in others.items() if "rlnImageName" in v.labels}
        if len(with_images) == 1:
            others = with_images
    if len(others) != 1:
        names = ", ".join(f"data_{k}" for k in blocks) or "none"
        raise CryoaceInputError(f"cannot tell which table holds the particles (blocks: {names}); "
                                "expected data_particles or a single data_ table", path)
    return next(iter(others.values())), optics


def _numeric(values: pd.Series, column: str, path: Path) -> np.ndarray:
    """float64 values of a column; a non-numeric or non-finite one is an error naming its row (the
    Series index)."""
    out = np.array(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raw = values.iloc[i]
        shown = repr(raw) if isinstance(raw, str) else str(raw)  # not numpy 2's "np.float64(nan)"
        raise CryoaceInputError(f"column {column} has a non-numeric, non-finite or missing value "
                                f"{shown} at {particle_number(values.index[i])}", path)
    return out


class _Optics:
    """The optics table, checked once, and the merge of its columns onto chunks of particles."""

    def __init__(self, optics: pd.DataFrame | None, particle_labels: tuple[str, ...], path: Path):
        self.frame, self.path = optics, path
        self.columns: list[str] = []
        self.index = None
        if optics is None or len(optics) == 0:
            return
        self.columns = [c for c in optics.columns if c not in _OPTICS_KEYS]
        if "rlnOpticsGroup" in optics.columns and "rlnOpticsGroup" in particle_labels:
            groups = _numeric(optics["rlnOpticsGroup"], "rlnOpticsGroup", path)
            if len(np.unique(groups)) != len(groups):
                raise CryoaceInputError("data_optics lists the same rlnOpticsGroup twice", path)
            self.index = pd.Index(groups)
        elif len(optics) != 1:
            raise CryoaceInputError(f"data_optics has {len(optics)} groups but the particles have no "
                                    "rlnOpticsGroup column", path)

    def positions(self, chunk: pd.DataFrame) -> np.ndarray:
        """The optics row of each particle of ``chunk``."""
        if self.index is None:
            return np.zeros(len(chunk), dtype=np.int64)
        groups = _numeric(chunk["rlnOpticsGroup"], "rlnOpticsGroup", self.path)
        pos = self.index.get_indexer(groups)
        if (pos < 0).any():
            i = int(np.flatnonzero(pos < 0)[0])
            raise CryoaceInputError(f"{particle_number(chunk.index[i])} belongs to optics group {groups[i]:g}, "
                                    "which data_optics does not define", self.path)
        return pos


class _Merged:
    """One chunk of particle rows with the optics values merged on (optics wins), column by column."""

    def __init__(self, chunk: pd.DataFrame, optics: _Optics):
        self.chunk, self.optics = chunk, optics
        self.pos = optics.positions(chunk) if optics.columns else None

    def numeric(self, name: str) -> np.ndarray:
        """float64 values of column ``name`` (checked: every value finite)."""
        if name in self.optics.columns:
            values = pd.Series(self.optics.frame[name].to_numpy()[self.pos], index=self.chunk.index)
        else:
            values = self.chunk[name]
        return _numeric(values, name, self.optics.path)


_CTF_FIELDS = ("defocus_u", "defocus_v", "defocus_angle", "voltage_kv", "cs_mm", "amplitude_contrast",
               "phase_shift", "bfactor")
_POSE_FIELDS = ("rot", "tilt", "psi", "shift_x", "shift_y")


class _ParticleReader:
    """Turns chunks of particle rows into the table's compact columns. What the file holds (pixel size
    rule, CTF, pose, image names) is decided once from its labels, so each warning comes once."""

    def __init__(self, path: Path, loop: Loop, optics: pd.DataFrame | None, pixel_size: float | None):
        self.path = path
        self.optics = _Optics(optics, loop.labels, path)
        self.have = set(loop.labels) | set(self.optics.columns)
        self.columns = [c for c in loop.labels if c in OWNED_COLUMNS or c == "rlnOpticsGroup"]
        self.pixel_size = pixel_size
        if pixel_size is None and not (self.have & {"rlnImagePixelSize", "rlnPixelSize"}
                                       or {"rlnDetectorPixelSize", "rlnMagnification"} <= self.have):
            raise CryoaceInputError("no pixel size: the file has none of rlnImagePixelSize, rlnPixelSize, or "
                                    "rlnDetectorPixelSize with rlnMagnification (give the pixel size "
                                    "explicitly)", path)
        self.has_ctf = "rlnDefocusU" in self.have
        if self.has_ctf:
            for col, default in _RELION_CTF_DEFAULTS.items():
                if col not in self.have:
                    warnings.warn(f"{path}: no column {col}; using RELION's default {default}", stacklevel=3)
        self.has_pose = all(c in self.have for c in ANGLES)
        self.has_images = "rlnImageName" in loop.labels
        self.has_size = "rlnImageSize" in self.have
        n = loop.n_rows
        self.cols = {"pixel_size": ColumnBuilder(n, np.float64), "image_size": ColumnBuilder(n, np.int64),
                     "stack": ColumnBuilder(n, np.int32), "index": ColumnBuilder(n, np.int32)}
        self.cols.update({f: ColumnBuilder(n, np.float32) for f in _CTF_FIELDS + _POSE_FIELDS})
        self.raw_paths: dict[str, int] = {}

    def _get(self, m: _Merged, name: str, default: float) -> np.ndarray | float:
        return m.numeric(name) if name in self.have else default

    def add(self, chunk: pd.DataFrame) -> None:
        """Convert the rows of ``chunk`` (indexed by particle row)."""
        m = _Merged(chunk, self.optics)
        start = int(chunk.index[0])
        ps = self._pixel_sizes(m)
        put = {"pixel_size": ps}
        if self.has_size:
            put["image_size"] = m.numeric("rlnImageSize").astype(np.int64)
        put.update(self._ctf(m))
        if self.has_pose:
            put.update(self._pose(m, ps))
        if self.has_images:
            put.update(self._names(chunk))
        for name, values in put.items():
            self.cols[name].put(start, np.broadcast_to(values, (len(chunk),)))

    def _pixel_sizes(self, m: _Merged) -> np.ndarray | float:
        if self.pixel_size is not None:
            return float(self.pixel_size)
        have = self.have
        if "rlnImagePixelSize" in have or "rlnPixelSize" in have:
            ps = m.numeric("rlnImagePixelSize" if "rlnImagePixelSize" in have else "rlnPixelSize")
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                ps = m.numeric("rlnDetectorPixelSize") * 1e4 / m.numeric("rlnMagnification")
        bad = ~(np.isfinite(ps) & (ps > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CryoaceInputError(f"pixel size is zero, negative or undefined ({ps[i]:g} Å at "
                                    f"{particle_number(m.chunk.index[i])}); give the pixel size explicitly", self.path)
        return ps

    def _ctf(self, m: _Merged) -> dict[str, np.ndarray | float]:
        if not self.has_ctf:
            volt = np.asarray(self._get(m, "rlnVoltage", 300.0))
            return dict(defocus_u=0.0, defocus_v=0.0, defocus_angle=0.0, voltage_kv=np.where(volt > 0, volt, 300.0),
                        cs_mm=0.0, amplitude_contrast=1.0, phase_shift=0.0, bfactor=0.0)
        dfu = m.numeric("rlnDefocusU")
        return dict(
            defocus_u=dfu, defocus_v=m.numeric("rlnDefocusV") if "rlnDefocusV" in self.have else dfu,
            defocus_angle=np.deg2rad(self._get(m, "rlnDefocusAngle", 0.0)),
            voltage_kv=self._get(m, "rlnVoltage", _RELION_CTF_DEFAULTS["rlnVoltage"]),
            cs_mm=self._get(m, "rlnSphericalAberration", _RELION_CTF_DEFAULTS["rlnSphericalAberration"]),
            amplitude_contrast=self._get(m, "rlnAmplitudeContrast", _RELION_CTF_DEFAULTS["rlnAmplitudeContrast"]),
            phase_shift=np.deg2rad(self._get(m, "rlnPhaseShift", 0.0)),
            bfactor=self._get(m, "rlnCtfBfactor", 0.0))

    def _pose(self, m: _Merged, ps: np.ndarray | float) -> dict[str, np.ndarray | float]:
        out = {key: m.numeric(col) for key, col in zip(_POSE_FIELDS[:3], ANGLES, strict=True)}
        if {"rlnOriginXAngst", "rlnOriginYAngst"} <= self.have:
            out["shift_x"], out["shift_y"] = m.numeric("rlnOriginXAngst"), m.numeric("rlnOriginYAngst")
        elif {"rlnOriginX", "rlnOriginY"} <= self.have:
            out["shift_x"], out["shift_y"] = m.numeric("rlnOriginX") * ps, m.numeric("rlnOriginY") * ps
        else:
            out["shift_x"] = out["shift_y"] = 0.0
        return out

    def _names(self, chunk: pd.DataFrame) -> dict[str, np.ndarray]:
        names = chunk["rlnImageName"].astype(str).str.strip()
        parts = names.str.partition("@")
        has_at = parts[1] == "@"
        index_text = parts[0].where(has_at, "1")
        file_text = parts[2].where(has_at, parts[0])
        index = pd.to_numeric(index_text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index)) | (index > np.iinfo(np.int32).max)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CryoaceInputError(f"rlnImageName {names.iloc[i]!r} at {particle_number(names.index[i])} is not "
                                    "'index@path' with a 1-based index", self.path)
        empty = (file_text.str.len() == 0).to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise CryoaceInputError(f"rlnImageName {names.iloc[i]!r} at {particle_number(names.index[i])} has no "
                                    "file", self.path)
        codes, uniques = pd.factorize(file_text)
        ids = np.array([self.raw_paths.setdefault(str(u), len(self.raw_paths)) for u in uniques], dtype=np.int32)
        return {"stack": ids[codes], "index": index.astype(np.int64) - 1}

    def table(self, datadir, optics: pd.DataFrame | None, extra: LoopColumns) -> ParticleTable:
        """The table of every row added."""
        cols = self.cols
        paths = indices = None
        absolute = frozenset()
        if self.has_images:
            raw = np.asarray(list(self.raw_paths), dtype=object)
            resolved = resolve_image_paths(raw, self.path.parent, datadir)
            absolute = absolute_as_written(raw, resolved)
            merged, stacks = pd.factorize(resolved)
            codes = cols["stack"].array()
            if not np.array_equal(merged, np.arange(len(merged))):  # two names of one file
                codes = merged.astype(np.int32)[codes]
            paths = pd.Categorical.from_codes(codes, stacks)
            indices = cols["index"].array()
        pose = EulerPoses(*(cols[f].tensor() for f in _POSE_FIELDS)) if self.has_pose else None
        return ParticleTable(source=self.path, image_paths=paths, image_indices=indices,
                             pixel_size=cols["pixel_size"].array(),
                             ctf=CTFParams(*(cols[f].tensor() for f in _CTF_FIELDS)), has_ctf=self.has_ctf,
                             pose=pose, image_size=cols["image_size"].array() if self.has_size else None,
                             optics=optics, extra=extra, absolute_stacks=absolute)


def read_star(path: str | os.PathLike, datadir: str | os.PathLike | None = None,
              pixel_size: float | None = None,
              stack_map: Mapping[str, str | os.PathLike] | None = None,
              chunk_rows: int = CHUNK_ROWS) -> ParticleTable:
    """Read a RELION 3.0 / 3.1 / 5 particle star file (see the module docstring for the rules).

    datadir    : directory holding the image stacks (``datadir/path``, then ``datadir/basename``).
    pixel_size : Å/px replacing the file's pixel size for every particle (for files that have none).
    stack_map  : {stack path or basename: replacement path}, applied after resolution.
    chunk_rows : particle rows parsed at once (bounds the memory used while reading).
    """
    path = Path(os.path.abspath(path))
    loop, optics_loop = _select(scan_star(path), path)
    if loop.n_rows == 0:
        raise CryoaceInputError("the particle table has no rows", path)
    optics = None if optics_loop is None else read_loop(path, optics_loop)
    reader = _ParticleReader(path, loop, optics, pixel_size)
    for chunk in iter_loop(path, loop, reader.columns, chunk_rows=chunk_rows):
        reader.add(chunk)
    extra = LoopColumns.of(path, loop, [c for c in loop.labels if c not in OWNED_COLUMNS])
    table = reader.table(datadir, optics, extra)
    return table.remap_stacks(stack_map or {})
