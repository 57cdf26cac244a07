"""``cryoace simulate`` and ``cryoace molmap`` end to end (in-process through the dispatcher):
backprojection of simulated particles with their true poses, measured SNR, star files that other
readers accept, reproducibility, presets, RELION interop, and one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import starfile
import torch
import yaml

from cryoace.cli.main import main as cli
from cryoace.evaluate.fsc import fsc
from cryoace.io.mrc import read_volume
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.physics.rotations import euler_relion_to_rotmat
from cryoace.simulate import particles as sim
from cryoace.simulate.presets import ADK_MODEL

from conftest import TEST_DATA  # noqa: E402

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"
RELION = TEST_DATA / "particles" / "relion_project_aspire"
SMALL = ["--box", "32", "--pixel-size", "3", "--resolution", "6"]  # adk at L = 32 from the shipped model


def _run(args) -> int:
    return cli(["simulate", *map(str, args), "--quiet"])


def _stack(out) -> np.ndarray:
    with mrcfile.open(out / "particles.mrcs", permissive=True) as m:
        return m.data.copy()


# -- physics end to end -------------------------------------------------------------------------

def test_noise_free_particles_backproject_to_the_source_map(tmp_path):
    out = tmp_path / "sim"
    assert _run([ADK_L64, "-o", out, "-n", 300, "--noise-free", "--shift-std", 3, "--defocus-median", 5000,
                 "--astigmatism", 200, "--seed", 1]) == 0
    assert cli(["backproject", str(out / "particles.star"), "-o", str(tmp_path / "bp.mrc"), "--quiet"]) == 0
    truth = read_volume(ADK_L64).data
    np.testing.assert_array_equal(read_volume(out / "volume.mrc").data, truth)
    recon = read_volume(tmp_path / "bp.mrc").data.copy()
    result = fsc(torch.from_numpy(truth.copy()), torch.from_numpy(recon), voxel_size=1.5)
    assert result.resolution(0.5).px <= 2.0 / 0.9  # FSC >= 0.5 to at least 0.9 x Nyquist


def test_measured_snr_equals_requested(tmp_path):
    args = [ADK_MODEL, *SMALL, "-n", 600, "--shift-std", 3, "--defocus-median", 8000, "--seed", 4]
    assert _run([*args, "-o", tmp_path / "clean", "--noise-free"]) == 0
    assert _run([*args, "-o", tmp_path / "noisy", "--snr-db", -10]) == 0
    clean = _stack(tmp_path / "clean").astype(np.float64)
    noise = _stack(tmp_path / "noisy").astype(np.float64) - clean
    snr = clean.var(axis=(1, 2)).mean() / noise.var()
    assert snr == pytest.approx(0.1, rel=0.05)
    record = yaml.safe_load((tmp_path / "noisy" / "simulation.yaml").read_text())
    assert noise.std() == pytest.approx(record["noise"]["sigma"], rel=0.01)
    assert record["noise"]["snr_db"] == -10 and record["parameters"]["n"] == 600


def test_star_file_reads_back_with_starfile_and_cryoace(tmp_path):
    out = tmp_path / "sim"
    assert _run([ADK_MODEL, *SMALL, "-o", out, "-n", 50, "--snr-db", 0, "--shift-std", 2, "--astigmatism", 300,
                 "--defocus-median", 9000, "--seed", 9]) == 0
    blocks = starfile.read(out / "particles.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    assert len(optics) == 1 and float(optics["rlnImagePixelSize"][0]) == 3.0
    assert int(optics["rlnImageSize"][0]) == 32 and float(optics["rlnVoltage"][0]) == 300
    for col in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnRandomSubset"):
        assert col in parts.columns
    assert parts["rlnRandomSubset"].tolist() == [1, 2] * 25
    assert parts["rlnImageName"].iloc[0] == "000001@particles.mrcs"
    # the truth, from the recorded seeds (written as the particle table stores it: float32)
    truth = sim.draw_poses(50, 2.0, sim.spawn_seeds(9))
    rot, tilt, psi = (torch.tensor(np.deg2rad(parts[c].to_numpy())) for c in
                      ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    assert torch.allclose(euler_relion_to_rotmat(rot, tilt, psi), truth.rotmat, atol=1e-6)
    table = read_particles(out / "particles.star")
    assert torch.allclose(table.pose.rotmat, truth.rotmat, atol=1e-6)
    assert torch.allclose(table.pose.shift_angst, truth.shift_angst, atol=1e-6)
    truth_ctf = sim.draw_ctf(50, sim.SimulationConfig(n=50, defocus_median=9000, astigmatism=300),
                             sim.spawn_seeds(9)["defocus"])
    assert torch.allclose(table.ctf.defocus_u.double(), truth_ctf.defocus_u) and table.has_ctf
    assert torch.allclose(table.ctf.defocus_angle.double(), truth_ctf.defocus_angle)
    batch = ParticleDataset(table, normalize=False)[np.arange(50)]
    np.testing.assert_array_equal(batch.images.numpy(), _stack(out))


def test_same_seed_same_stacks_other_seed_different(tmp_path):
    base = [ADK_MODEL, *SMALL, "-n", 30, "--snr-db", -5, "--shift-std", 2]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert _run([*base, "--seed", seed, "-o", tmp_path / name]) == 0
    a, b, c = (_stack(tmp_path / n) for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a" / "particles.star").read_text().split("\n", 1)[1] == \
        (tmp_path / "b" / "particles.star").read_text().split("\n", 1)[1]  # bar the timestamp line
    assert not np.allclose(a, c)


def test_several_stacks_hold_the_same_dataset(tmp_path):
    base = [ADK_MODEL, *SMALL, "-n", 100, "--snr-db", -5, "--seed", 2]
    assert _run([*base, "-o", tmp_path / "one"]) == 0
    assert _run([*base, "-o", tmp_path / "many", "--stack-size", 40, "--batch-size", 16]) == 0
    names = sorted(p.name for p in (tmp_path / "many").glob("*.mrcs"))
    assert names == ["particles_000.mrcs", "particles_001.mrcs", "particles_002.mrcs"]
    parts = [mrcfile.open(tmp_path / "many" / n).data for n in names]
    assert [len(p) for p in parts] == [40, 40, 20]
    np.testing.assert_array_equal(np.concatenate(parts), _stack(tmp_path / "one"))
    table = read_particles(tmp_path / "many" / "particles.star")
    images = ParticleDataset(table, normalize=False)[np.arange(100)].images.numpy()
    np.testing.assert_array_equal(images, _stack(tmp_path / "one"))
    with mrcfile.open(tmp_path / "many" / names[0], header_only=True) as m:
        assert m.voxel_size.x == pytest.approx(3.0) and m.header.ispg == 0  # an image stack
        assert float(m.header.dmax) == pytest.approx(float(parts[0].max()))


def test_invert_contrast_and_no_ctf(tmp_path):
    base = [ADK_MODEL, *SMALL, "-n", 10, "--noise-free", "--no-ctf"]
    assert _run([*base, "-o", tmp_path / "pos"]) == 0
    assert _run([*base, "-o", tmp_path / "neg", "--invert-contrast"]) == 0
    pos, neg = _stack(tmp_path / "pos"), _stack(tmp_path / "neg")
    np.testing.assert_array_equal(neg, -pos)
    assert pos.sum(axis=(1, 2)).min() > 0  # particles white without a CTF
    assert not read_particles(tmp_path / "pos" / "particles.star").has_ctf


def test_poses_from_relion_star_reproduce_relion_project(tmp_path):
    """relion_project's own images of the 70S map (with shifts) are what the simulator makes from
    the same map and poses: the Euler, matrix and origin conventions agree with RELION."""
    out = tmp_path / "rln"
    assert _run([RELION / "clean70SRibosome_vol_64_aspire_downsampled.mrc", "-o", out, "--poses-from",
                 RELION / "rln_proj_64_shifted.star", "--no-ctf", "--noise-free"]) == 0
    with mrcfile.open(RELION / "rln_proj_64_shifted.mrcs", permissive=True) as m:
        relion = m.data.copy()
    ours = _stack(out)
    assert ours.shape == relion.shape
    for x, y in zip(ours, relion, strict=True):
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99
    given = read_particles(RELION / "rln_proj_64_shifted.star", pixel_size=1.0)
    written = read_particles(out / "particles.star")
    assert torch.allclose(written.pose.rotmat, given.pose.rotmat, atol=1e-9)
    assert torch.allclose(written.pose.shift_angst, given.pose.shift_angst, atol=1e-9)


# -- presets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["demo", "adk"])
def test_adk_presets_need_no_model(preset, tmp_path):
    out = tmp_path / preset
    assert _run(["--preset", preset, "-o", out, "-n", 8]) == 0
    record = yaml.safe_load((out / "simulation.yaml").read_text())
    assert record["preset"] == preset and record["box_size"] == 64 and record["pixel_size_angst"] == 1.5
    assert record["noise"]["snr_db"] == -10 and record["n_particles"] == 8
    vol = read_volume(out / "volume.mrc")
    ref = read_volume(ADK_L64)
    assert np.corrcoef(vol.data.ravel(), ref.data.ravel())[0, 1] > 0.95 and vol.voxel_size == 1.5


def test_spike_preset_with_the_test_data_model(tmp_path):
    out = tmp_path / "spike"
    assert _run([TEST_DATA / "models" / "6vyb.cif.gz", "--preset", "spike", "-o", out, "-n", 4,
                 "--noise-free"]) == 0
    record = yaml.safe_load((out / "simulation.yaml").read_text())
    assert record["box_size"] == 128 and record["pixel_size_angst"] == 3.0 and record["noise"]["sigma"] == 0
    assert _stack(out).shape == (4, 128, 128)


def test_demo_preset_default_size_is_a_few_thousand():
    from cryoace.simulate.presets import PRESETS

    assert 1000 <= PRESETS["demo"].n <= 5000 and PRESETS["demo"].box == 64


# -- molmap command ---------------------------------------------------------------------------

def test_molmap_command_writes_an_overlaying_map(tmp_path, capsys):
    out = tmp_path / "adk.mrc"
    assert cli(["molmap", str(TEST_DATA / "models" / "adk_open_4ake_chainA_mdanalysis.pdb"), "-o", str(out),
                "--box", "64", "--pixel-size", "1.5", "--resolution", "6"]) == 0
    with mrcfile.open(out) as m, mrcfile.open(ADK_L64) as ref:
        assert m.voxel_size.x == pytest.approx(1.5) and m.data.shape == (64, 64, 64)
        assert np.corrcoef(m.data.ravel(), ref.data.ravel())[0, 1] >= 0.95
        for a in "xyz":
            assert float(m.header.origin[a]) == pytest.approx(float(ref.header.origin[a]), abs=0.5)
    assert cli(["molmap", str(ADK_MODEL), "-o", str(tmp_path / "fit.mrc"), "--pixel-size", "2",
                "--resolution", "8"]) == 0  # default box: fitted


# -- bad input ------------------------------------------------------------------------------------

BAD = {
    "unknown preset": (["--preset", "ribosome"], "unknown preset"),
    "unreadable model": (["{garbage}", "--pixel-size", "2", "--resolution", "6", "-n", "5", "--noise-free"],
                         "garbage.pdb"),
    "missing model": (["{missing}", "--pixel-size", "2", "--resolution", "6", "-n", "5", "--noise-free"],
                      "not found"),
    "box smaller than molecule": ([str(ADK_MODEL), "--box", "16", "--pixel-size", "2", "--resolution", "6",
                                   "-n", "5", "--noise-free"], "smaller than the molecule"),
    "zero pixel size": ([str(ADK_MODEL), "--pixel-size", "0", "--resolution", "6", "-n", "5", "--noise-free"],
                        "pixel-size"),
    "negative pixel size": ([str(ADK_MODEL), "--pixel-size", "-1.5", "--resolution", "6", "-n", "5",
                             "--noise-free"], "pixel-size"),
    "negative N": (["--preset", "demo", "-n", "-5"], "-n"),
    "zero N": (["--preset", "demo", "-n", "0"], "-n"),
    "spike without model": (["--preset", "spike"], "6vyb"),
    "no noise level": ([str(ADK_MODEL), *SMALL, "-n", "5"], "--snr-db"),
    "map with molmap options": ([str(ADK_L64), "--box", "64", "-n", "5", "--noise-free"], "already a map"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_no_output(case, tmp_path, capsys):
    args, needle = BAD[case]
    garbage = tmp_path / "garbage.pdb"
    garbage.write_bytes(b"\x00\x01 definitely not a model \xff" * 10)
    args = [a.format(garbage=garbage, missing=tmp_path / "missing.pdb") for a in args]
    out = tmp_path / "out"
    assert cli(["simulate", *args, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("simulating")]
    assert len(err) == 1 and needle.lower() in err[0].lower(), err
    assert not out.exists()


def test_molmap_bad_input_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "m.mrc"
    for args in ([str(ADK_MODEL), "--box", "16", "--pixel-size", "2", "--resolution", "6"],
                 [str(ADK_MODEL), "--pixel-size", "-2", "--resolution", "6"],
                 [str(ADK_MODEL), "--pixel-size", "2", "--resolution", "0"],
                 [str(tmp_path / "nope.cif"), "--pixel-size", "2", "--resolution", "6"]):
        assert cli(["molmap", *args, "-o", str(out)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not out.exists()


def test_existing_dataset_needs_overwrite(tmp_path, capsys):
    base = [ADK_MODEL, *SMALL, "-n", 5, "--noise-free", "-o", tmp_path / "d"]
    assert _run(base) == 0
    assert _run(base) == 2 and "--overwrite" in capsys.readouterr().err
    assert _run([*base, "--overwrite"]) == 0


def test_subprocess_error_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cryoace", "simulate", "--preset", "nope", "-o",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
