"""The particle-input options of every command that reads particles: --pixel-size, cryoDRGN's
``particles.mrcs --ctf ctf.pkl --poses pose.pkl``, --ind and --first (cli/particle_input.py)."""

from __future__ import annotations

import argparse
import pickle

import numpy as np
import pytest
import torch

from cryoace.cli.particle_input import add_particle_input_args, open_particle_table
from cryoace.errors import CryoaceInputError
from cryoace.io.cryodrgn import read_cryodrgn_ctf, read_cryodrgn_poses, read_index_file, write_cryodrgn_ctf
from cryoace.io.cryosparc import read_cs
from cryoace.io.mrc import open_mrc
from cryoace.io.particles import read_particles
from cryoace.types import CTFParams

HAND = "cryodrgn_hand"


def _args(argv: list[str], **extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_particle_input_args(parser)
    args = parser.parse_args(argv)
    for k, v in extra.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def hand(particles_dir):
    return particles_dir / HAND / "hand.mrcs", particles_dir / HAND / "hand_rot.pkl"


@pytest.fixture
def ctf_pkl(tmp_path):
    """A cryoDRGN CTF pickle for the 100 hand images (64 px at 3 Å), defocus varying per particle."""
    n = 100
    ctf = CTFParams.create(defocus_u=torch.linspace(10000, 20000, n, dtype=torch.float64),
                           defocus_v=torch.linspace(9500, 19500, n, dtype=torch.float64),
                           defocus_angle=torch.full((n,), 0.3, dtype=torch.float64),
                           voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, phase_shift=0.0,
                           bfactor=0.0, dtype=torch.float64)
    path = tmp_path / "ctf.pkl"
    write_cryodrgn_ctf(path, ctf, box_size=64, pixel_size=3.0)
    # cryoDRGN's layout (io/cryodrgn.py): (N, 9) [D, Apix, dfU, dfV, dfang°, kV, Cs, w, phase°]
    arr = pickle.load(open(path, "rb"))
    assert arr.shape == (n, 9)
    np.testing.assert_allclose(arr[7], [64, 3.0, ctf.defocus_u[7], ctf.defocus_v[7], np.rad2deg(0.3), 300, 2.7,
                                        0.1, 0], rtol=1e-6)
    return path


# --- --pixel-size ---------------------------------------------------------------------------------

def test_pixel_size_for_a_star_file_without_one(run_cli, particles_dir, tmp_path):
    """relion_project's star file has no pixel size: refused with a pointer to --pixel-size, accepted with it."""
    star = particles_dir / "relion_project_aspire" / "rln_proj_64.star"
    rc, _, err = run_cli("backproject", star, "-o", tmp_path / "a.mrc", "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--pixel-size" in err
    assert not (tmp_path / "a.mrc").exists()
    rc, out, err = run_cli("backproject", star, "-o", tmp_path / "a.mrc", "--quiet", "--pixel-size", "5")
    assert rc == 0, err
    assert open_mrc(tmp_path / "a.mrc").voxel_size == pytest.approx(5.0) and "note" not in err


def test_pixel_size_differing_from_the_file_wins_with_one_note(particles_dir):
    star = particles_dir / "trpv1_cryojax" / "trpv1_small_stack.star"  # 4.88 Å/px, origins in Å
    notes = []
    table = open_particle_table(_args(["--pixel-size", "5"]), star, note=notes.append)
    assert np.allclose(table.pixel_size, 5.0)
    assert len(notes) == 1 and "5 Å/px replaces the 4.88 Å/px" in notes[0] and str(star) in notes[0]
    notes.clear()
    table = open_particle_table(_args(["--pixel-size", "4.88"]), star, note=notes.append)
    assert np.allclose(table.pixel_size, 4.88) and notes == []
    with pytest.raises(CryoaceInputError, match="--pixel-size must be a positive"):
        open_particle_table(_args(["--pixel-size", "-1"]), star)


def test_pixel_size_rescales_shifts_given_in_pixels(particles_dir):
    """relion_project's shifted particles have origins in px: the Å shifts follow the pixel size used."""
    star = particles_dir / "relion_project_aspire" / "rln_proj_64_shifted.star"
    own = read_particles(star)
    assert own.pose.shift_angst.abs().max() > 1
    table = open_particle_table(_args(["--pixel-size", "2.62"]), star, note=lambda m: None)
    scale = 2.62 / own.pixel_size[0]
    torch.testing.assert_close(table.pose.shift_angst, own.pose.shift_angst * scale, rtol=1e-5, atol=1e-5)


# --- --ind / --first ------------------------------------------------------------------------------

def test_index_files_pickle_and_text(tmp_path):
    with open(tmp_path / "ind.pkl", "wb") as fh:
        pickle.dump(np.array([9, 2, 4], dtype=np.int64), fh)
    (tmp_path / "ind.txt").write_text("9 2\n# a comment\n4,\n")
    for name in ("ind.pkl", "ind.txt"):
        assert read_index_file(tmp_path / name, 10).tolist() == [9, 2, 4]
    with pytest.raises(CryoaceInputError, match=r"index 9 \(entry 1 of 3\) is out of range: the particle file "
                                                r"has 3 particles, indices 0 to 2 \(2 of the 3 are\)"):
        read_index_file(tmp_path / "ind.pkl", 3)
    (tmp_path / "neg.txt").write_text("1 -3")
    with pytest.raises(CryoaceInputError, match="index -3"):
        read_index_file(tmp_path / "neg.txt", 5)
    (tmp_path / "words.txt").write_text("1 two 3")
    with pytest.raises(CryoaceInputError, match="'two' is not a particle index"):
        read_index_file(tmp_path / "words.txt", 5)
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump(np.zeros((2, 2)), fh)
    with pytest.raises(CryoaceInputError, match="1-D array of integer"):
        read_index_file(tmp_path / "bad.pkl", 5)


def test_ind_then_first_select_rows_in_order(hand, tmp_path):
    stack, poses = hand
    (tmp_path / "ind.txt").write_text("50 3 77 12")
    table = open_particle_table(_args(["--ind", str(tmp_path / "ind.txt"), "--first", "3"]), stack, poses=poses)
    assert table.image_indices.tolist() == [50, 3, 77]
    raw = pickle.load(open(poses, "rb"))
    np.testing.assert_allclose(table.pose.rotmat.numpy(), raw[[50, 3, 77]], atol=1e-6)
    with pytest.raises(CryoaceInputError, match="--first must be a positive"):
        open_particle_table(_args(["--first", "0"]), stack)


def test_out_of_range_index_is_one_line_exit_2(run_cli, hand, tmp_path):
    stack, poses = hand
    (tmp_path / "ind.txt").write_text("0 100")
    rc, _, err = run_cli("backproject", stack, "--poses", poses, "--ind", tmp_path / "ind.txt", "-o",
                         tmp_path / "m.mrc", "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "ind.txt: index 100 (entry 2 of 2) is out of range: the particle file has 100 particles" in err
    assert not (tmp_path / "m.mrc").exists()


def test_backproject_subset_equals_backprojecting_the_subset(run_cli, hand, tmp_path):
    """--ind picks exactly those images: the map equals the one from a stack of only those images."""
    import mrcfile

    stack, poses = hand
    rows = [5, 17, 42, 64, 80, 99, 1, 33]
    (tmp_path / "ind.txt").write_text(" ".join(map(str, rows)))
    rc, out, err = run_cli("backproject", stack, "--poses", poses, "--ind", tmp_path / "ind.txt", "-o",
                           tmp_path / "sub.mrc", "--quiet", "--device", "cpu")
    assert rc == 0, err
    assert out.startswith("8 particles")
    with mrcfile.open(stack) as m:
        images = m.data[rows]
    with mrcfile.new(tmp_path / "only.mrcs") as m:
        m.set_data(images.astype(np.float32))
        m.voxel_size = 1.0
    with open(tmp_path / "only.pkl", "wb") as fh:
        pickle.dump(pickle.load(open(poses, "rb"))[rows], fh)
    rc, _, err = run_cli("backproject", tmp_path / "only.mrcs", "--poses", tmp_path / "only.pkl", "-o",
                         tmp_path / "only.mrc", "--quiet", "--device", "cpu")
    assert rc == 0, err
    np.testing.assert_allclose(open_mrc(tmp_path / "sub.mrc").data, open_mrc(tmp_path / "only.mrc").data,
                               atol=1e-5 * float(np.abs(open_mrc(tmp_path / "only.mrc").data).max()))


# --- cryoDRGN input through reconstruct, predict-poses and evaluate -------------------------------

def test_ctf_or_poses_pickle_with_a_star_file_is_refused(particles_dir, ctf_pkl):
    star = particles_dir / "trpv1_cryojax" / "trpv1_small_stack.star"
    with pytest.raises(CryoaceInputError, match="--ctf goes with an .mrcs stack"):
        open_particle_table(_args(["--ctf", str(ctf_pkl)]), star)


def test_cryodrgn_input_trains_with_its_ctf(run_cli, hand, ctf_pkl, tmp_path, one_thread):
    """reconstruct hand.mrcs --ctf ctf.pkl --poses pose.pkl --ind: the CTF is used in training and
    written to poses.star for the selected particles; predict-poses and evaluate read the same input;
    a resumed run reads the same particles without the options given again."""
    stack, poses = hand
    rows = np.arange(3, 100, 4)  # 25 particles
    (tmp_path / "ind.txt").write_text("\n".join(map(str, rows)))
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--batch-size", "5", "--downsample", "32", "--volume-every", "0",
              "--device", "cpu", "--no-check-contrast", "--no-tensorboard"]
    rc, out, err = run_cli("reconstruct", stack, "--ctf", ctf_pkl, "--poses", poses, "--ind", tmp_path / "ind.txt",
                           "-o", run, "--steps", "4", "--export-poses", "cs,pkl", *common)
    assert rc == 0, err
    assert "25 particles, box 32 px at 6 Å/px, CTF on" in err  # 3 Å/px from ctf.pkl, downsampled 64 -> 32
    written = read_particles(run / "poses.star")
    ctf, _, _ = read_cryodrgn_ctf(ctf_pkl)
    assert written.has_ctf and written.image_indices.tolist() == rows.tolist()
    np.testing.assert_allclose(written.ctf.defocus_u.numpy(), ctf.defocus_u.numpy()[rows], rtol=1e-6)
    np.testing.assert_allclose(written.ctf.defocus_v.numpy(), ctf.defocus_v.numpy()[rows], rtol=1e-6)
    assert written.pixel_size == pytest.approx(3.0)
    # --export-poses: the same poses as cryoSPARC .cs and cryoDRGN pose.pkl (64-px box at 3 Å/px)
    cs = read_cs(run / "poses.cs")
    torch.testing.assert_close(cs.pose.rotmat, written.pose.rotmat, atol=2e-6, rtol=0)
    torch.testing.assert_close(cs.pose.shift_angst, written.pose.shift_angst, atol=1e-4, rtol=1e-5)
    assert cs.stack_paths == written.stack_paths and cs.image_indices.tolist() == rows.tolist()
    pkl = read_cryodrgn_poses(run / "pose.pkl", box_size=64, pixel_size=3.0, count=len(rows))
    torch.testing.assert_close(pkl.rotmat, written.pose.rotmat, atol=2e-6, rtol=0)
    torch.testing.assert_close(pkl.shift_angst, written.pose.shift_angst, atol=1e-4, rtol=1e-5)

    # predict-poses on the same cryoDRGN input gives the run's poses
    rc, _, err = run_cli("predict-poses", run, stack, "--ctf", ctf_pkl, "--ind", tmp_path / "ind.txt",
                         "-o", tmp_path / "pred.star", "--device", "cpu", "--quiet")
    assert rc == 0, err
    pred = read_particles(tmp_path / "pred.star")
    torch.testing.assert_close(pred.pose.rotmat, written.pose.rotmat, atol=1e-4, rtol=0)
    for name in ("pred.cs", "pred.pkl"):  # the format follows the output's suffix
        rc, _, err = run_cli("predict-poses", run, stack, "--ctf", ctf_pkl, "--ind", tmp_path / "ind.txt",
                             "-o", tmp_path / name, "--device", "cpu", "--quiet")
        assert rc == 0, err
    torch.testing.assert_close(read_cs(tmp_path / "pred.cs").pose.rotmat, pred.pose.rotmat, atol=1e-5, rtol=0)
    from_pkl = read_cryodrgn_poses(tmp_path / "pred.pkl", box_size=64, pixel_size=3.0)
    torch.testing.assert_close(from_pkl.rotmat, pred.pose.rotmat, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_pkl.shift_angst, pred.pose.shift_angst, atol=1e-4, rtol=1e-5)

    # evaluate against the cryoDRGN truth: paired by image, 25 particles
    rc, out, err = run_cli("evaluate", run, "--truth", stack, "--truth-poses", poses, "--json", "-")
    assert rc == 0, err
    import json

    from_star = json.loads(out)
    assert from_star["n_particles"] == 25
    # the exported pose.pkl of those 25 particles, paired row by row: the same errors
    rc, out, err = run_cli("evaluate", run, "--truth", stack, "--truth-poses", poses, "--ind", tmp_path / "ind.txt",
                           "--poses", run / "pose.pkl", "--json", "-")
    assert rc == 0, err
    from_pkl = json.loads(out)
    assert from_pkl["n_particles"] == 25
    assert from_pkl["rotation_error"]["mean_sq_frobenius"] == pytest.approx(
        from_star["rotation_error"]["mean_sq_frobenius"], abs=1e-4)

    # resume without the input options: the recorded ones are used (CTF on, the same 25 particles)
    rc, _, err = run_cli("reconstruct", stack, "-o", run, "--resume", "--steps", "6", "--device", "cpu")
    assert rc == 0, err
    assert "25 particles, box 32 px at 6 Å/px, CTF on" in err
    rc, _, err = run_cli("reconstruct", stack, "-o", run, "--resume", "--steps", "8", "--first", "3")
    assert rc == 2 and "--first 3 differs from the run's None; a resumed run reads the same particles" in err
