"""Map → particles (library level): seeds, random parameter laws, chunk-independent noise, the two
projectors, and that the written images are exactly the shared forward model of the written metadata."""

from __future__ import annotations

import math

import mrcfile
import numpy as np
import pytest
import torch
import yaml

from cryoace.errors import CryoaceInputError
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.physics.forward import VoxelFourierVolume, render_images
from cryoace.simulate import particles as sim
from cryoace.simulate.molmap import molmap, read_model
from cryoace.simulate.presets import ADK_MODEL


@pytest.fixture(scope="module")
def adk32():
    """The shipped adenylate kinase at L = 32, 3 Å/px, 6 Å (small and fast)."""
    return molmap(read_model(ADK_MODEL), 32, 3.0, 6.0).data


def test_spawned_seeds_are_distinct_and_reproducible():
    a, b = sim.spawn_seeds(0), sim.spawn_seeds(0)
    assert a == b and set(a) == set(sim.SEED_PURPOSES)
    assert len(set(a.values())) == len(a)
    assert sim.spawn_seeds(1) != a


def test_noise_does_not_depend_on_chunking():
    whole = sim.noise_images(123, 0, 700, 8)
    parts = torch.cat([sim.noise_images(123, s, min(s + 97, 700), 8) for s in range(0, 700, 97)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sim.noise_images(124, 0, 700, 8))
    assert abs(float(whole.std()) - 1) < 0.02


def test_parameter_laws():
    seeds = sim.spawn_seeds(5)
    n = 4000
    pose = sim.draw_poses(n, 3.0, seeds)
    r = pose.rotmat
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(3, dtype=r.dtype).expand(n, 3, 3), atol=1e-10)
    assert torch.allclose(torch.linalg.det(r), torch.ones(n, dtype=r.dtype))
    assert float(r.mean(0).abs().max()) < 0.05  # Haar: E[R] = 0
    assert float(pose.shift_angst.std()) == pytest.approx(3.0, rel=0.05)
    cfg = sim.SimulationConfig(n=n, defocus_median=12000, defocus_spread=0.25, astigmatism=400)
    ctf = sim.draw_ctf(n, cfg, seeds["defocus"])
    mean = (ctf.defocus_u + ctf.defocus_v) / 2
    assert float(mean.median()) == pytest.approx(12000, rel=0.03)
    assert float(torch.log(mean).std()) == pytest.approx(0.25, rel=0.05)
    astig = ctf.defocus_u - ctf.defocus_v
    assert float(astig.min()) >= 0 and float(astig.max()) <= 400
    assert float(ctf.defocus_angle.min()) >= 0 and float(ctf.defocus_angle.max()) < math.pi


def test_fourier_and_real_projectors_agree(adk32):
    seeds = sim.spawn_seeds(0)
    pose = sim.draw_poses(6, 4.0, seeds)
    ctf = sim.draw_ctf(6, sim.SimulationConfig(n=6, defocus_median=8000), seeds["defocus"])
    vol = torch.from_numpy(adk32)
    a = sim.ParticleRenderer(vol, 3.0, "fourier")(pose, ctf)
    b = sim.ParticleRenderer(vol, 3.0, "real")(pose, ctf)
    for x, y in zip(a, b, strict=True):
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.98


def test_written_images_are_the_forward_model_of_the_written_metadata(adk32, tmp_path):
    cfg = sim.SimulationConfig(n=40, snr_db=None, shift_std_angst=3.0, defocus_median=8000,
                               astigmatism=300, seed=3)
    res = sim.simulate_dataset(adk32, 3.0, tmp_path / "out", cfg, progress=False)
    table = read_particles(res.star)
    batch = ParticleDataset(table, normalize=False)[np.arange(40)]
    volume = VoxelFourierVolume.from_real(torch.from_numpy(adk32), pad_factor=2)
    expected = render_images(volume, batch.pose, batch.pixel_size, 32, batch.ctf)
    assert torch.allclose(batch.images, expected, atol=1e-4 * float(expected.abs().max()))
    # and the metadata are the truth drawn from the recorded seeds (up to the table's float32 storage)
    truth = sim.draw_poses(40, 3.0, sim.spawn_seeds(3))
    assert torch.allclose(table.pose.rotmat, truth.rotmat, atol=1e-6)
    assert torch.allclose(table.pose.shift_angst, truth.shift_angst, atol=1e-6)
    record = yaml.safe_load(res.config_yaml.read_text())
    assert {k: record["seeds"][k] for k in sim.SEED_PURPOSES} == sim.spawn_seeds(3)
    with mrcfile.open(res.volume, permissive=True) as m:
        np.testing.assert_array_equal(m.data, adk32)


def test_snr_with_a_pilot_smaller_than_the_dataset(adk32, tmp_path, monkeypatch):
    """σ comes from the first PILOT_IMAGES images; on the whole dataset the SNR is still as asked."""
    monkeypatch.setattr(sim, "PILOT_IMAGES", 200)
    common = dict(n=900, shift_std_angst=3.0, defocus_median=8000, astigmatism=300, seed=11, batch_size=128)
    clean = sim.simulate_dataset(adk32, 3.0, tmp_path / "clean", sim.SimulationConfig(snr_db=None, **common),
                                 progress=False)
    noisy = sim.simulate_dataset(adk32, 3.0, tmp_path / "noisy", sim.SimulationConfig(snr_db=-6.0, **common),
                                 progress=False)
    c = mrcfile.open(clean.stacks[0]).data.astype(np.float64)
    y = mrcfile.open(noisy.stacks[0]).data.astype(np.float64)
    snr = c.var(axis=(1, 2)).mean() / (y - c).var()
    assert snr == pytest.approx(10 ** -0.6, rel=0.05)
    assert (y - c).std() == pytest.approx(noisy.noise_sigma, rel=0.01)
    assert yaml.safe_load(noisy.config_yaml.read_text())["noise"]["pilot_images"] == 200


def test_bad_configurations_are_input_errors(adk32, tmp_path):
    for bad in (dict(n=0), dict(n=-3), dict(n=5, shift_std_angst=-1), dict(n=5, defocus_median=0),
                dict(n=5, amplitude_contrast=1.5), dict(n=5, projector="ray"), dict(n=5, seed=-1),
                dict(n=5, astigmatism=20000.0)):
        with pytest.raises(CryoaceInputError):
            sim.simulate_dataset(adk32, 3.0, tmp_path / "bad", sim.SimulationConfig(**bad), progress=False)
    with pytest.raises(CryoaceInputError):
        sim.simulate_dataset(adk32, -3.0, tmp_path / "bad", sim.SimulationConfig(n=5), progress=False)
    assert not (tmp_path / "bad").exists()
