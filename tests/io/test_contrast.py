"""The pre-training contrast check (white particles on a dark background, docs/conventions.md §1): its verdict
flips with the data's sign on noisy simulated data with CTF; independent files agree (ASPIRE's
RELION-convention simulation and real TRPV1 particles are white; the 7 raw EMPIAR-10076 particles
are dark, as seen by eye); pure noise is "unclear"; and ``cryoace reconstruct`` stops on dark
particles before writing anything (one line, exit 2), or inverts them with --auto-invert."""

from __future__ import annotations

import numpy as np
import pytest

from cryoace.cli.main import build_parser
from cryoace.cli.main import main as cli
from cryoace.cli.reconstruct import build_config
from cryoace.io.contrast import check_contrast
from cryoace.io.mrc import write_mrc
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.train.config import load_config

from helpers import simulate_adk

pytestmark = pytest.mark.usefixtures("one_thread")


def _simulate(out, n: int, invert: bool = False):
    """Adenylate kinase at L=32, 3 Å/px, SNR 0.1 (−10 dB), CTF (defocus ~1 µm), shifts."""
    return simulate_adk(out, n, noise_free=False, seed=5, defocus_median=10000.0, defocus_spread=0.2,
                        invert_contrast=invert).star


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    return read_particles(_simulate(tmp_path_factory.mktemp("sim") / "data", 300))


def test_verdict_flips_with_the_sign_of_the_data(noisy):
    white = check_contrast(ParticleDataset(noisy))
    dark = check_contrast(ParticleDataset(noisy, invert_contrast=True))
    assert white.verdict == "ok" and not white.inverted and white.ctf_flipped
    assert dark.verdict == "inverted" and dark.inverted
    assert white.z_score > 10 and dark.z_score == pytest.approx(-white.z_score, rel=1e-6)
    assert white.n_images == 300 and white.lowpass_size == 32
    assert "white particles" in white.describe() and "inverted" in dark.describe()
    # the phase flip is optional (files without CTF), and the verdict does not hinge on it here
    assert check_contrast(ParticleDataset(noisy), use_ctf=False).verdict == "ok"


def test_pure_noise_is_unclear(tmp_path):
    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "noise.mrcs", rng.normal(size=(200, 32, 32)).astype(np.float32), 3.0)
    result = check_contrast(ParticleDataset(read_particles(tmp_path / "noise.mrcs")))
    assert result.verdict == "unclear" and abs(result.z_score) < result.threshold and not result.ctf_flipped


def test_real_files(particles_dir):
    # ASPIRE's simulation, stored in RELION's convention (SOURCES.md): white, CTF phase-flipped
    aspire = check_contrast(ParticleDataset(read_particles(
        particles_dir / "sim_aspire_spike_L64_ctf_snr0.1/particles.star")))
    assert aspire.verdict == "ok" and aspire.ctf_flipped and aspire.z_score > 20
    # 10 real TRPV1 particles prepared in RELION's convention (cryojax's test data)
    trpv1 = read_particles(particles_dir / "trpv1_cryojax/trpv1_small_stack.star",
                           stack_map={"batch_0_restacked.mrc": particles_dir / "trpv1_cryojax/trpv1_small_stack.mrcs"})
    assert check_contrast(ParticleDataset(trpv1)).verdict == "ok"
    # 7 raw EMPIAR-10076 particles: dark ribosomes on a light background (visible by eye; the CTF's
    # first zero lies beyond the test's low-pass, so this is the images' own sign)
    empiar = read_particles(particles_dir / "empiar10076_cryodrgn/empiar_10076_7.star")
    assert check_contrast(ParticleDataset(empiar)).verdict == "inverted"
    assert check_contrast(ParticleDataset(empiar, invert_contrast=True)).verdict == "ok"


def test_reconstruct_stops_on_dark_particles_or_inverts_them(tmp_path, capsys):
    star = _simulate(tmp_path / "dark", 64, invert=True)
    out = tmp_path / "run"
    common = ["--preset", "tiny", "--quiet", "--device", "cpu", "--steps", "4", "--log-every", "2",
              "--volume-every", "0"]
    base = ["reconstruct", str(star), "-o", str(out), *common]
    assert cli(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(star) in err and "look inverted" in err and "--invert-contrast" in err and "--auto-invert" in err
    assert not out.exists()  # stopped before anything was written

    assert cli([*base, "--auto-invert"]) == 0
    config, _ = load_config(out / "config.yaml")
    assert config.data.invert_contrast and config.data.auto_invert and config.data.check_contrast
    assert (out / "volume.mrc").is_file()

    # the options reach the configuration (a full run with them is the one above)
    parser = build_parser()
    config = build_config(parser.parse_args(["reconstruct", str(star), "-o", str(tmp_path / "r2"), *common]))
    assert config.data.check_contrast and not config.data.auto_invert
    config = build_config(parser.parse_args(["reconstruct", str(star), "-o", str(tmp_path / "r2"), *common,
                                             "--no-check-contrast"]))
    assert not config.data.check_contrast
