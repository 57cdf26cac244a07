"""Local search first from an encoder's poses, the global search only where the pose score says so
(issue "amortization that pays", item 4), on images made by another simulator (ASPIRE, noise-free
spike, 100 particles: see test_pose_search.py)."""

import math

import numpy as np
import pytest
import torch

from cryoace.physics.forward import VoxelFourierVolume
from cryoace.physics.rotations import axis_angle_to_rotmat, geodesic_angle, random_rotmat
from cryoace.reconstruct.pose_search import pose_score, search_band
from cryoace.reconstruct.refine import (
    RefineSettings,
    alternate_half_sets,
    coarse_steps,
    extend_refinement,
    lowpass,
    refine,
    refine_particles,
)
from cryoace.types import Pose

pytestmark = pytest.mark.usefixtures("one_thread")


def _angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(geodesic_angle(a.double(), b.double()))


def _turned(rotmat: torch.Tensor, degrees: float, seed: int) -> torch.Tensor:
    """Each rotation turned by ``degrees`` about a random axis (an encoder's error)."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(len(rotmat), 3, generator=generator, dtype=torch.float64), dim=-1)
    return rotmat.double() @ axis_angle_to_rotmat(axis * math.radians(degrees))


def test_pose_score_singles_out_the_true_pose(aspire):
    """At the true pose an image stands out from random rotations by many standard deviations; at a
    random pose it does not; and a pure-noise image scores no better at the 'true' pose."""
    dataset, batch, spike = aspire
    volume = VoxelFourierVolume.from_real(spike, pad_factor=2)
    band = search_band(64, 16)
    rotations = random_rotmat(64, generator=torch.Generator().manual_seed(0))
    true = pose_score(volume, batch.images, batch.pixel_size, band, batch.pose, rotations, batch.ctf)
    wrong = Pose(random_rotmat(len(batch.images), generator=torch.Generator().manual_seed(1)), batch.pose.shift_angst)
    random = pose_score(volume, batch.images, batch.pixel_size, band, wrong, rotations, batch.ctf)
    noise = torch.randn(batch.images.shape, generator=torch.Generator().manual_seed(2)) * batch.images.std()
    blind = pose_score(volume, noise, batch.pixel_size, band, batch.pose, rotations, batch.ctf)
    # (the spread of random rotations' errors holds the signal's own variation over views, so even
    # noise-free images stand out by some 5-9 σ, not by their whole signal-to-noise ratio)
    assert float(true.min()) > 4.0 and float(true.median()) > 6.0, true
    assert abs(float(random.median())) < 1.0 and float(random.abs().max()) < 4.0, random
    assert float(blind.abs().max()) < 4.5, blind


def test_coarse_steps_reach_the_encoders_error():
    settings = RefineSettings(local_steps_deg=(4.0, 2.0, 1.0))
    assert coarse_steps(settings, 0.0) == [8.0]
    assert coarse_steps(settings, 20.0) == [8.0]
    assert coarse_steps(settings, 30.0) == [16.0, 8.0]
    assert coarse_steps(settings, 50.0) == [32.0, 16.0, 8.0]


def test_good_starts_are_kept_from_a_local_search_and_wrong_ones_fall_back(aspire):
    """Starts ~12° off for 70 % of the particles and random for the rest: the calibration (a global
    search of the sample) measures their error, the pose score keeps the local results of the good
    ones and sends the random ones to the global search; every pose ends right, the kept ones have
    no measured confidence (NaN) and every particle a pose score."""
    dataset, batch, spike = aspire
    n = len(dataset)
    halves = alternate_half_sets(n)
    maps = torch.stack([spike, spike])
    start = _turned(batch.pose.rotmat, 12.0, seed=3)
    bad = np.random.default_rng(4).permutation(n)[: int(0.3 * n)]
    start[bad] = random_rotmat(len(bad), generator=torch.Generator().manual_seed(5)).double()
    initial = Pose(start, batch.pose.shift_angst.double())
    settings = RefineSettings(check_particles=0, calibration_particles=30)
    result = refine_particles(dataset, maps, halves, settings, initial=initial, progress=False)
    plan = result.local_first
    assert plan is not None and plan.enabled and plan.sample == 30 and plan.particles == n
    assert plan.sample_false_accept <= settings.max_false_accept
    assert 11.0 < plan.encoder_median_deg < 20.0 and 0.6 < plan.reachable < 0.8 and plan.radius_deg < 16.0
    error = _angles_deg(result.pose.rotmat, batch.pose.rotmat)
    # (the global search alone puts 5 % at pseudo-symmetry mates of this spike, ~110-120° off; the
    # threshold lets at most another max_false_accept through)
    assert float(error.median()) < 1.5 and float((error > 10.0).double().mean()) <= 0.1, error
    kept = torch.isnan(result.confidence)
    # the 30 calibration particles were searched globally (and need no second search), as were the others
    # that fell back: they have a measured confidence
    assert plan.fell_back == int((~kept).sum()) >= 30
    # most random starts fell back to the global search, most good ones outside the sample were kept
    assert float(kept[bad].double().mean()) < 0.5
    good = np.setdiff1d(np.arange(n), bad)
    assert int(kept[good].sum()) >= 0.8 * (len(good) - 30)
    assert float(result.score[good].median()) > 6.0
    columns = result.star_columns()
    assert np.isnan(columns["cryoacePoseConfidence"]).sum() == int(kept.sum())
    assert np.allclose(columns["cryoacePoseScore"], result.score.numpy())


def test_wrong_starts_turn_the_local_search_off(aspire):
    """Random starts (an encoder in another frame): their error on the sample is beyond the reach of
    a local search, so every particle is searched globally — and found."""
    dataset, batch, spike = aspire
    n = len(dataset)
    wrong = Pose(random_rotmat(n, generator=torch.Generator().manual_seed(6)).double(), batch.pose.shift_angst.double())
    result = refine_particles(dataset, torch.stack([spike, spike]), alternate_half_sets(n),
                              RefineSettings(check_particles=0), initial=wrong, progress=False)
    assert not result.local_first.enabled and result.local_first.fell_back == 0
    assert float(_angles_deg(result.pose.rotmat, batch.pose.rotmat).median()) < 2.0
    assert not bool(torch.isnan(result.confidence).any())


def test_the_refined_subset_calibrates_the_final_pass(aspire):
    """After rounds on half of the particles, the final pass calibrates its local search on the subset
    (their refined poses are the references: no global search for the sample) and poses the others
    from starts 8° off without a global search for most."""
    dataset, batch, spike = aspire
    n = len(dataset)
    subset = np.arange(n // 2)
    settings = RefineSettings(rounds=2, start_shells=12, shells_per_round=6, check_particles=0,
                              calibration_particles=40)
    part = refine(dataset, lowpass(spike, 8.0), settings, rows=subset, half_sets=alternate_half_sets(len(subset)),
                  progress=False)
    assert part.score is not None and float(part.score.median()) > 5.0  # measured in the final round
    initial = Pose(_turned(batch.pose.rotmat, 8.0, seed=7), batch.pose.shift_angst.double())
    full = extend_refinement(dataset, part, np.arange(n), alternate_half_sets(n), settings, initial=initial,
                             progress=False)
    plan = full.local_first
    assert plan.sample == 40 and plan.enabled and plan.particles == n - len(subset)
    assert 7.0 < plan.encoder_median_deg < 10.0
    assert plan.fell_back < 0.3 * plan.particles
    new = np.arange(n // 2, n)
    assert float(_angles_deg(full.pose.rotmat[new], batch.pose.rotmat[new]).median()) < 2.0
    assert torch.allclose(full.pose.rotmat[subset], part.pose.rotmat.double(), atol=1e-6)
    # without local_first every particle is searched globally as before
    plain = extend_refinement(dataset, part, np.arange(n), alternate_half_sets(n),
                              RefineSettings(**{**settings.__dict__, "local_first": False}), initial=initial,
                              progress=False)
    assert plain.local_first is None and not bool(torch.isnan(plain.confidence).any())


def test_score_threshold_keeps_the_false_accept_rate():
    """The lowest threshold whose kept sample has at most the allowed fraction of worse fits."""
    from cryoace.reconstruct.refine import score_threshold

    score = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    off = torch.tensor([0, 0, 0, 0, 1, 0, 0, 0, 1, 1], dtype=torch.float64)
    assert score_threshold(score, off, 0.15) == (2.0, 0.8, 1 / 8)
    assert score_threshold(score, off, 0.0) == (6.0, 0.4, 0.0)
    assert score_threshold(score, torch.ones(10, dtype=torch.float64), 0.05)[0] == math.inf


def _two_process_worker(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: the local-first pass of the ASPIRE particles, its share of them."""
    import sys
    from pathlib import Path

    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import aspire_spike_clean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dataset, batch, spike = aspire_spike_clean()
    n = len(dataset)
    initial = Pose(_turned(batch.pose.rotmat, 12.0, seed=3), batch.pose.shift_angst.double())
    mine = np.arange(rank, n, 2)  # a rank needs only its own particles' starts
    own = Pose(torch.zeros(n, 3, 3, dtype=torch.float64), torch.zeros(n, 2, dtype=torch.float64))
    own.rotmat[mine], own.shift_angst[mine] = initial.rotmat[mine], initial.shift_angst[mine]
    result = refine_particles(dataset, torch.stack([spike, spike]), alternate_half_sets(n),
                              RefineSettings(check_particles=0, calibration_particles=60), initial=own,
                              progress=False, ranks=(rank, 2))
    if rank == 0:
        torch.save({"rotmat": result.pose.rotmat, "score": result.score, "confidence": result.confidence,
                    "maps": result.half_volumes, "threshold": result.local_first.threshold,
                    "fell_back": result.local_first.fell_back}, out)
    dist.destroy_process_group()


def test_two_processes_calibrate_and_search_as_one(aspire, tmp_path):
    """The local-first pass split over two gloo processes (each holding only its own particles'
    starts): the calibration sample is shared by the sums, so the threshold, the kept particles, the
    poses, scores and half maps equal one process's."""
    import torch.multiprocessing as mp

    dataset, batch, spike = aspire
    n = len(dataset)
    initial = Pose(_turned(batch.pose.rotmat, 12.0, seed=3), batch.pose.shift_angst.double())
    one = refine_particles(dataset, torch.stack([spike, spike]), alternate_half_sets(n),
                           RefineSettings(check_particles=0, calibration_particles=60), initial=initial, progress=False)
    out = tmp_path / "two.pt"
    mp.spawn(_two_process_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    two = torch.load(out, weights_only=True)
    assert one.local_first.enabled and two["threshold"] == pytest.approx(one.local_first.threshold, abs=1e-4)
    assert two["fell_back"] == one.local_first.fell_back
    assert torch.allclose(two["rotmat"], one.pose.rotmat, atol=1e-5)
    assert torch.allclose(two["score"], one.score, atol=1e-4)
    assert torch.equal(torch.isnan(two["confidence"]), torch.isnan(one.confidence))
    assert torch.allclose(two["maps"], one.half_volumes, rtol=1e-4, atol=1e-5 * float(one.half_volumes.abs().max()))


def test_the_finest_search_halves_the_shift_step(aspire):
    """Shifts end on a grid of half ``local_shift_step_px``: on noise-free particles (ASPIRE's shifts are
    not on any grid) the found shifts are within a quarter step of the truth, not half a step."""
    dataset, batch, spike = aspire
    n = len(dataset)
    settings = RefineSettings(check_particles=0, local_shift_step_px=0.5)
    result = refine_particles(dataset, torch.stack([spike, spike]), alternate_half_sets(n), settings,
                              progress=False)
    right = _angles_deg(result.pose.rotmat, batch.pose.rotmat) < 2.0  # (not the pseudo-symmetry mates)
    pixel_size = batch.pixel_size[:, None].double()
    error_px = (result.pose.shift_angst / pixel_size - batch.pose.shift_angst.double() / pixel_size)[right].abs()
    true_px = batch.pose.shift_angst.double() / pixel_size
    assert float((true_px - torch.round(true_px * 2) / 2).abs().mean()) > 0.08  # the truth is off the 0.5 px grid
    # uniform rounding to a 0.25 px grid leaves 0.0625 px on average, to 0.5 px 0.125 px
    assert float(right.double().mean()) > 0.8 and float(error_px.mean()) < 0.09, error_px.mean()
