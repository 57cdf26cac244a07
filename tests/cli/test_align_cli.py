"""``cryoace align``: a rotated, shifted, mirrored copy of a map (another box and voxel size) is put
back onto the reference; the aligned map, the transform JSON and the FSC plot are written; bad input
is one line, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryoace.evaluate.align import shift_volume, transform_volume
from cryoace.evaluate.map_align import map_correlation, resample_map
from cryoace.io.mrc import read_volume, write_mrc
from cryoace.physics.fourier import fourier_crop
from cryoace.physics.rotations import axis_angle_to_rotmat

from conftest import TEST_DATA  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"
FAST = ["--angular-step", "20", "--coarse-size", "16"]


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    d = tmp_path_factory.mktemp("align_maps")
    ref = fourier_crop(torch.from_numpy(read_volume(ADK_L64).data.copy()).double(), 32, ndim=3).float()
    q = axis_angle_to_rotmat(torch.tensor([0.9, -1.4, 0.5], dtype=torch.float64))
    moved = shift_volume(transform_volume(ref, q, True), torch.tensor([1.5, -1.0, 0.5]))
    moved = resample_map(moved, 3.0, 2.5, 40)  # another box and voxel size
    paths = {"ref": d / "ref.mrc", "moved": d / "moved.mrc"}
    write_mrc(paths["ref"], ref.numpy(), 3.0)
    write_mrc(paths["moved"], moved.numpy(), 2.5)
    return paths, ref


def test_align_writes_map_transform_and_plot(run_cli, maps, tmp_path):
    paths, ref = maps
    out = tmp_path / "out" / "aligned.mrc"
    rc, stdout, err = run_cli("align", paths["moved"], "-r", paths["ref"], "-o", out, *FAST)
    assert rc == 0, err
    aligned = read_volume(out)
    assert aligned.data.shape == (32, 32, 32) and aligned.voxel_size == pytest.approx(3.0)
    assert map_correlation(torch.from_numpy(aligned.data.copy()), ref) > 0.98
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["flip_hand"] and d["correlation"] > 0.98
    assert d["resampled_from"] == {"box_size": 40, "voxel_size": 2.5}
    assert np.allclose(np.array(d["shift_angst"]), 3.0 * np.array(d["shift_px"]))
    rot = np.array(d["rotation"])
    assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert d["fsc"]["resolution"]["0.5"]["angstrom"] < 8.0
    assert (tmp_path / "out" / "aligned_fsc.png").read_bytes()[:4] == b"\x89PNG"
    assert "correlation" in stdout and "resolution at FSC 0.143" in stdout and "flipped" in stdout
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left


def test_flip_hand_without_search_just_mirrors(run_cli, maps, tmp_path):
    paths, ref = maps
    out = tmp_path / "mirrored.mrc"
    rc, _, err = run_cli("align", paths["ref"], "--flip-hand", "--no-search", "-o", out, "--no-plot")
    assert rc == 0, err
    data = read_volume(out).data
    np.testing.assert_allclose(data[1:], ref.numpy()[:0:-1], atol=1e-6)  # v(x, y, −z) about L//2
    assert json.loads(out.with_suffix(".json").read_text())["searched"] is False


@pytest.mark.parametrize("case", ["missing", "no_reference", "bad_step"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_cli, maps, tmp_path, case):
    paths, _ = maps
    missing = tmp_path / "missing.mrc"
    out = tmp_path / "out" / "aligned.mrc"
    argv = {"missing": [missing, "-r", paths["ref"]],
            "no_reference": [paths["moved"]],
            "bad_step": [paths["moved"], "-r", paths["ref"], "--angular-step", "0"]}[case]
    rc, _, err = run_cli("align", *argv, "-o", out)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryoace align: error:") and "Traceback" not in err
    if case == "missing":
        assert str(missing) in lines[0] and "not found" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())
