"""``cryoace evaluate`` end to end on a synthetic run directory.

The truth is a noise-free ``cryoace simulate --preset demo`` dataset (300 particles, L=64, shifted).
A "predicted" run is made from it: poses.star = the true poses in a known rotated (and, in one case,
mirrored) frame, rows shuffled; volume.mrc = the true map carried into that same frame (and, in one
case, translated). evaluate must undo exactly that: ~0 pose errors and FSC ≈ 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from cryoace.cli import simulate as simulate_cli
from cryoace.evaluate.align import MIRROR, resample_volume, shift_volume
from cryoace.evaluate.truth import fourier_crop_volume
from cryoace.io.mrc import read_volume, write_mrc
from cryoace.io.star import read_star, write_star
from cryoace.physics.rotations import random_rotmat
from cryoace.types import Pose

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EYE = torch.eye(3, dtype=torch.float64)
Q = random_rotmat(1, torch.Generator().manual_seed(11), dtype=torch.float64)[0]


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    d = tmp_path_factory.mktemp("truth") / "sim"
    parser = argparse.ArgumentParser()
    simulate_cli.add_args(parser)
    args = parser.parse_args(["--preset", "demo", "-n", "300", "-o", str(d), "--noise-free", "--shift-std", "3",
                              "--quiet", "--device", "cpu"])
    assert simulate_cli.main(args) == 0
    return d


def make_run(truth_dir, run_dir, flip: bool, q=Q, offset_px=None, shuffle=True, names=True,
             downsample=None, volume=True):
    """A run whose frame is the truth's rotated by ``q`` (R_pred = H R_gt q H) and mirrored when
    ``flip``, whose map is translated by ``offset_px`` (x, y, z voxels, in the truth's frame; the
    predicted shifts absorb it), optionally Fourier-cropped to ``downsample``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    table = read_star(truth_dir / "particles.star")
    h = MIRROR if flip else EYE
    rot = h @ table.pose.rotmat @ q @ h
    shift = table.pose.shift_angst.clone()
    d = torch.zeros(3, dtype=torch.float64) if offset_px is None else torch.as_tensor(offset_px, dtype=torch.float64)
    shift += (table.pose.rotmat[:, :2, :] @ d) * torch.tensor(table.pixel_size)[:, None]
    pred = dataclasses.replace(table, pose=Pose(rotmat=rot, shift_angst=shift))
    if not names:
        pred = dataclasses.replace(pred, image_paths=None, image_indices=None)
    if shuffle:
        pred = pred.subset(np.random.default_rng(0).permutation(len(pred)))
    write_star(run_dir / "poses.star", pred)
    if volume:
        m = read_volume(truth_dir / "volume.mrc")
        v = shift_volume(torch.from_numpy(m.data.copy()).to(torch.float64), d)
        # the predicted map v_pred(s) = v_aligned(Gᵀ H s) with G = qᵀ (see evaluate.align)
        v_pred = resample_volume(v, q @ h)
        voxel = m.voxel_size
        if downsample:
            voxel *= v_pred.shape[-1] / downsample
            v_pred = fourier_crop_volume(v_pred, downsample)
        write_mrc(run_dir / "volume.mrc", v_pred.numpy(), voxel)
    return run_dir


@pytest.mark.parametrize("flip", [False, True])
def test_recovers_frame_and_hand(run_cli, truth, tmp_path, flip):
    run = make_run(truth, tmp_path / "run", flip)
    rc, out, err = run_cli("evaluate", run, "--truth", truth / "particles.star",
                           "--truth-map", truth / "volume.mrc", "--json", tmp_path / "copy.json")
    assert rc == 0, err
    assert err == ""
    d = json.loads((run / "evaluation.json").read_text())
    assert json.loads((tmp_path / "copy.json").read_text()) == d
    assert d["n_particles"] == 300 and d["matched_by"] == "image name"
    al = d["alignment"]
    assert al["flip_hand"] is flip and al["hand"] == ("flipped" if flip else "original")
    np.testing.assert_allclose(al["rotation"], Q.T.numpy(), atol=1e-8)
    assert al["mean_sq_frobenius_other_hand"] > 1.0
    rot = d["rotation_error"]
    assert rot["mean_sq_frobenius"] < 1e-12 and rot["median_angle_deg"] < 1e-4
    tr = d["translation_error"]
    assert tr["mean_sq_px"] < 1e-12 and np.abs(tr["global_offset_px"]).max() < 1e-6
    cov = d["pose_coverage"]
    assert cov["n_bins"] == 768 and abs(cov["predicted"] - cov["truth"]) < 0.02
    assert 0.25 < cov["truth"] < 0.4          # 300 poses: 1 − exp(−300/768) ≈ 0.32
    f = d["fsc_vs_truth"]
    assert np.abs(f["offset_px"]).max() < 0.01
    assert min(f["curve"][:28]) > 0.98
    assert f["resolution"]["0.5"]["px"] == pytest.approx(2.0) and f["voxel_size"] == pytest.approx(1.5)
    assert (run / "fsc_vs_truth.png").read_bytes()[:8] == PNG_MAGIC
    aligned = read_volume(run / "volume_aligned.mrc")
    assert aligned.voxel_size == pytest.approx(1.5)
    assert ("flipped" if flip else "original") in out and "FSC vs truth" in out and "wrote" in out


def test_global_translation_from_shifts_and_map_agree(run_cli, truth, tmp_path):
    """A prediction whose map sits 2.5 px off the truth (and whose shifts absorb it, as ab initio
    shifts do): both the shift fit and the cross-correlation find the offset; centring restores FSC."""
    offset = [2.5, -1.0, 1.5]
    run = make_run(truth, tmp_path / "run", False, offset_px=offset)
    rc, out, err = run_cli("evaluate", run, "--truth", truth / "particles.star",
                           "--truth-map", truth / "volume.mrc", "--json", "-")
    assert rc == 0, err
    d = json.loads(out)                       # --json -: the JSON on stdout, the table on stderr
    assert "FSC vs truth" in err
    tr = d["translation_error"]
    np.testing.assert_allclose(tr["global_offset_px"], offset, atol=1e-6)
    assert tr["mean_sq_px"] > 3.0 and tr["mean_sq_px_after_offset"] < 1e-10
    f = d["fsc_vs_truth"]
    np.testing.assert_allclose(f["offset_px"], offset, atol=0.02)
    np.testing.assert_allclose(f["offset_angst"], np.array(offset) * 1.5, atol=0.03)
    assert min(f["curve"][:28]) > 0.98
    rc, out, err = run_cli("evaluate", run, "--truth", truth / "particles.star",
                           "--truth-map", truth / "volume.mrc", "--no-center", "--json", "-")
    assert rc == 0, err
    uncentred = json.loads(out)["fsc_vs_truth"]
    assert uncentred["offset_px"] == [0.0, 0.0, 0.0] and min(uncentred["curve"][:28]) < 0.5


def test_downsampled_run_and_row_order_pairing(run_cli, truth, tmp_path):
    """No image names and the same count: rows paired in order. A 32-px map at 3 Å of the same box:
    the truth is Fourier-cropped to compare."""
    run = make_run(truth, tmp_path / "run", True, shuffle=False, names=False, downsample=32)
    rc, out, err = run_cli("evaluate", run, "--truth", truth / "particles.star",
                           "--truth-map", truth / "volume.mrc")
    assert rc == 0, err
    d = json.loads((run / "evaluation.json").read_text())
    assert d["matched_by"] == "row order" and d["alignment"]["flip_hand"] is True
    f = d["fsc_vs_truth"]
    assert f["box_size"] == 32 and f["truth_cropped_from"] == 64 and f["voxel_size"] == pytest.approx(3.0)
    assert min(f["curve"][:15]) > 0.95


def test_poses_option_without_maps(run_cli, truth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = make_run(truth, tmp_path / "elsewhere", False, volume=False)
    rc, out, err = run_cli("evaluate", run, "--truth", truth / "particles.star",
                           "--poses", other / "poses.star", "--coverage-bins", "100")
    assert rc == 0, err
    d = json.loads((run / "evaluation.json").read_text())
    assert d["fsc_vs_truth"] is None and d["pose_coverage"]["n_bins"] == 100
    assert d["rotation_error"]["median_angle_deg"] < 1e-4
    assert not (run / "fsc_vs_truth.png").exists()


def test_symmetry_mates_are_not_errors(run_cli, truth, tmp_path):
    """A C3-symmetric true map (axes turned away from z) and particles posed at random symmetry mates
    of their true poses, in another frame: with --symmetry C3 the axes are found in the true map and
    the errors vanish; without, the mates count as errors."""
    from cryoace.physics.symmetry import symmetry_operators

    from helpers import c3_map

    turn = random_rotmat(1, torch.Generator().manual_seed(7), dtype=torch.float64)[0]
    true_map = resample_volume(c3_map(64), turn.T, oversample=1)  # its axis is turn·z
    write_mrc(tmp_path / "c3.mrc", true_map.numpy().astype(np.float32), 1.5)
    ops = turn @ symmetry_operators("C3") @ turn.T
    table = read_star(truth / "particles.star")
    which = torch.randint(3, (len(table),), generator=torch.Generator().manual_seed(8))
    run = tmp_path / "run"
    run.mkdir()
    write_star(run / "poses.star", dataclasses.replace(
        table, pose=Pose(rotmat=table.pose.rotmat @ ops[which] @ Q, shift_angst=table.pose.shift_angst)))
    write_mrc(run / "volume.mrc", resample_volume(true_map, Q).numpy().astype(np.float32), 1.5)
    args = ("evaluate", run, "--truth", truth / "particles.star", "--truth-map", tmp_path / "c3.mrc")
    rc, out, err = run_cli(*args)
    assert rc == 0, err
    assert json.loads((run / "evaluation.json").read_text())["rotation_error"]["median_angle_deg"] > 30
    rc, out, err = run_cli(*args, "--symmetry", "c3")
    assert rc == 0, err
    d = json.loads((run / "evaluation.json").read_text())
    assert d["rotation_error"]["median_angle_deg"] < 0.5 and d["symmetry"]["group"] == "C3"
    assert d["symmetry"]["correlation"] > 0.99 and "found in the true map" in d["symmetry"]["frame_from"]
    assert d["fsc_vs_truth"]["resolution"]["0.5"]["px"] < 3.5  # the map is carried over as well (smooth blobs)
    assert "nearest symmetry mate" in out


def _one_line_error(rc, out, err, *needles):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("cryoace evaluate: error:")
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2(run_cli, truth, tmp_path):
    star = truth / "particles.star"
    tmap = truth / "volume.mrc"
    # no run directory / no poses.star
    _one_line_error(*run_cli("evaluate", tmp_path / "nope", "--truth", star), "nope", "run directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(*run_cli("evaluate", empty, "--truth", star), "poses.star", "predict-poses")
    # a truth without angles
    table = read_star(star)
    write_star(tmp_path / "noangles.star", dataclasses.replace(table, pose=None))
    run = make_run(truth, tmp_path / "run", False, volume=False)
    _one_line_error(*run_cli("evaluate", run, "--truth", tmp_path / "noangles.star"), "noangles.star", "angles")
    # different counts and no names: cannot pair
    make_run(truth, tmp_path / "few", False, names=False, volume=False)
    few = read_star(tmp_path / "few" / "poses.star")
    write_star(tmp_path / "few" / "poses.star", few.subset(np.arange(200)))
    _one_line_error(*run_cli("evaluate", tmp_path / "few", "--truth", star), "cannot pair", "200", "300")
    # --truth-map but the run has no map
    _one_line_error(*run_cli("evaluate", run, "--truth", star, "--truth-map", tmap), "volume.mrc", "not found")
    # a map of another box that does not cover the same volume
    write_mrc(run / "volume.mrc", np.zeros((32, 32, 32), np.float32), 1.5)
    _one_line_error(*run_cli("evaluate", run, "--truth", star, "--truth-map", tmap), "volume.mrc", "box 32")
    write_mrc(run / "volume.mrc", np.zeros((64, 64, 64), np.float32), 2.0)
    _one_line_error(*run_cli("evaluate", run, "--truth", star, "--truth-map", tmap), "voxel size")
    _one_line_error(*run_cli("evaluate", run, "--truth", star, "--volume", run / "volume.mrc"), "--truth-map")
    _one_line_error(*run_cli("evaluate", run, "--truth", star, "--coverage-bins", "0"), "--coverage-bins")
    _one_line_error(*run_cli("evaluate", run, "--truth", star, "--symmetry", "I3"), "--symmetry", "Cn or Dn")
    assert not (run / "evaluation.json").exists() and not (run / "fsc_vs_truth.png").exists()
