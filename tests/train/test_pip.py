"""ACE-EM's pose-image-pose task: zero loss for a perfect encoder on noise-free renders (including the
180°-rotated inputs with their (D·R, −t) targets), a frozen decoder gets no gradient, the noise level
from the background and from an SNR, the λ schedule, and the training-time pose monitor."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.physics.band import HalfDiscGrid
from cryoace.physics.forward import VoxelFourierVolume, render_spectra
from cryoace.physics.fourier import freq_grid_2d_half, rfft2_centered
from cryoace.physics.rotations import random_rotmat
from cryoace.train.monitor import PoseMonitor
from cryoace.train.pip import background_noise_std, pip_loss, pip_weight
from cryoace.train.trainer import STEP_STATS, Trainer
from cryoace.types import CTFParams, Pose

from helpers import adk_volume
from helpers import tiny_config as tiny

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
D = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64))


class OracleEncoder(torch.nn.Module):
    """A perfect encoder for images rendered with known poses: it recognises each input as the render
    of (R, t) or of its 180° turn (D·R, −t) and answers with that pose."""

    def __init__(self, volume, pose, pixel_size, size, ctf):
        super().__init__()
        self.candidates = [pose, Pose(D @ pose.rotmat, -pose.shift_angst)]
        self.renders = [_disc_render(volume, p, pixel_size, size, ctf) for p in self.candidates]

    def forward(self, images):
        errors = torch.stack([(images - r).flatten(1).norm(dim=1) for r in self.renders])
        pick = errors.argmin(0)
        rotmat = torch.stack([c.rotmat for c in self.candidates])[pick, torch.arange(len(pick))]
        shift = torch.stack([c.shift_angst for c in self.candidates])[pick, torch.arange(len(pick))]
        return Pose(rotmat, shift)


def _disc_render(volume, pose, pixel_size, size, ctf, radius_cyc_px=0.5):
    """Images rendered inside the disc |k| <= radius (zero outside), as PIP renders them."""
    grid = HalfDiscGrid(size, dtype=F64, radius_cyc_px=radius_cyc_px)
    return grid.images(render_spectra(volume, pose, pixel_size, size, ctf, freq_cyc_px=grid.freq))


def _setup(n=8, size=32, pixel_size=1.5, seed=0):
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(seed)
    pose = Pose(random_rotmat(n, g, F64), torch.randn(n, 2, generator=g, dtype=F64) * 2.0)
    ctf = CTFParams.create(defocus_u=torch.linspace(3000, 9000, n, dtype=F64),
                           defocus_v=torch.linspace(2800, 8500, n, dtype=F64),
                           defocus_angle=torch.linspace(0, 2, n, dtype=F64))
    return volume, pose, ctf, torch.full((n,), pixel_size, dtype=F64)


def test_pip_loss_is_zero_for_a_perfect_encoder_on_noise_free_renders():
    volume, pose, ctf, ps = _setup()
    oracle = OracleEncoder(volume, pose, ps, 32, ctf)
    torch.manual_seed(1)
    out = pip_loss(oracle, volume, ctf, ps, 32, pose=pose, symmetric=True)
    assert out.loss.item() < 1e-20
    # some inputs really were turned by 180° (so the (D·R, −t) targets were exercised)
    turned = [not torch.allclose(out.images[i], oracle.renders[0][i]) for i in range(len(ps))]
    assert 0 < sum(turned) < len(ps)
    # a wrong encoder is penalised: the identity rotation everywhere
    wrong = Pose(torch.eye(3, dtype=F64).expand(len(ps), 3, 3), pose.shift_angst)
    bad = pip_loss(lambda images: wrong, volume, ctf, ps, 32, pose=pose, symmetric=False)
    assert math.isclose(bad.loss.item(), (pose.rotmat - torch.eye(3, dtype=F64)).pow(2).sum((-2, -1)).mean().item())
    # a wrong shift by 1 px in x adds exactly 1 px² to the loss
    off = Pose(pose.rotmat, pose.shift_angst + torch.tensor([1.5, 0.0], dtype=F64))
    shifted = pip_loss(lambda images: off, volume, ctf, ps, 32, pose=pose, symmetric=False)
    assert shifted.shift.item() == pytest.approx(1.0) and shifted.rotation.item() < 1e-20


@pytest.mark.parametrize("radius", [0.125, 0.5])
def test_pip_images_are_band_limited_to_the_loss_band_and_the_nyquist_disc(radius):
    """PIP renders have no energy outside the trainer's loss band (nor, at full band, in the corners
    beyond Nyquist), where the decoder is untrained (issue 14); inside they equal the decoder's slice."""
    volume, pose, ctf, ps = _setup()
    grid = HalfDiscGrid(32, dtype=F64, radius_cyc_px=radius)
    torch.manual_seed(0)
    out = pip_loss(lambda images: pose, volume, ctf, ps, 32, pose=pose, symmetric=False, grid=grid)
    spectra = rfft2_centered(out.images)
    k = freq_grid_2d_half(32, dtype=F64).norm(dim=-1)
    outside = spectra[:, k > radius + 1e-9].abs().pow(2).sum() / spectra.abs().pow(2).sum()
    assert outside.item() < 1e-20
    expected = render_spectra(volume, pose, ps, 32, ctf, half=True)
    inside = k <= radius
    exact = k < min(radius + 1e-9, 0.5 - 1e-9)  # the Nyquist points (0, ±0.5), (0.5, 0) are not self-mirror
    torch.testing.assert_close(spectra[:, exact], expected[:, exact], rtol=1e-9, atol=1e-9)
    # the decoder does have energy out there: the full-grid render would put it into the PIP images
    assert (expected[:, ~inside].abs().pow(2).sum() / expected.abs().pow(2).sum()).item() > 1e-7


def test_pip_noise_from_snr_and_from_the_background():
    volume, pose, ctf, ps = _setup(n=16)
    oracle = OracleEncoder(volume, pose, ps, 32, ctf)
    clean = oracle.renders[0]
    torch.manual_seed(2)
    out = pip_loss(oracle, volume, ctf, ps, 32, pose=pose, snr_db=-10.0, symmetric=False)
    noise = out.images - clean
    snr = clean.var(dim=(1, 2)).mean() / noise.var()
    assert 10 * math.log10(snr) == pytest.approx(-10.0, abs=0.3)
    torch.manual_seed(3)
    out = pip_loss(oracle, volume, ctf, ps, 32, pose=pose, noise_std=0.7, symmetric=False)
    assert (out.images - clean).std().item() == pytest.approx(0.7, rel=0.03)
    # the background estimate sees the noise, not the particle
    images = torch.randn(64, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.3
    images[:, 10:22, 10:22] += 5.0  # a bright particle inside the disc does not count
    assert background_noise_std(images) == pytest.approx(0.3, rel=0.03)


def test_frozen_decoder_gets_no_gradient_from_pip():
    from cryoace.models import build_decoder
    from cryoace.models.encoder import PoseEncoder

    torch.manual_seed(0)
    decoder = build_decoder("fouriernet", hidden=16, layers=2, output_scale=16.0)
    encoder = PoseEncoder(16, 2.0, channels=(4, 8), convs_per_block=(1, 1), mlp_hidden=16)
    ps = torch.full((4,), 2.0)
    for freeze in (True, False):
        encoder.zero_grad(set_to_none=True)
        decoder.zero_grad(set_to_none=True)
        pip_loss(encoder, decoder, None, ps, 16, noise_std=0.1, freeze_decoder=freeze).loss.backward()
        assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
        got = [p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters()]
        assert (not any(got)) if freeze else all(got)


def test_pip_weight_schedule():
    assert [pip_weight(s, 0.5, 3, "joint") for s in range(6)] == [0, 0, 0, 0.5, 0.5, 0.5]
    assert [pip_weight(s, 0.5, 2, "alternate") for s in range(6)] == [0, 0, 0, 0.5, 0, 0.5]
    assert pip_weight(10, 0.0, 0, "joint") == 0


@pytest.fixture(scope="module")
def dataset(simulated_adk):
    sim = simulated_adk(n=48)
    return ParticleDataset(read_particles(sim.star))


def test_alternate_pip_step_leaves_the_decoder_untouched(dataset, tmp_path):
    cfg = tiny(steps=2)
    cfg.pip = dataclasses.replace(cfg.pip, enabled=True, mode="alternate", weight=1.0)
    tr = Trainer(cfg, dataset, tmp_path, progress=False)
    batch = dataset[list(range(8))]
    tr.train_step(batch)  # step 0: image loss only
    tr.step = 1
    dec = {k: v.clone() for k, v in tr.decoder.state_dict().items()}
    enc = {k: v.clone() for k, v in tr.encoder.state_dict().items()}
    stats = dict(zip(STEP_STATS, tr.train_step(batch).tolist(), strict=True))  # step 1: PIP only, decoder frozen
    assert all(torch.equal(v, tr.decoder.state_dict()[k]) for k, v in dec.items())
    assert any(not torch.equal(v, tr.encoder.state_dict()[k]) for k, v in enc.items())
    assert stats["pip_loss"] > 0 and stats["ipi_step"] == 0 and stats["pip_step"] == 1  # a PIP loss, no image loss


def test_training_with_pip_records_pip_loss_and_pose_metrics(dataset, tmp_path):
    import json

    cfg = tiny(steps=8, log_every=4, eval_every=4)
    cfg.pip = dataclasses.replace(cfg.pip, enabled=True, warmup_steps=4, weight=0.5)
    tr = Trainer(cfg, dataset, tmp_path, progress=False)
    tr.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["pip_loss"] is None and train[1]["pip_loss"] > 0  # after the warm-up only
    poses = [r for r in records if r["kind"] == "poses"]
    assert [r["step"] for r in poses] == [4, 8]
    for r in poses:  # the simulated star file carries the true poses
        assert 0 < r["coverage"] <= 1 and 0 <= r["rot_mean_sq_frob"] <= 8 and 0 <= r["rot_median_deg"] <= 180
    assert (tmp_path / "viewing_directions.png").stat().st_size > 1000


def test_pose_monitor_errors_vanish_for_globally_rotated_truth():
    g = torch.Generator().manual_seed(5)
    truth = random_rotmat(300, g, F64)
    q = random_rotmat(1, g, F64)[0]
    monitor = PoseMonitor(window=200, device="cpu", truth_rotmat_of=lambda rows: truth[rows])
    rows = torch.randperm(300, generator=g)[:250]
    for chunk in rows.split(64):  # more poses than the window: the oldest are dropped
        monitor.update(chunk.numpy(), (truth[chunk] @ q).float())
    assert monitor.filled == 200
    held, _ = monitor.poses()
    assert sorted(held.tolist()) == sorted(rows[-200:].tolist())
    summary = monitor.summary()
    assert summary["rot_median_deg"] < 0.01 and summary["rot_mean_sq_frob"] < 1e-8
    from cryoace.evaluate.pose_metrics import expected_uniform_coverage
    assert summary["coverage"] == pytest.approx(expected_uniform_coverage(200), rel=0.25)
    scrambled = PoseMonitor(window=200, device="cpu", truth_rotmat_of=lambda rows: truth[rows])
    scrambled.update(rows[:200].numpy(), random_rotmat(200, g).float())
    assert scrambled.summary()["rot_median_deg"] > 30
