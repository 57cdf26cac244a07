"""Atomic model → density map: Z-weighted Gaussians integrated per voxel (molmap-like).

Each atom (hydrogens and waters dropped) contributes ``Z · N(r; x_atom, σ² I)`` with
``σ = 0.225 · resolution`` (ChimeraX ``molmap``'s sigma factor, 1/(π√2)); the value of a voxel is
that Gaussian *integrated over the voxel* divided by the voxel volume, so the map is a density in
electrons/Å³ whose sum × pixel_size³ equals Σ Z. The 3D Gaussian factorizes, so each atom needs only
three 1D vectors of erf differences on a window of ±5σ around it; their outer products are
scatter-added into the grid (vectorized over chunks of atoms, no Python loop over atoms).

Placement: the model's centroid (the Z-weighted mean of the kept atoms, i.e. the centre of the
density) sits at the centre of voxel
``L//2`` on every axis. The header origin is ``centroid − (L//2)·pixel_size`` (x, y, z), so voxel
``(i, j, k)`` (x, y, z) is centred at ``origin + (i, j, k)·pixel_size`` — the map overlays the model
in ChimeraX. Arrays are (z, y, x) as everywhere in cryoace.

Elements: files without an element column (e.g. CHARMM/MDAnalysis PDBs) make most readers guess
from the atom name, which mistakes ``CA`` (α-carbon) for calcium, ``HG1`` for mercury, ``CD`` for
cadmium... When a PDB file has no element column, or an atom's element is unknown, cryoace guesses
it from the name as a biochemist would: the first letter (after leading digits) for C, N, O, S, H,
P; a two-letter element only for single-atom ion residues (``CA`` in residue ``CA`` is calcium,
CHARMM's ``SOD``/``POT``/``CLA``/``CAL`` are Na/K/Cl/Ca).
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CryoaceInputError

__all__ = ["AtomicModel", "read_model", "guess_element", "molmap", "fit_box", "MolMap",
           "SIGMA_PER_RESOLUTION"]

#: σ of each atom's Gaussian per Å of resolution (ChimeraX molmap: 1/(π√2) ≈ 0.225).
SIGMA_PER_RESOLUTION = 0.225
#: Gaussians are evaluated out to this many σ from each atom.
CUTOFF_SIGMAS = 5.0

_WATER_RESIDUES = frozenset({"HOH", "WAT", "H2O", "DOD", "TIP", "TIP3", "TIP3P", "TIP4", "TIP4P",
                             "TIP5", "T3P", "T4P", "SOL", "SPC", "SPCE", "OH2"})
#: residue name -> element for single-atom ions whose names are not element symbols (CHARMM, AMBER)
_ION_RESIDUES = {"SOD": "Na", "NA+": "Na", "POT": "K", "K+": "K", "CLA": "Cl", "CL-": "Cl",
                 "CAL": "Ca", "CES": "Cs", "LIT": "Li", "RUB": "Rb", "ZN2": "Zn", "MG2": "Mg",
                 "BAR": "Ba", "CD2": "Cd"}
_ORGANIC = "CNOSHP"


@dataclasses.dataclass
class AtomicModel:
    """Atoms kept for a map: coordinates (M, 3) in Å (x, y, z), atomic numbers (M,), element symbols."""

    coords: np.ndarray
    atomic_number: np.ndarray
    elements: np.ndarray
    source: Path
    guessed_elements: bool = False

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def centroid(self) -> np.ndarray:
        """Centre of the density: the Z-weighted mean of the atom positions (x, y, z), Å."""
        return (self.coords * self.atomic_number[:, None]).sum(axis=0) / self.atomic_number.sum()


def _element_number(symbol: str) -> int:
    import gemmi

    if not symbol:
        return 0
    return int(gemmi.Element(symbol).atomic_number)


def guess_element(atom_name: str, residue_name: str = "", single_atom_residue: bool = False) -> str:
    """Element symbol guessed from a PDB atom name (and its residue), for files with no element column.

    ``CA`` is carbon except in a single-atom residue named ``CA`` (calcium); leading digits are
    ignored (``1HB`` is hydrogen); otherwise the first letter among C, N, O, S, H, P decides, and a
    name starting with anything else is read as an element symbol (first two letters, then one).
    Returns "" when nothing fits.
    """
    name = atom_name.strip().upper()
    res = residue_name.strip().upper()
    if res in _ION_RESIDUES:
        return _ION_RESIDUES[res]
    stripped = name.lstrip("0123456789'\"*")
    if not stripped:
        return ""
    if single_atom_residue and name == res:
        for candidate in (name[:2], name[:1]):
            if _element_number(candidate.capitalize()) > 0:
                return candidate.capitalize()
    if stripped[0] in _ORGANIC:
        return stripped[0]
    for candidate in (stripped[:2], stripped[:1]):
        if candidate.isalpha() and _element_number(candidate.capitalize()) > 0:
            return candidate.capitalize()
    return ""


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", errors="replace")
    return open(path, errors="replace")


def _pdb_has_element_column(path: Path) -> bool:
    """Whether any ATOM/HETATM record of a PDB file fills the element columns 77–78."""
    with _open_text(path) as fh:
        for line in fh:
            if line.startswith(("ATOM  ", "HETATM")) and len(line) >= 78 and line[76:78].strip():
                return True
    return False


def read_model(path: str | os.PathLike) -> AtomicModel:
    """Read the first model of a PDB / mmCIF file (optionally gzipped) with gemmi.

    Drops waters and hydrogens (H and D), keeps the first alternative conformation, guesses elements
    when the file has none (see the module docstring). Raises :class:`CryoaceInputError` for a missing
    or unreadable file or one with no atoms left.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise CryoaceInputError("file not found", path)
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/IOError on bad input
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CryoaceInputError(f"not a readable atomic model (PDB/mmCIF): {text}", path) from None
    if len(st) == 0:
        raise CryoaceInputError("the atomic model file contains no models/atoms", path)
    try:
        st.remove_alternative_conformations()
    except Exception:  # pragma: no cover - gemmi versions differ; altlocs are then all kept
        pass
    guess_all = st.input_format == gemmi.CoorFormat.Pdb and not _pdb_has_element_column(path)
    coords, symbols = [], []
    guessed = False
    for chain in st[0]:
        for residue in chain:
            resname = residue.name.strip().upper()
            if resname in _WATER_RESIDUES or residue.is_water():
                continue
            single = len(residue) == 1
            for atom in residue:
                symbol = atom.element.name if atom.element.atomic_number > 0 else ""
                if guess_all or not symbol:
                    symbol = guess_element(atom.name, resname, single) or symbol
                    guessed = True
                if symbol.upper() in ("H", "D"):
                    continue
                coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                symbols.append(symbol)
    if not coords:
        raise CryoaceInputError("the atomic model has no non-hydrogen, non-water atoms", path)
    symbols_arr = np.asarray(symbols, dtype=object)
    uniq, inverse = np.unique(symbols_arr.astype(str), return_inverse=True)
    numbers = np.array([_element_number(s) for s in uniq], dtype=np.float64)[inverse]
    unknown = numbers <= 0
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise CryoaceInputError(f"cannot tell the element of {int(unknown.sum())} atoms (e.g. atom {i} "
                                f"with element {symbols_arr[i]!r}); add an element column", path)
    xyz = np.asarray(coords, dtype=np.float64)
    if not np.isfinite(xyz).all():
        raise CryoaceInputError("atom coordinates contain NaN or Inf", path)
    return AtomicModel(coords=xyz, atomic_number=numbers, elements=symbols_arr, source=path,
                       guessed_elements=guessed)


@dataclasses.dataclass
class MolMap:
    """A map made by :func:`molmap`: ``data`` (L, L, L) float32 (z, y, x), voxel size and origin (Å)."""

    data: np.ndarray
    pixel_size: float
    origin: tuple[float, float, float]
    resolution: float
    centroid: tuple[float, float, float]


def fit_box(model: AtomicModel, pixel_size: float, resolution: float) -> int:
    """Smallest even box (px) holding every atom plus 3σ of its Gaussian, centroid at voxel L//2."""
    sigma = SIGMA_PER_RESOLUTION * resolution
    reach = np.abs(model.coords - model.centroid).max() + 3 * sigma
    half = int(math.ceil(reach / pixel_size)) + 1
    return 2 * half


def _check_params(box: int, pixel_size: float, resolution: float) -> None:
    if not (isinstance(box, (int, np.integer)) and box > 0 and box % 2 == 0):
        raise CryoaceInputError(f"box size must be a positive even number of pixels, got {box}")
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise CryoaceInputError(f"pixel size must be a positive number of Å, got {pixel_size:g}")
    if not (math.isfinite(resolution) and resolution > 0):
        raise CryoaceInputError(f"resolution must be a positive number of Å, got {resolution:g}")


def molmap(model: AtomicModel, box: int, pixel_size: float, resolution: float,
           chunk_voxels: int = 1 << 23) -> MolMap:
    """Density map (box³ voxels of ``pixel_size`` Å) of ``model`` at ``resolution`` Å (see module doc).

    Raises :class:`CryoaceInputError` for non-positive sizes or when an atom lies outside the box.
    ``chunk_voxels`` bounds the temporary (atoms × window³) array, so memory stays small for big models.
    """
    _check_params(box, pixel_size, resolution)
    centroid = model.centroid
    half = box // 2
    origin = centroid - half * pixel_size
    rel = (model.coords - origin) / pixel_size  # fractional voxel index of each atom, (x, y, z)
    lo_ok, hi_ok = rel.min(axis=0), rel.max(axis=0)
    if (lo_ok < -0.5).any() or (hi_ok > box - 0.5).any():
        extent = model.coords.max(axis=0) - model.coords.min(axis=0)
        reach = np.abs(model.coords - centroid).max()
        raise CryoaceInputError(
            f"box of {box} px × {pixel_size:g} Å = {box * pixel_size:g} Å is smaller than the molecule "
            f"(extent {extent[0]:.0f} × {extent[1]:.0f} × {extent[2]:.0f} Å; atoms reach {reach:.1f} Å "
            f"from the centroid, the box holds ±{half * pixel_size:g} Å); use --box "
            f"{fit_box(model, pixel_size, resolution)} or a larger pixel size", model.source)

    sigma_px = SIGMA_PER_RESOLUTION * resolution / pixel_size
    radius = int(math.ceil(CUTOFF_SIGMAS * sigma_px)) + 1
    window = 2 * radius + 1
    offsets = torch.arange(-radius, radius + 1, dtype=torch.int64)
    rel_t = torch.from_numpy(rel)
    weights_z = torch.from_numpy(model.atomic_number)
    nearest = torch.round(rel_t).long()  # (M, 3)
    flat = torch.zeros(box ** 3, dtype=torch.float64)
    scale = 1.0 / (sigma_px * math.sqrt(2.0))
    per_chunk = max(1, chunk_voxels // window ** 3)
    for start in range(0, len(model), per_chunk):
        stop = min(start + per_chunk, len(model))
        idx = nearest[start:stop, :, None] + offsets  # (m, 3, W) voxel indices
        dist = idx.to(torch.float64) - rel_t[start:stop, :, None]  # voxel centre − atom, px
        # integral of the unit 1D Gaussian over the voxel [d − ½, d + ½]
        w = 0.5 * (torch.erf((dist + 0.5) * scale) - torch.erf((dist - 0.5) * scale))
        inside = (idx >= 0) & (idx < box)
        w = torch.where(inside, w, torch.zeros_like(w))
        idx = idx.clamp(0, box - 1)
        wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
        values = torch.einsum("m,mk,mj,mi->mkji", weights_z[start:stop], wz, wy, wx)
        ix, iy, iz = idx[:, 0], idx[:, 1], idx[:, 2]
        flat_idx = (iz[:, :, None, None] * box + iy[:, None, :, None]) * box + ix[:, None, None, :]
        flat.index_add_(0, flat_idx.reshape(-1), values.reshape(-1))
    data = (flat.reshape(box, box, box) / pixel_size ** 3).to(torch.float32).numpy()
    return MolMap(data=data, pixel_size=float(pixel_size), origin=tuple(float(o) for o in origin),
                  resolution=float(resolution), centroid=tuple(float(c) for c in centroid))
