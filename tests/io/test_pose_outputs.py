"""Pose outputs as cryoSPARC .cs and cryoDRGN pose.pkl (train.predict.write_poses), read back by
cryoace's readers (themselves tested against real cryoSPARC / cryoDRGN files) and checked against
each format's raw numbers: cryoSPARC's pose is the rotation vector of Rᵀ with the shift in px;
cryoDRGN's pickle holds (R, shift / (box·pixel size))."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.cryodrgn import read_cryodrgn_poses
from cryoace.io.cryosparc import read_cs, write_cs
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.io.star import read_star
from cryoace.train.predict import write_poses

TRPV1 = "trpv1_cryojax/trpv1_small_stack"


def _rodrigues(v: np.ndarray) -> np.ndarray:
    """exp([v]×) as scipy's matrix exponential of the cross-product matrix (independent of cryoace)."""
    from scipy.linalg import expm

    return expm(np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=np.float64))


@pytest.fixture
def trpv1(particles_dir):
    """10 real TRPV1 particles with poses (shifts in Å) and CTF; their stack remapped to the .mrcs."""
    return read_star(particles_dir / f"{TRPV1}.star",
                     stack_map={"batch_0_restacked.mrc": particles_dir / f"{TRPV1}.mrcs"})


def test_cs_round_trip(trpv1, tmp_path):
    out = tmp_path / "sub" / "poses.cs"
    out.parent.mkdir()
    write_poses(out, trpv1, trpv1.pose)
    raw = np.load(out)
    assert raw["alignments3D/pose"].dtype == np.float32 and raw["blob/idx"].dtype == np.uint32
    for i in (0, 4, 9):  # the raw numbers follow cryoSPARC's convention
        np.testing.assert_allclose(_rodrigues(raw["alignments3D/pose"][i].astype(np.float64)).T,
                                   trpv1.pose.rotmat[i].numpy(), atol=2e-6)
    np.testing.assert_allclose(raw["alignments3D/shift"], trpv1.pose.shift_angst.numpy() / 4.88, rtol=1e-5)
    np.testing.assert_allclose(raw["blob/psize_A"], 4.88, rtol=1e-6)
    assert raw["blob/path"][0].decode() == os.path.relpath(trpv1.stack_paths[0], out.parent)  # like star files
    back = read_cs(out)
    torch.testing.assert_close(back.pose.rotmat, trpv1.pose.rotmat, atol=2e-6, rtol=0)
    torch.testing.assert_close(back.pose.shift_angst, trpv1.pose.shift_angst, atol=1e-5, rtol=1e-6)
    for f in ("defocus_u", "defocus_v", "defocus_angle", "voltage_kv", "cs_mm", "amplitude_contrast"):
        torch.testing.assert_close(getattr(back.ctf, f), getattr(trpv1.ctf, f), rtol=1e-6, atol=1e-6)
    assert back.stack_paths == trpv1.stack_paths and back.image_indices.tolist() == list(range(10))
    torch.testing.assert_close(ParticleDataset(back, normalize=False)[[3, 7]].images,
                               ParticleDataset(trpv1, normalize=False)[[3, 7]].images)


def test_cs_rewrites_a_real_cryosparc_file(particles_dir, tmp_path):
    """cryoSPARC's own P12 file read and written again: the same poses, shifts and uids."""
    path = particles_dir / "cryosparc_cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    table = read_cs(path)
    write_cs(tmp_path / "again.cs", table)
    raw, again = np.load(path), np.load(tmp_path / "again.cs")
    assert again["uid"].tolist() == raw["uid"].tolist()
    np.testing.assert_allclose(again["alignments3D/shift"], raw["alignments3D/shift"], rtol=1e-5, atol=1e-5)
    for i in (0, 1, 1000, 2018):
        np.testing.assert_allclose(_rodrigues(again["alignments3D/pose"][i].astype(np.float64)),
                                   _rodrigues(raw["alignments3D/pose"][i].astype(np.float64)), atol=2e-6)
    np.testing.assert_allclose(again["ctf/df1_A"], raw["ctf/df1_A"], rtol=1e-6)
    back = read_cs(tmp_path / "again.cs", datadir=path.parent)
    torch.testing.assert_close(back.pose.rotmat, table.pose.rotmat, atol=2e-6, rtol=0)


def test_pkl_round_trip(trpv1, tmp_path):
    write_poses(tmp_path / "pose.pkl", trpv1, trpv1.pose)
    rots, trans = pickle.load(open(tmp_path / "pose.pkl", "rb"))
    np.testing.assert_allclose(rots, trpv1.pose.rotmat.numpy(), atol=1e-6)
    np.testing.assert_allclose(trans, trpv1.pose.shift_angst.numpy() / (48 * 4.88), rtol=1e-5, atol=1e-7)
    back = read_cryodrgn_poses(tmp_path / "pose.pkl", box_size=48, pixel_size=4.88)
    torch.testing.assert_close(back.rotmat, trpv1.pose.rotmat, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.shift_angst, trpv1.pose.shift_angst, atol=1e-5, rtol=1e-6)


def test_poses_from_a_chunked_source_and_bad_names(trpv1, tmp_path):
    """A function of row chunks (what predict-poses passes) gives the same files as the poses themselves."""
    pose = trpv1.pose
    source = lambda rows: type(pose)(rotmat=pose.rotmat[rows], shift_angst=pose.shift_angst[rows])  # noqa: E731
    write_poses(tmp_path / "a.cs", trpv1, source, chunk_rows=3)
    write_poses(tmp_path / "b.cs", trpv1, pose)
    a, b = np.load(tmp_path / "a.cs"), np.load(tmp_path / "b.cs")
    assert a.dtype == b.dtype and all(np.array_equal(a[f], b[f]) for f in a.dtype.names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cs", "b.cs"]  # no spool or temp left
    with pytest.raises(CryoaceInputError, match="unknown pose file type '.txt'"):
        write_poses(tmp_path / "p.txt", trpv1, pose)
    assert read_particles(tmp_path / "a.cs").has_pose
