"""Direct Fourier inversion proves the conventions on data simulated by an independent program (ASPIRE).

Each ASPIRE set was simulated from volumes/spike_6vyb_L64_3.0A.mrc with RELION-convention poses,
shifts and CTFs (SOURCES.md). With the right conventions the noise-free sets reconstruct to FSC ≥ 0.5
out to ≥ 0.9 × Nyquist; a transposed rotation, a flipped shift sign or a flipped CTF sign must fail.
"""


import numpy as np
import pytest
import torch

from cryoace.cli.main import main as cli
from cryoace.evaluate.fsc import fsc
from cryoace.io.mrc import open_mrc, read_volume
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.physics.forward import VoxelFourierVolume, render_images
from cryoace.physics.fourier import fft3_centered, ifft3_centered
from cryoace.physics.rotations import random_rotmat
from cryoace.reconstruct.backproject import FourierAccumulator, split_half_sets
from cryoace.types import CTFParams, Pose

from conftest import TEST_DATA  # noqa: E402

SPIKE = TEST_DATA / "volumes/spike_6vyb_L64_3.0A.mrc"
NYQUIST_90 = 2.0 / 0.9  # px: FSC must stay ≥ 0.5 at least out to 0.9 × Nyquist


@pytest.fixture(scope="module")
def spike():
    return torch.tensor(read_volume(SPIKE).data, dtype=torch.float64)


@pytest.mark.parametrize("name", ["sim_aspire_spike_L64_ctf_clean", "sim_aspire_spike_L64_noctf_clean"])
def test_cli_backproject_aspire_noise_free_reaches_nyquist(name, tmp_path, spike, capsys):
    out = tmp_path / "map.mrc"
    assert cli(["backproject", str(TEST_DATA / "particles" / name / "particles.star"), "-o", str(out),
                "--quiet"]) == 0
    mrc = open_mrc(out)
    assert mrc.voxel_size == pytest.approx(3.0)
    result = fsc(np.asarray(mrc.data), spike, voxel_size=3.0)
    assert result.resolution(0.5).px <= NYQUIST_90


def _insert(dataset, transform="right"):
    batch = dataset[np.arange(len(dataset))]
    rotmat, shift = batch.pose.rotmat, batch.pose.shift_angst / batch.pixel_size[:, None]
    images, ctf = batch.images, batch.ctf
    if transform == "transposed rotation":
        rotmat = rotmat.transpose(-1, -2)
    elif transform == "flipped shift":
        shift = -shift
    elif transform == "flipped CTF":
        images = -images  # the same as a CTF of the opposite sign
    acc = FourierAccumulator(dataset.image_size)
    acc.insert(images, rotmat, shift, batch.pixel_size, ctf)
    return acc.volume()


@pytest.mark.parametrize("transform", ["transposed rotation", "flipped shift", "flipped CTF"])
def test_wrong_conventions_visibly_fail(transform, spike):
    dataset = ParticleDataset(read_particles(TEST_DATA / "particles/sim_aspire_spike_L64_ctf_clean/particles.star"),
                              normalize=False)
    right = fsc(_insert(dataset), spike)
    wrong = fsc(_insert(dataset, transform), spike)
    assert right.resolution(0.5).px <= NYQUIST_90
    if transform == "flipped CTF":
        assert wrong.curve[1:20].max() < -0.5  # a negative (hollow) map
    else:
        assert wrong.resolution(0.5).px > 8.0


def test_noisy_aspire_set_with_half_maps(tmp_path, spike):
    out = tmp_path / "noisy" / "map.mrc"
    star = TEST_DATA / "particles/sim_aspire_spike_L64_ctf_snr0.1/particles.star"
    assert cli(["backproject", str(star), "-o", str(out), "--half-maps", "--wiener-eps", "0.1", "--quiet"]) == 0
    for suffix in ("_half1.mrc", "_half2.mrc", "_fsc.png"):
        assert (tmp_path / "noisy" / f"map{suffix}").is_file()
    full = read_volume(out).data
    assert fsc(full, spike).resolution(0.5).px < 4.0
    h1, h2 = read_volume(tmp_path / "noisy/map_half1.mrc").data, read_volume(tmp_path / "noisy/map_half2.mrc").data
    gold = fsc(h1, h2).resolution(0.143).px
    assert 2.0 <= gold < 4.5


def test_first_and_downsample(tmp_path):
    out = tmp_path / "small.mrc"
    star = TEST_DATA / "particles/sim_aspire_spike_L64_ctf_clean/particles.star"
    assert cli(["backproject", str(star), "-o", str(out), "--first", "40", "--downsample", "32", "--quiet"]) == 0
    mrc = open_mrc(out)
    assert mrc.data.shape == (32, 32, 32)
    assert mrc.voxel_size == pytest.approx(6.0)


def test_half_split_honours_random_subset():
    table = read_particles(TEST_DATA / "particles/trpv1_cryojax/trpv1_small_stack.star")
    rows = np.arange(len(table))
    h1, h2 = split_half_sets(table, rows)
    subset = table.extra["rlnRandomSubset"].to_numpy()
    assert (subset[h1] == 1).all() and (subset[h2] == 2).all() and len(h1) + len(h2) == len(rows)
    # without the column: a seeded split into equal halves
    table.extra = table.extra.drop(columns=["rlnRandomSubset"])
    a1, a2 = split_half_sets(table, rows, seed=3)
    b1, b2 = split_half_sets(table, rows, seed=3)
    assert np.array_equal(a1, b1) and abs(len(a1) - len(a2)) <= 1 and not set(a1) & set(a2)


def test_round_trip_project_then_backproject_with_ctf_and_shifts():
    """Our own forward model (random poses, shifts, astigmatic CTF) inverts to the source map."""
    volume = torch.tensor(read_volume(TEST_DATA / "volumes/adk_open_4ake_L64_1.5A.mrc").data, dtype=torch.float64)
    # Fourier-crop to 32³ at 3 Å/px (the whole molecule stays in the box) to keep the test fast
    volume = ifft3_centered(fft3_centered(volume)[16:48, 16:48, 16:48]).real / 8
    g = torch.Generator().manual_seed(0)
    n = 400
    rotmat = random_rotmat(n, g, torch.float64)
    shift = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3.0
    defocus = 8000 + 10000 * torch.rand(n, generator=g, dtype=torch.float64)
    ctf = CTFParams.create(defocus, defocus - 400, 1.0)
    images = render_images(VoxelFourierVolume.from_real(volume, 2), Pose(rotmat, shift), 3.0, 32, ctf)
    acc = FourierAccumulator(32)
    acc.insert(images, rotmat, shift / 3.0, 3.0, ctf)
    assert fsc(acc.volume(1e-3), volume).resolution(0.5).px <= NYQUIST_90


def test_cli_rejects_particles_without_poses(tmp_path, capsys):
    out = tmp_path / "map.mrc"
    code = cli(["backproject", str(TEST_DATA / "particles/empiar10076_cryodrgn/empiar_10076_7.star"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no poses" in err[0] and "empiar_10076_7.star" in err[0]
    assert not out.exists()


def test_cli_missing_stack_is_one_line(tmp_path, capsys):
    out = tmp_path / "map.mrc"
    code = cli(["backproject", str(TEST_DATA / "particles/trpv1_cryojax/trpv1_small_stack.star"), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "batch_0_restacked" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def _half_map_fsc(dataset, transpose=False):
    batch = dataset[np.arange(len(dataset))]
    rotmat = batch.pose.rotmat.transpose(-1, -2) if transpose else batch.pose.rotmat
    halves = []
    for rows in (slice(0, None, 2), slice(1, None, 2)):
        acc = FourierAccumulator(dataset.image_size)
        acc.insert(batch.images[rows], rotmat[rows], batch.pose.shift_angst[rows] / batch.pixel_size[rows, None],
                   batch.pixel_size[rows])
        halves.append(acc.volume())
    return fsc(*halves)


def test_cryodrgn_hand_pickle_poses_are_consistent(tmp_path):
    """cryoDRGN's hand set (its own poses pickle): the two half maps agree only with the right convention."""
    from cryoace.io.cryodrgn import table_from_stack

    folder = TEST_DATA / "particles/cryodrgn_hand"
    dataset = ParticleDataset(table_from_stack(folder / "hand.mrcs", poses=folder / "hand_rot.pkl", pixel_size=1.0),
                              normalize=False)
    assert _half_map_fsc(dataset).resolution(0.5).px < 3.0
    assert _half_map_fsc(dataset, transpose=True).resolution(0.5).px > 6.0
    out = tmp_path / "hand.mrc"
    assert cli(["backproject", str(folder / "hand.mrcs"), "--poses", str(folder / "hand_rot.pkl"),
                "--pixel-size", "1", "-o", str(out), "--quiet"]) == 0
    assert open_mrc(out).data.shape == (64, 64, 64)


def test_insert_takes_a_point_exactly_at_nyquist_on_an_axis():
    """A slice point at |k| = 0.5 turned exactly onto +z (a rotation taking x to z) lands on the last
    index of the padded grid; its trilinear neighbour must exist (it once fell off the grid)."""
    from cryoace.reconstruct.backproject import FourierAccumulator

    to_z = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # Rᵀ(1, 0, 0) = (0, 0, 1)
    accumulator = FourierAccumulator(16)
    rotmat = torch.stack([to_z, to_z.T, torch.eye(3)]) * (1 + 1e-6)  # a hair beyond, as float32 rounding can be
    accumulator.insert(torch.randn(3, 16, 16), rotmat, torch.zeros(3, 2), 1.0)
    assert bool(torch.isfinite(accumulator.volume()).all())
