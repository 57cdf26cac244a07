"""Atomic model → map: element guessing, density normalisation, placement, and agreement with the
independently made reference maps in tests/data/volumes."""

from __future__ import annotations

import gzip

import mrcfile
import numpy as np
import pytest

from cryoace.errors import CryoaceInputError
from cryoace.simulate.molmap import fit_box, guess_element, molmap, read_model
from cryoace.simulate.presets import ADK_MODEL

from conftest import TEST_DATA  # noqa: E402

MODELS = TEST_DATA / "models"
VOLUMES = TEST_DATA / "volumes"


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("name, residue, single, expected", [
    ("CA", "ALA", False, "C"), ("CA", "CA", True, "Ca"), ("HG1", "THR", False, "H"),
    ("CD", "GLU", False, "C"), ("1HB", "ALA", False, "H"), ("SD", "MET", False, "S"),
    ("OG", "SER", False, "O"), ("NZ", "LYS", False, "N"), ("SOD", "SOD", True, "Na"),
    ("ZN", "ZN", True, "Zn"), ("P", "DA", False, "P"), ("OT1", "GLY", False, "O"),
])
def test_guess_element_from_atom_name(name, residue, single, expected):
    assert guess_element(name, residue, single) == expected


def test_shipped_adk_model_is_the_test_data_one():
    assert ADK_MODEL.read_bytes() == (MODELS / "adk_open_4ake_chainA_mdanalysis.pdb").read_bytes()


def test_pdb_without_element_column_gets_protein_elements():
    model = read_model(ADK_MODEL)
    assert model.guessed_elements
    # 4AKE chain A: 214 residues, 1656 heavy atoms (the CHARMM file's 1685 hydrogens dropped)
    assert len(model) == 1656
    assert set(model.elements.tolist()) == {"C", "N", "O", "S"}
    assert model.atomic_number.sum() == 10935


def test_hydrogens_waters_dropped_and_element_column_used(tmp_path):
    lines = [
        "ATOM      1  N   ALA A   1      10.000  10.000  10.000  1.00  0.00           N",
        "ATOM      2  CA  ALA A   1      11.000  10.000  10.000  1.00  0.00           C",
        "ATOM      3  HA  ALA A   1      11.500  10.500  10.000  1.00  0.00           H",
        "HETATM    4 CA    CA A 101      14.000  10.000  10.000  1.00  0.00          CA",
        "HETATM    5  O   HOH A 201      20.000  10.000  10.000  1.00  0.00           O",
        "END",
    ]
    path = tmp_path / "tiny.pdb.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    model = read_model(path)
    assert model.elements.tolist() == ["N", "C", "Ca"]
    assert model.atomic_number.tolist() == [7, 6, 20]


def test_density_integrates_to_total_z_and_centroid_at_centre():
    model = read_model(ADK_MODEL)
    result = molmap(model, 64, 2.0, 6.0)
    assert result.data.dtype == np.float32 and result.data.shape == (64, 64, 64)
    assert result.data.sum() * 2.0 ** 3 == pytest.approx(model.atomic_number.sum(), rel=1e-4)
    # centre of the density = voxel L//2 (z, y, x)
    grid = np.arange(64)
    total = result.data.sum()
    com = [float((result.data.sum(axis=tuple(a for a in range(3) if a != ax)) * grid).sum() / total)
           for ax in range(3)]
    assert np.allclose(com, 32, atol=0.05)
    assert np.allclose(np.asarray(result.origin) + 32 * 2.0, model.centroid)


def test_chunking_does_not_change_the_map():
    model = read_model(ADK_MODEL)
    a = molmap(model, 48, 2.0, 5.0).data
    b = molmap(model, 48, 2.0, 5.0, chunk_voxels=5000).data
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_adk_molmap_matches_independent_reference():
    ref = mrcfile.open(VOLUMES / "adk_open_4ake_L64_1.5A.mrc", permissive=True)
    result = molmap(read_model(MODELS / "adk_open_4ake_chainA_mdanalysis.pdb"), 64, 1.5, 6.0)
    assert _corr(result.data, ref.data) >= 0.95
    assert np.allclose(result.origin, [ref.header.origin[a] for a in "xyz"], atol=0.5)


def test_spike_mmcif_gz_matches_reference():
    ref = mrcfile.open(VOLUMES / "spike_6vyb_L64_6.0A.mrc", permissive=True)
    model = read_model(MODELS / "6vyb.cif.gz")
    assert not model.guessed_elements and len(model) > 20000
    result = molmap(model, 64, 6.0, 12.0)
    assert _corr(result.data, ref.data) >= 0.95


def test_box_smaller_than_molecule_and_bad_sizes_are_input_errors():
    model = read_model(ADK_MODEL)
    with pytest.raises(CryoaceInputError, match="smaller than the molecule"):
        molmap(model, 32, 1.5, 6.0)
    for box, ps, res in ((64, 0.0, 6.0), (64, -1.5, 6.0), (64, 1.5, 0.0), (63, 1.5, 6.0)):
        with pytest.raises(CryoaceInputError):
            molmap(model, box, ps, res)
    box = fit_box(model, 1.5, 6.0)
    assert box % 2 == 0
    molmap(model, box, 1.5, 6.0)  # the fitted box holds the molecule


def test_unreadable_model_is_an_input_error(tmp_path):
    bad = tmp_path / "garbage.cif"
    bad.write_text("this is not a structure\n")
    with pytest.raises(CryoaceInputError):
        read_model(bad)
    with pytest.raises(CryoaceInputError, match="not found"):
        read_model(tmp_path / "missing.pdb")
