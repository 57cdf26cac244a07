"""Ab initio by stochastic EM over poses, and the weighted / band-limited slice insertion it uses.

The end-to-end check runs on the demo simulation (adenylate kinase) at SNR −10 dB: from a featureless
blob the stage must find a map whose refinement recovers the simulated poses."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from cryoace.evaluate.align import align_rotations
from cryoace.evaluate.gold_standard import MAX_START_DISAGREEMENT
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.physics.rotations import geodesic_angle, random_rotmat
from cryoace.reconstruct.ab_initio import AbInitioSettings, ab_initio, ab_initio_half_sets, mean_search_error
from cryoace.reconstruct.backproject import FourierAccumulator
from cryoace.reconstruct.pose_search import pose_posterior
from cryoace.reconstruct.refine import RefineSettings, alternate_half_sets, refine

from conftest import TEST_DATA
from helpers import NoiseReplaced

pytestmark = pytest.mark.usefixtures("one_thread")
ASPIRE = TEST_DATA / "particles/sim_aspire_spike_L64_ctf_clean/particles.star"


def _aligned_errors_deg(found: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    alignment = align_rotations(found.double(), truth.double())
    return torch.rad2deg(geodesic_angle(alignment.aligned, truth.double()))


def test_pose_posterior_is_the_white_noise_likelihood():
    error = torch.tensor([[1.0, 1.01, 1.5], [2.0, 2.0, 2.0]], dtype=torch.float64)
    p = pose_posterior(error, coefficients=200.0)
    assert torch.allclose(p.sum(-1), torch.ones(2, dtype=torch.float64))
    # log p1/p0 = −ΔE·K/(2·E_min): 0.01·200/2 = 1
    assert math.isclose(float(p[0, 0] / p[0, 1]), math.e, rel_tol=1e-12)
    assert torch.allclose(p[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    hot = pose_posterior(error, coefficients=200.0, temperature=4.0)
    assert math.isclose(float(hot[0, 0] / hot[0, 1]), math.exp(0.25), rel_tol=1e-12)


def test_insert_several_weighted_poses_equals_separate_inserts():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 16, 16, generator=gen, dtype=torch.float64)
    rotmat = random_rotmat(6, dtype=torch.float64, generator=gen).reshape(3, 2, 3, 3)
    shift = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)
    weight = torch.rand(3, 2, generator=gen, dtype=torch.float64)
    both = FourierAccumulator(16, dtype=torch.float64)
    both.insert(images, rotmat, shift, 1.5, weight=weight)
    separate = FourierAccumulator(16, dtype=torch.float64)
    for k in range(2):
        separate.insert(images, rotmat[:, k], shift[:, k], 1.5, weight=weight[:, k])
    assert torch.allclose(both.grid, separate.grid, atol=1e-12)
    # a weight of 2 is the same image inserted twice
    twice, doubled = FourierAccumulator(16, dtype=torch.float64), FourierAccumulator(16, dtype=torch.float64)
    for _ in range(2):
        twice.insert(images, rotmat[:, 0], shift[:, 0], 1.5)
    doubled.insert(images, rotmat[:, 0], shift[:, 0], 1.5, weight=torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.allclose(twice.grid, doubled.grid, atol=1e-12)


def test_band_limited_insert_matches_inside_the_band_and_is_empty_outside():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 16, 16, generator=gen, dtype=torch.float64)
    rotmat = random_rotmat(4, dtype=torch.float64, generator=gen)
    shift = torch.zeros(4, 2, dtype=torch.float64)
    full, low = FourierAccumulator(16, dtype=torch.float64), FourierAccumulator(16, dtype=torch.float64)
    full.insert(images, rotmat, shift, 2.0)
    low.insert(images, rotmat, shift, 2.0, max_freq_cyc_px=0.25)
    p = full.grid_size
    centre = full.padded_size // 2 + 1
    r = torch.arange(p, dtype=torch.float64) - centre
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    radius = torch.sqrt(x ** 2 + y ** 2 + z ** 2).reshape(-1)
    band = 0.25 * full.padded_size  # voxels of the padded grid
    inside = radius + math.sqrt(3) <= band  # every point splatting here lies in the band
    assert torch.allclose(low.grid[inside], full.grid[inside], atol=1e-12)
    assert float(low.grid[radius > band + math.sqrt(3)].abs().max()) == 0.0
    assert float(full.grid[radius > band + math.sqrt(3)].abs().max()) > 0.0


def _demo_particles(tmp_path_factory, noise_free: bool, n: int) -> ParticleDataset:
    """``n`` demo particles (adenylate kinase, L = 64, 1.5 Å/px, CTF, shifts), at SNR −10 dB or noise-free."""
    from cryoace.cli.demo import simulate_demo

    directory = tmp_path_factory.mktemp("adk_clean" if noise_free else "adk_m10")
    simulate_demo(directory, noise_free=noise_free, n=n, seed=3, progress=False)
    return ParticleDataset(read_particles(directory / "particles.star"), normalize=True)


@pytest.fixture(scope="module")
def noisy_adk(tmp_path_factory):
    """600 demo particles at SNR −10 dB."""
    return _demo_particles(tmp_path_factory, noise_free=False, n=600)


def test_ab_initio_from_a_blob_finds_the_structure_at_snr_0_1(noisy_adk):
    """From a featureless blob, 16 EM iterations give a map against which one refinement round finds
    the simulated poses (up to the global rotation and hand no ab initio method can know) — where hard
    projection matching from a wrong map stays wrong — and the map explains the images better than
    the blob."""
    settings = AbInitioSettings(iterations=16, batch_size=200, memory=600)
    iterations = []
    built = ab_initio(noisy_adk, settings=settings, progress=False,
                      on_iteration=lambda record, volume: iterations.append(record))
    assert [it.iteration for it in iterations] == list(range(settings.iterations))
    assert iterations[0].shells == settings.start_shells and iterations[-1].shells == settings.end_shells
    assert iterations[0].temperature == pytest.approx(8.0) and iterations[-1].temperature == pytest.approx(1.0)
    # the assignments sharpen as the map forms and the temperature falls
    assert iterations[-1].mean_best_probability > 3 * iterations[0].mean_best_probability
    from cryoace.reconstruct.ab_initio import blob_volume
    blob = blob_volume(64, "cpu") * float(built.volume.std() / blob_volume(64, "cpu").std())
    assert (mean_search_error(noisy_adk, built.volume, 10, sample=100)
            < mean_search_error(noisy_adk, blob, 10, sample=100))
    # one round against the map itself (no gold-standard low-pass of the start): the poses it gives
    result = refine(noisy_adk, built.volume, RefineSettings(rounds=1, start_resolution_px=2.0), progress=False)
    errors = _aligned_errors_deg(result.pose.rotmat, noisy_adk.table.pose.rotmat)
    # (from a wrong map the median stays at 50–100°)
    assert float(errors.median()) < 10.0 and float((errors < 20).float().mean()) > 0.7


def test_a_time_budget_brings_the_annealing_forward(noisy_adk):
    """Cut short by ``max_time_s``, a run still ends annealed (temperature 1) at its final band rather
    than midway through the schedule."""
    settings = AbInitioSettings(iterations=200, batch_size=50, max_time_s=1.0)
    history = ab_initio(noisy_adk, None, settings, progress=False).iterations
    assert 2 <= len(history) < 200
    assert history[-1].shells == settings.end_shells and history[-1].temperature == 1.0
    assert history[-1].elapsed_s < 1.0 + 2 * (history[-1].elapsed_s - history[-2].elapsed_s)
    assert history[0].shells == settings.start_shells and history[0].temperature == settings.start_temperature
    unbounded = AbInitioSettings(iterations=3, batch_size=50)
    assert [r.shells for r in ab_initio(noisy_adk, None, unbounded, progress=False).iterations] == [5, 8, 10]
    # with the centring option (off by default) the same schedule runs and the map is finite
    centred = ab_initio(noisy_adk, None, AbInitioSettings(iterations=3, batch_size=50, centring_radius=0.15,
                                                          shift_range_px=1), progress=False)
    assert [r.shells for r in centred.iterations] == [5, 8, 10] and torch.isfinite(centred.volume).all()


def test_runs_of_other_seeds_differ_even_when_the_batch_would_hold_every_particle(noisy_adk):
    """A batch holds at most half the particles: on fewer particles than ``batch_size`` the runs of
    different seeds still draw different batches and end in different maps (their agreement then
    means something), while one seed repeats itself exactly."""
    few = np.arange(60)
    settings = AbInitioSettings(iterations=2, batch_size=300)
    runs = [ab_initio(noisy_adk, None, dataclasses.replace(settings, seed=seed), rows=few, progress=False).volume
            for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert float((runs[0] - runs[2]).norm() / runs[0].norm()) > 0.01


def test_ab_initio_refuses_a_start_map_of_another_box():
    dataset = ParticleDataset(read_particles(ASPIRE), normalize=True)
    with pytest.raises(ValueError, match="32"):
        ab_initio(dataset, torch.zeros(32, 32, 32), AbInitioSettings(iterations=1), progress=False)


#: enough for 200 noise-free particles per half set (their maps reach ~5.2 px against the truth);
#: with 300 particles per half at −10 dB the same schedule gives 11–14 px maps that agree at ~15 px
HALF_SET_RUN = AbInitioSettings(iterations=12, batch_size=150, memory=200)


@pytest.fixture(scope="module")
def clean_adk(tmp_path_factory):
    """400 noise-free demo particles."""
    return _demo_particles(tmp_path_factory, noise_free=True, n=400)


def test_half_sets_find_the_same_map_apart_and_the_best_pair_is_kept(clean_adk):
    """Each half set's ab initio, on its own particles, finds the map; carried into one frame the two
    agree near the ab initio's band limit (L / end_shells = 6.4 px), within the limit. A start cut
    short (one iteration: the particles' rotational average at the first band) explains its half
    worse, and is not kept."""
    cut_short = dataclasses.replace(HALF_SET_RUN, iterations=1)
    built = ab_initio_half_sets(clean_adk, alternate_half_sets(len(clean_adk)), [cut_short, HALF_SET_RUN],
                                progress=False)
    assert built.band_px == pytest.approx(6.4)
    assert built.starts == (1, 1)
    assert built.start_agreement_px <= MAX_START_DISAGREEMENT * built.band_px
    assert all(errors[1] < errors[0] for errors in built.search_errors)
    # the second half's map is in the first's frame (aligned), and the start is their average
    half1, half2 = built.half_volumes
    assert float(torch.corrcoef(torch.stack([half1.flatten(), half2.flatten()]))[0, 1]) > 0.8
    assert torch.allclose(built.volume, (half1 + half2) / 2)


def test_half_sets_that_hold_no_common_structure_do_not_agree(clean_adk):
    """When half set 2 holds only noise (with real CTFs), its ab initio map is some noise-derived
    blob: the two maps do not agree to the limit, whatever alignment is tried — the gold standard
    will then withhold the resolution."""
    halves = alternate_half_sets(len(clean_adk))
    noise = NoiseReplaced(clean_adk, halves[1], std=float(clean_adk[np.arange(50)].images.std()))
    built = ab_initio_half_sets(noise, halves, [HALF_SET_RUN], progress=False)
    assert built.start_agreement_px > MAX_START_DISAGREEMENT * built.band_px


def test_runs_sharing_a_budget_keep_their_whole_schedules(monkeypatch):
    """With a shared budget each run keeps its schedule: another starts only while the longest run
    so far still fits in what is left, and only a first run that alone does not fit is cut short.
    (A clock advanced 10 s per run stands in for the runs.)"""
    import types

    from cryoace.reconstruct import ab_initio as module

    clock = [0.0]
    given = []

    def run(dataset, volume, settings, **kwargs):
        given.append(settings.max_time_s)
        clock[0] += 9.0
        whole = settings.max_time_s is None or settings.max_time_s >= 9.0  # else cut short: fewer iterations
        return module.AbInitioResult(volume=torch.zeros(2, 2, 2), iterations=[None] * (settings.iterations - 1 + whole))

    def error(*args, **kwargs):
        clock[0] += 1.0
        return float(len(given))

    monkeypatch.setattr(module, "ab_initio", run)
    monkeypatch.setattr(module, "mean_search_error", error)
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    starts = [AbInitioSettings(seed=k, max_time_s=3.0) for k in range(4)]

    maps, errors = module.ab_initio_starts(None, starts, progress=False, budget_s=25.0)
    assert errors == [1.0, 2.0] and len(maps) == 2  # 0→10 s, 10→20 s; 5 s left < 10 s: no third run
    assert given == [25.0, 15.0]  # the budget overrides each run's own; none is cut short
    given.clear()
    maps, _ = module.ab_initio_starts(None, starts, progress=False, budget_s=4.0)
    assert len(maps) == 1 and given == [4.0]  # not even one fits: the first is brought forward
    # a second opinion is made even beyond the budget (min_runs), like the first run: cut short as far as it
    # was, or whole
    given.clear()
    beyond = []
    maps, _ = module.ab_initio_starts(None, starts, progress=False, budget_s=4.0, min_runs=2,
                                      on_beyond_budget=beyond.append)
    assert len(maps) == 2 and given == [4.0, 4.0] and beyond == [1]  # the second run is said to exceed it
    given.clear()
    maps, _ = module.ab_initio_starts(None, starts, progress=False, budget_s=15.0, min_runs=2,
                                      on_beyond_budget=beyond.append)
    assert len(maps) == 2 and given == [15.0, None]  # 0→10 s whole; the second whole (to 20 s); no third
    assert beyond == [1, 1]
    maps, _ = module.ab_initio_starts(None, starts, progress=False, budget_s=25.0, min_runs=2,
                                      on_beyond_budget=beyond.append)
    assert len(maps) == 2 and beyond == [1, 1]  # both runs fit: nothing beyond the budget
    given.clear()
    maps, _ = module.ab_initio_starts(None, starts, progress=False)
    assert len(maps) == 4 and given == [3.0] * 4  # no shared budget: every run, each under its own
    # further runs, one at a time, until enough (here: 6 maps) or the budget is spent
    given.clear()
    asked = []

    def enough(maps, errors):
        asked.append(len(maps))
        return len(maps) >= 6

    maps, _ = module.ab_initio_starts(None, starts[:2], progress=False, more=starts[2:] * 3, enough=enough)
    assert len(maps) == 6 and asked == [2, 3, 4, 5, 6]
    maps, _ = module.ab_initio_starts(None, starts[:2], progress=False, budget_s=45.0, more=starts[2:] * 3,
                                      enough=enough)
    assert len(maps) == 4  # 0→40 s: the fifth would not fit


def test_start_consensus_finds_the_kept_map_again_in_another_runs_frame():
    """Another run's map of the same structure lives in its own frame (here turned 90° and moved 2 px,
    with noise): aligned, it agrees with the kept map within the limit the gold standard asks of
    independent starts (1.4 × the band limit); a map of another molecule (ADK in the spike's box)
    agrees with neither. A single run has nothing to agree with."""
    from cryoace.evaluate.map_align import gaussian_lowpass
    from cryoace.io.mrc import read_volume
    from cryoace.reconstruct.ab_initio import start_consensus

    def band_limited(name: str) -> torch.Tensor:  # an ab initio map: 10 shells of a 64-px box
        return gaussian_lowpass(torch.tensor(read_volume(TEST_DATA / "volumes" / name).data).double(), 10 / 64)

    spike, adk = band_limited("spike_6vyb_L64_3.0A.mrc"), band_limited("adk_open_4ake_L64_1.5A.mrc")
    generator = torch.Generator().manual_seed(0)
    again = torch.rot90(torch.roll(spike, 2, dims=0), 1, dims=(1, 2))
    again = again + 0.1 * float(spike.std()) * torch.randn(spike.shape, generator=generator, dtype=spike.dtype)
    limit = MAX_START_DISAGREEMENT * 64 / 10
    maps = [spike, again, adk]
    assert start_consensus(maps, 0, 3.0) <= limit
    assert start_consensus(maps, 2, 3.0) > limit
    assert start_consensus([spike], 0, 3.0) is None
    known = {(0, 1): 1.0}  # pairs measured before are not aligned again
    assert start_consensus(maps, 0, 3.0, known=known) == 1.0 and set(known) == {(0, 1), (0, 2)}
