"""``cryoace mask``: a readable MRC with the map's voxel size, values in [0, 1], the thresholded
voxels inside; bad input is one line, exit 2."""

from __future__ import annotations

import pytest

from cryoace.io.mrc import read_volume

from conftest import TEST_DATA  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"


def test_mask_writes_a_soft_mask_with_the_maps_voxel_size(run_cli, tmp_path):
    out = tmp_path / "mask.mrc"
    rc, stdout, err = run_cli("mask", ADK_L64, "-o", out, "--threshold", "0.1", "--extend", "2",
                              "--soft", "4")
    assert rc == 0, err
    mask = read_volume(out)
    vol = read_volume(ADK_L64)
    assert mask.data.shape == vol.data.shape and mask.voxel_size == pytest.approx(vol.voxel_size)
    assert mask.data.min() >= 0 and mask.data.max() == 1.0
    assert (mask.data[vol.data > 0.1] == 1).all()
    assert 0 < ((mask.data > 0) & (mask.data < 1)).sum()  # a soft edge
    assert "threshold 0.1" in stdout


def test_default_threshold_and_lowpass(run_cli, tmp_path):
    out = tmp_path / "mask.mrc"
    rc, stdout, err = run_cli("mask", ADK_L64, "-o", out, "--lowpass", "10")
    assert rc == 0, err
    assert "(default)" in stdout
    assert 0.01 < float((read_volume(out).data >= 0.5).mean()) < 0.5


@pytest.mark.parametrize("argv,text", [(["missing.mrc"], "not found"),
                                       ([str(ADK_L64), "--threshold", "1e9"], "threshold"),
                                       ([str(ADK_L64), "--soft", "-1"], "--soft")])
def test_bad_input_is_one_line_exit_2(run_cli, tmp_path, argv, text):
    out = tmp_path / "mask.mrc"
    argv = [tmp_path / a if a == "missing.mrc" else a for a in argv]
    rc, _, err = run_cli("mask", *argv, "-o", out)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryoace mask: error:") and text in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".*"))
