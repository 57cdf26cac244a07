"""Pose search and projection-matching refinement against images made by another simulator (ASPIRE).

The ASPIRE set (tests/data/particles/sim_aspire_spike_L64_ctf_clean: RELION-convention poses, shifts
and CTFs, noise-free, from volumes/spike_6vyb_L64_3.0A.mrc) has true poses in its star file: searching
them back against the map tests the search's rotation, shift and CTF conventions on data we did not
make. ASPIRE's images are in other intensity units than our projector's; the map is scaled by the
least-squares factor between the two (on images at the file's poses) — the search itself never sees
the true poses.
"""


import pytest
import torch

from cryoace.physics.forward import VoxelFourierVolume, render_spectra
from cryoace.physics.rotations import geodesic_angle, random_rotmat
from cryoace.reconstruct.pose_search import (
    global_search,
    local_offsets,
    local_search,
    search_band,
    shift_grid,
    so3_grid,
)
from cryoace.reconstruct.refine import RefineSettings, lowpass, refine
from cryoace.types import Pose, map_tensors

from conftest import TEST_DATA

pytestmark = pytest.mark.usefixtures("one_thread")
ASPIRE = TEST_DATA / "particles/sim_aspire_spike_L64_ctf_clean/particles.star"


def _rows(ctf, rows):
    return map_tensors(ctf, lambda t: t[rows] if t.dim() else t)


def _angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(geodesic_angle(a.double(), b.double()))


def test_so3_grid_covers_so3_within_its_step():
    grid = so3_grid(10.0, dtype=torch.float64)
    assert torch.allclose(grid @ grid.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(grid), atol=1e-12)
    assert torch.allclose(torch.linalg.det(grid), torch.ones(len(grid), dtype=torch.float64))
    probes = random_rotmat(300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cos = ((torch.einsum("pij,gij->pg", probes, grid) - 1) / 2).clamp(-1, 1)
    nearest = torch.rad2deg(torch.arccos(cos.max(1).values))
    assert float(nearest.max()) < 10.0
    assert float(nearest.median()) < 6.0


def test_offsets_and_shift_grid_start_at_identity():
    offsets = local_offsets(2.0)
    assert offsets.shape == (27, 3, 3) and torch.allclose(offsets[0], torch.eye(3))
    assert float(_angles_deg(offsets[1:], torch.eye(3).expand(26, 3, 3)).min()) == pytest.approx(2.0, abs=1e-3)
    shifts = shift_grid(1, 0.5)
    assert shifts.shape == (9, 2) and torch.equal(shifts[0], torch.zeros(2))
    assert float(shifts.abs().max()) == 0.5


def test_search_error_is_the_training_loss(aspire):
    """The error the search minimises is the loss's Σ w|Ŷ − P|² at the chosen pose, P from physics.forward."""
    dataset, batch, spike = aspire
    volume = VoxelFourierVolume.from_real(spike, 2)
    rows = slice(0, 6)
    images, pixel_size, ctf = batch.images[rows], batch.pixel_size[rows], _rows(batch.ctf, rows)
    band = search_band(64, 20)
    start = Pose(batch.pose.rotmat[rows] @ local_offsets(3.0)[5].T, batch.pose.shift_angst[rows])
    found = local_search(volume, images, pixel_size, band, start, local_offsets(3.0), shift_grid(1, 0.5), ctf)
    predicted = render_spectra(volume, found.pose, pixel_size, 64, ctf, freq_cyc_px=band.freq)
    assert torch.allclose(found.error, band.error(predicted, band.target(images)), rtol=1e-4)
    # the step back onto the file's rotation is one of the offsets, and it is the one chosen
    assert float(_angles_deg(found.pose.rotmat, batch.pose.rotmat[rows]).max()) < 0.1  # float32 round-off


def test_global_then_local_search_recovers_aspire_poses(aspire):
    dataset, batch, spike = aspire
    volume = VoxelFourierVolume.from_real(spike, 2)
    rows = slice(0, 32)
    images, pixel_size, ctf = batch.images[rows], batch.pixel_size[rows], _rows(batch.ctf, rows)
    found = global_search(volume, images, pixel_size, search_band(64, 10), so3_grid(8.0), ctf,
                          shifts_px=shift_grid(2, 1.0)).pose
    assert float(_angles_deg(found.rotmat, batch.pose.rotmat[rows]).median()) < 8.0
    for step in (4.0, 2.0, 1.0, 0.5):
        found = local_search(volume, images, pixel_size, search_band(64, 32), found, local_offsets(step),
                             shift_grid(1, 0.25), ctf).pose
    # (the spike is nearly three-fold symmetric: a few images may land on a symmetry mate, ~120° off)
    errors = _angles_deg(found.rotmat, batch.pose.rotmat[rows])
    assert float(errors.median()) < 0.5 and float((errors < 1.0).float().mean()) >= 0.8
    shift_px = (found.shift_angst - batch.pose.shift_angst[rows]) / pixel_size[:, None]
    assert float(shift_px.norm(dim=-1).median()) < 0.25


def test_wrong_ctf_sign_breaks_the_search(aspire):
    """The CTF must enter with RELION's sign: with flipped images the found poses are wrong."""
    dataset, batch, spike = aspire
    volume = VoxelFourierVolume.from_real(spike, 2)
    rows = slice(0, 16)
    found = global_search(volume, -batch.images[rows], batch.pixel_size[rows], search_band(64, 10), so3_grid(8.0),
                          _rows(batch.ctf, rows)).pose
    assert float(_angles_deg(found.rotmat, batch.pose.rotmat[rows]).median()) > 20.0


def test_global_search_top_k_is_sorted_and_starts_with_the_best(aspire):
    dataset, batch, spike = aspire
    volume = VoxelFourierVolume.from_real(spike, 2)
    args = (volume, batch.images[:4], batch.pixel_size[:4], search_band(64, 8), so3_grid(15.0),
            _rows(batch.ctf, slice(0, 4)))
    best = global_search(*args)
    top = global_search(*args, top_k=5, rotation_chunk=500)
    assert top.error.shape == (4, 5) and top.pose.rotmat.shape == (4, 5, 3, 3)
    assert torch.all(top.error[:, 1:] >= top.error[:, :-1])
    assert torch.allclose(top.error[:, 0], best.error) and torch.allclose(top.pose.rotmat[:, 0], best.pose.rotmat)


def test_refine_from_a_blurred_map_reaches_accurate_poses(aspire):
    """Projection matching seeded by the map low-passed to 20 Å (a Gaussian of σ 1/(20 Å)) finds the
    poses of the ASPIRE images and rebuilds a map that matches the true one."""
    from cryoace.evaluate.fsc import fsc
    from cryoace.physics.fourier import fft3_centered, freq_grid_3d, ifft3_centered

    dataset, batch, spike = aspire
    k2 = (freq_grid_3d(64) ** 2).sum(-1) / 3.0 ** 2  # (cycles/Å)²
    blurred = ifft3_centered(fft3_centered(spike) * torch.exp(-k2 * 20.0 ** 2 / 2)).real
    rounds = []
    result = refine(dataset, blurred, RefineSettings(rounds=4, start_shells=12, shells_per_round=6), progress=False,
                    on_round=lambda record, pose, volume: rounds.append(record))
    assert [r.round for r in rounds] == [0, 1, 2, 3] and rounds[-1].local_shells == 30
    # once found, confident poses are only searched locally (not in round 0 or the last round)
    assert rounds[0].global_fraction == rounds[-1].global_fraction == 1.0
    assert max(r.global_fraction for r in rounds[1:3]) < 0.75, [r.global_fraction for r in rounds]
    errors = _angles_deg(result.pose.rotmat, batch.pose.rotmat)
    assert float(errors.median()) < 2.0
    assert fsc(result.volume, spike, voxel_size=3.0).resolution(0.5).px < 2.5
    # the two half maps (each image searched against the other half's map) agree to near Nyquist
    assert rounds[-1].half_map_fsc.resolution(0.143).px < 2.5 and rounds[-1].half_map_fsc.voxel_size == 3.0


def test_refine_rejects_a_map_of_another_box(aspire):
    dataset, _, _ = aspire
    with pytest.raises(ValueError, match="32"):
        refine(dataset, torch.zeros(32, 32, 32), RefineSettings(rounds=1), progress=False)


def test_unresolved_particles_fall_back_to_the_global_search(aspire):
    """Particles whose pose the global search does not single out (here: images replaced by noise)
    are searched globally again in the next round; the resolved ones only locally."""
    import numpy as np

    from helpers import NoiseReplaced

    dataset, _, spike = aspire
    noise_rows = np.arange(0, len(dataset), 3)  # a third of the particles
    mixed = NoiseReplaced(dataset, noise_rows, std=float(dataset[np.arange(20)].images.std()))
    rounds = []
    result = refine(mixed, spike, RefineSettings(rounds=3, start_shells=12, check_particles=0), progress=False,
                    on_round=lambda record, pose, volume: rounds.append(record))
    # every noise image was searched globally again (its confidence stays low), some resolved ones were not
    assert float(result.confidence[noise_rows].max()) < 0.9
    assert len(noise_rows) / len(dataset) <= rounds[1].global_fraction < 0.95, rounds[1].global_fraction
    assert rounds[0].global_fraction == rounds[2].global_fraction == 1.0


def test_refinement_of_a_subset_extends_to_every_particle(aspire):
    """The rounds run on the first half of the particles; the other half, never in a round, is then
    searched once against its own half's final map: their poses are as accurate, the subset's are
    kept, each half set stays apart, and the half maps hold every particle."""
    import numpy as np

    from cryoace.reconstruct.refine import alternate_half_sets, extend_refinement

    dataset, batch, spike = aspire
    n = len(dataset)
    halves = alternate_half_sets(n)  # even rows, odd rows
    subset = np.arange(n // 2)
    settings = RefineSettings(rounds=3, start_shells=12, shells_per_round=6, check_particles=16)
    part = refine(dataset, lowpass(spike, 8.0), settings, rows=subset, half_sets=alternate_half_sets(len(subset)),
                  progress=False)
    assert np.array_equal(part.rows, subset)
    full = extend_refinement(dataset, part, np.arange(n), halves, settings, progress=False)
    assert full.pose.rotmat.shape == (n, 3, 3) and full.confidence.shape == (n,)
    assert np.array_equal(full.half_rows[0], halves[0]) and np.array_equal(full.half_rows[1], halves[1])
    new = np.arange(n // 2, n)
    assert float(_angles_deg(full.pose.rotmat[new], batch.pose.rotmat[new]).median()) < 2.0
    assert torch.allclose(full.pose.rotmat[subset], part.pose.rotmat.double(), atol=1e-6)
    assert float(full.confidence[new].median()) > 0.5  # measured by their own global search
    # twice the particles in each half map: the halves agree at least as far
    assert full.half_map_fsc.resolution(0.143).px <= part.half_map_fsc.resolution(0.143).px + 0.1
    assert full.check is not None and full.check.particles == 32
    # a subset particle in the other half set here would let the halves meet: refused
    swapped = (np.sort(np.r_[halves[0][1:], halves[1][:1]]), np.sort(np.r_[halves[1][1:], halves[0][:1]]))
    with pytest.raises(ValueError, match="half set"):
        extend_refinement(dataset, part, np.arange(n), swapped, settings, progress=False)


def test_new_particles_are_posed_against_given_half_maps_and_carried_from_an_encoders_start(aspire):
    """refine_particles (``cryoace refine``): particles searched against two given half maps, each half
    set against its own; poses given from elsewhere ~10° off (an encoder's) are carried to the right
    ones even where the global search alone (a 30° grid here) misses them."""
    import numpy as np

    from cryoace.physics.rotations import axis_angle_to_rotmat, random_rotmat
    from cryoace.reconstruct.refine import alternate_half_sets, refine_particles

    dataset, batch, spike = aspire
    n = len(dataset)
    halves = alternate_half_sets(n)
    maps = torch.stack([spike, spike])
    coarse = RefineSettings(global_step_deg=30.0, check_particles=0)
    alone = refine_particles(dataset, maps, halves, coarse, progress=False)
    generator = torch.Generator().manual_seed(3)
    # each true rotation turned by 10° about a random axis
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator, dtype=torch.float64), dim=-1)
    turn = axis_angle_to_rotmat(axis * np.deg2rad(10.0))
    start = Pose(batch.pose.rotmat.double() @ turn, batch.pose.shift_angst.double())
    assert abs(float(_angles_deg(start.rotmat, batch.pose.rotmat).median()) - 10.0) < 0.5
    carried = refine_particles(dataset, maps, halves, coarse, initial=start, progress=False)
    assert float(_angles_deg(carried.pose.rotmat, batch.pose.rotmat).median()) < 1.5
    assert float(_angles_deg(carried.pose.rotmat, batch.pose.rotmat).median()) < float(
        _angles_deg(alone.pose.rotmat, batch.pose.rotmat).median())
    # starts that are wrong (random) do not spoil what the global search finds
    wrong = Pose(random_rotmat(n, generator=generator).double(), batch.pose.shift_angst.double())
    usual = RefineSettings(check_particles=0)
    found = refine_particles(dataset, maps, halves, usual, initial=wrong, progress=False)
    assert float(_angles_deg(found.pose.rotmat, batch.pose.rotmat).median()) < 2.0
    assert np.array_equal(found.half_rows[0], halves[0]) and found.half_volumes.shape == (2, 64, 64, 64)
    with pytest.raises(ValueError, match="2 × 64"):
        refine_particles(dataset, spike[None], halves, usual, progress=False)


def _moved_far(dataset, distance_px: float = 3.0, seed: int = 4):
    """The ASPIRE particles (0.4–5.7 px off-centre, 29 % beyond 3 px) moved ``distance_px`` further, each
    in a random direction."""
    from helpers import Shifted

    angle = torch.rand(len(dataset), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6.2832
    return Shifted(dataset, distance_px * torch.stack([angle.cos(), angle.sin()], -1))


def test_centring_finds_particles_far_off_centre(aspire):
    """centring_shifts: a coarse search over SO(3) and a disc of shifts locates each particle in its
    image — mostly within 1.5 px of its true shift — wherever it is (here up to ~9 px off-centre)."""
    import numpy as np

    from cryoace.reconstruct.pose_search import centring_shifts

    dataset, _, spike = aspire
    moved = _moved_far(dataset)
    batch = moved[np.arange(len(moved))]
    true_px = moved.shift_angst / batch.pixel_size.double()[:, None]
    assert float((true_px.norm(dim=-1) > 4).double().mean()) >= 0.4
    found = centring_shifts(VoxelFourierVolume.from_real(spike, 2), batch.images, batch.pixel_size,
                            search_band(64, 8), 0.15 * 64, batch.ctf)
    error = (found.double() - true_px).norm(dim=-1)
    # measured: median 0.85 px (the coarse grid's 2-px step alone leaves up to 1.4), 93 % within 1.5 px
    assert float(error.median()) < 1.2 and float((error <= 2.5).double().mean()) >= 0.95, error


def test_refinement_finds_the_poses_of_particles_far_off_centre(aspire):
    """Particles 3 px further off-centre (≥ 40 % beyond 4 px): the global search around each particle's centring
    shift finds their poses; a shift grid around 0 only (``centring_radius`` 0, the search before)
    misses most of them."""
    import numpy as np

    from cryoace.reconstruct.refine import alternate_half_sets, refine_particles

    dataset, batch, spike = aspire
    moved = _moved_far(dataset)
    maps, halves = torch.stack([spike, spike]), alternate_half_sets(len(moved))
    errors = {}
    for radius in (0.15, 0.0):
        settings = RefineSettings(check_particles=0, centring_radius=radius)
        found = refine_particles(moved, maps, halves, settings, progress=False)
        errors[radius] = _angles_deg(found.pose.rotmat, batch.pose.rotmat)
        if radius:
            shift_error = (found.pose.shift_angst.double() - moved.shift_angst).norm(dim=-1) / 3.0
            assert float(shift_error.median()) < 0.5
    # (the spike is nearly three-fold symmetric: a few may land on a mate, ~120° off)
    assert float(errors[0.15].median()) < 1.0 and float((errors[0.15] < 5).double().mean()) >= 0.9, errors[0.15]
    assert float((errors[0.0] > 20).double().mean()) >= 0.3, errors[0.0]
    assert np.isfinite(errors[0.0].numpy()).all()
