"""cryoDRGN pickles: the hand test set, conventions (R, +origin/D) and round trips."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.cryodrgn import (
    read_cryodrgn_ctf,
    read_cryodrgn_poses,
    table_from_stack,
    write_cryodrgn_ctf,
    write_cryodrgn_poses,
)
from cryoace.io.particles import ParticleDataset
from cryoace.io.star import read_star
from cryoace.types import CTFParams

HAND = "cryodrgn_hand"


def test_hand_table(particles_dir):
    table = table_from_stack(particles_dir / HAND / "hand.mrcs", poses=particles_dir / HAND / "hand_rot.pkl")
    raw = pickle.load(open(particles_dir / HAND / "hand_rot.pkl", "rb"))  # bare (100, 3, 3) rotations
    assert len(table) == 100 and table.pose is not None and not table.has_ctf
    # the table stores poses as float32 Euler angles (≈1e-7 on a matrix entry)
    np.testing.assert_allclose(table.pose.rotmat.numpy(), raw.astype(np.float64), atol=1e-6, rtol=0)
    assert (table.pose.shift_angst == 0).all()
    np.testing.assert_allclose(table.pixel_size, 1.0)  # header voxel size
    assert (table.image_size == 64).all() and list(table.image_indices[:3]) == [0, 1, 2]
    ds = ParticleDataset(table, normalize=False)
    assert ds[:].images.shape == (100, 64, 64)


def test_cryodrgn_matrix_is_our_R(particles_dir, common_lines):
    """Common lines of the hand projections: cryoDRGN's matrices are R (not Rᵀ)."""
    table = table_from_stack(particles_dir / HAND / "hand.mrcs", poses=particles_dir / HAND / "hand_rot.pkl")
    rows = np.arange(0, 100, 3)
    images = ParticleDataset(table, normalize=False)[rows].images.numpy()
    r = table.pose.rotmat.numpy()[rows]
    good, bad = common_lines(r, images), common_lines(r.transpose(0, 2, 1), images)
    assert good > 0.97 and bad < good - 0.08


def test_star_to_cryodrgn_convention(particles_dir, tmp_path):
    """Poses written as cryoDRGN's parse_pose_star would: R_from_relion == R, trans = +origin_px / D."""
    star = read_star(particles_dir / "trpv1_cryojax/trpv1_small_stack.star")
    write_cryodrgn_poses(tmp_path / "pose.pkl", star.pose, box_size=48, pixel_size=4.88)
    rots, trans = pickle.load(open(tmp_path / "pose.pkl", "rb"))
    assert rots.shape == (10, 3, 3) and trans.shape == (10, 2)
    np.testing.assert_allclose(trans[0], np.array([-8.149219, -6.120969]) / 4.88 / 48, rtol=1e-6)
    back = read_cryodrgn_poses(tmp_path / "pose.pkl", box_size=48, pixel_size=4.88)
    torch.testing.assert_close(back.rotmat, star.pose.rotmat, atol=1e-6, rtol=0)
    torch.testing.assert_close(back.shift_angst, star.pose.shift_angst, atol=1e-5, rtol=1e-6)


def test_ctf_pickle_round_trip_and_rescale(particles_dir, tmp_path):
    star = read_star(particles_dir / "trpv1_cryojax/trpv1_small_stack.star")
    write_cryodrgn_ctf(tmp_path / "ctf.pkl", star.ctf, box_size=96, pixel_size=2.44)
    arr = pickle.load(open(tmp_path / "ctf.pkl", "rb"))
    assert arr.shape == (10, 9)
    np.testing.assert_allclose(arr[0], [96, 2.44, 14657.509766, 15222.730469, 53.749996, 300, 2.0, 0.1, 0.0],
                               rtol=1e-6)
    ctf, d, apix = read_cryodrgn_ctf(tmp_path / "ctf.pkl")
    for f in ("defocus_u", "defocus_v", "defocus_angle", "voltage_kv", "cs_mm", "amplitude_contrast"):
        torch.testing.assert_close(getattr(ctf, f), getattr(star.ctf, f).double(), rtol=1e-6, atol=1e-6)
    assert (d == 96).all()
    # the CTF pickle describes a 96-px box at 2.44 Å; the stack is 48 px -> 4.88 Å (cryoDRGN's rule)
    poses = tmp_path / "pose.pkl"
    write_cryodrgn_poses(poses, star.pose, box_size=48, pixel_size=4.88)
    table = table_from_stack(particles_dir / "trpv1_cryojax/trpv1_small_stack.mrcs", poses=poses,
                             ctf=tmp_path / "ctf.pkl")
    np.testing.assert_allclose(table.pixel_size, 4.88, rtol=1e-6)
    assert table.has_ctf
    torch.testing.assert_close(table.pose.shift_angst, star.pose.shift_angst, atol=1e-5, rtol=1e-6)


def test_bad_pickles(particles_dir, tmp_path):
    stack = particles_dir / HAND / "hand.mrcs"
    cases = {}
    p = tmp_path / "short.pkl"
    pickle.dump((np.tile(np.eye(3), (5, 1, 1)), np.zeros((5, 2))), open(p, "wb"))
    cases[p] = "100 images"
    p = tmp_path / "shape.pkl"
    pickle.dump((np.zeros((100, 3, 2)), np.zeros((100, 2))), open(p, "wb"))
    cases[p] = "shape"
    p = tmp_path / "junk.pkl"
    p.write_bytes(b"not a pickle")
    cases[p] = "pickle"
    p = tmp_path / "nan.pkl"
    rots = np.tile(np.eye(3), (100, 1, 1))
    rots[3, 0, 0] = np.nan
    pickle.dump(rots, open(p, "wb"))
    cases[p] = "NaN"
    for path, pattern in cases.items():
        with pytest.raises(CryoaceInputError, match=pattern) as err:
            table_from_stack(stack, poses=path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    bad_ctf = tmp_path / "ctf.pkl"
    pickle.dump(np.zeros((100, 8)), open(bad_ctf, "wb"))
    with pytest.raises(CryoaceInputError, match=r"\(N, 9\)") as err:
        table_from_stack(stack, ctf=bad_ctf)
    assert str(bad_ctf) in str(err.value)


def test_no_pixel_size_anywhere(tmp_path):
    from cryoace.io.mrc import write_mrc

    stack = tmp_path / "s.mrcs"
    write_mrc(stack, np.zeros((3, 8, 8), np.float32), voxel_size=0.0)
    with pytest.raises(CryoaceInputError, match="pixel size") as err:
        table_from_stack(stack)
    assert str(stack) in str(err.value)
    assert len(table_from_stack(stack, pixel_size=2.0)) == 3


def test_no_ctf_values_give_unit_ctf(particles_dir):
    ctf_mod = pytest.importorskip("cryoace.physics.ctf")
    from cryoace.physics.fourier import freq_grid_2d

    table = table_from_stack(particles_dir / HAND / "hand.mrcs")
    ctf = ctf_mod.compute_ctf(table.ctf[torch.arange(4)].to(torch.float32), freq_grid_2d(16),
                              torch.tensor(table.pixel_size[:4], dtype=torch.float32))
    torch.testing.assert_close(ctf, torch.ones_like(ctf))
    assert isinstance(table.ctf, CTFParams)
