"""Pose and map alignment to ground truth (cryoace.evaluate.align) and pose metrics
(cryoace.evaluate.pose_metrics): exact recovery of a global rotation in both hands, the mirror
relation checked with the real-space projector, the direction of the map transform, error values for
known perturbations, the shift/offset relation, and equal-area pose coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoace.evaluate.align import (
    MIRROR,
    align_rotations,
    apply_alignment,
    estimate_volume_offset,
    mirror_volume,
    resample_volume,
    shift_volume,
    transform_volume,
)
from cryoace.evaluate.fsc import fsc
from cryoace.evaluate.pose_metrics import (
    equal_area_bands,
    expected_uniform_coverage,
    fit_global_offset,
    pose_coverage,
    rotation_errors,
    translation_error,
    viewing_direction_bin,
)
from cryoace.io.mrc import read_volume
from cryoace.physics.projector import project_real_space
from cryoace.physics.rotations import axis_angle_to_rotmat, random_rotmat
from cryoace.physics.shift import apply_shift

from conftest import TEST_DATA  # noqa: E402

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"
EYE = torch.eye(3, dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(size: int = 32, seed: int = 0, n: int = 12, cut: bool = False) -> torch.Tensor:
    """A random asymmetric (chiral) map: Gaussian blobs of random widths/weights inside a ball."""
    g = gen(seed)
    c = torch.arange(size, dtype=torch.float64) - size // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(size, size, size, dtype=torch.float64)
    centres = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * size * 0.45
    widths = 1.5 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    for (cx, cy, cz), w, a in zip(centres, widths, weights, strict=True):
        vol += a * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * w * w))
    if cut:  # exactly zero beyond radius L/2 − 2: the plane z = L/2 that a mirror about L//2 would
        vol = vol * ((x ** 2 + y ** 2 + z ** 2).sqrt() < size / 2 - 2)  # need never carries signal
    return vol


def ball_mask(size: int, radius: float) -> torch.Tensor:
    c = torch.arange(size, dtype=torch.float64) - size // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return ((x ** 2 + y ** 2 + z ** 2).sqrt() <= radius).to(torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- pose alignment -------------------------------------------------------------------------------

@pytest.mark.parametrize("flip", [False, True])
def test_global_rotation_recovered_exactly_in_both_hands(flip):
    r_gt = random_rotmat(500, gen(0), dtype=torch.float64)
    q = random_rotmat(1, gen(1), dtype=torch.float64)[0]
    h = MIRROR if flip else EYE
    # the predicted frame is the truth's rotated by Q (and mirrored): R_pred = H R_gt Q H
    r_pred = h @ r_gt @ q @ h
    al = align_rotations(r_pred, r_gt)
    assert al.flip_hand is flip and al.hand == ("flipped" if flip else "original")
    torch.testing.assert_close(al.rotation, q.T, atol=1e-12, rtol=0)
    torch.testing.assert_close(al.aligned, r_gt, atol=1e-12, rtol=0)
    torch.testing.assert_close(apply_alignment(r_pred, al.rotation, flip), r_gt, atol=1e-12, rtol=0)
    assert al.mean_sq_frobenius < 1e-20 and al.mean_sq_frobenius_other_hand > 1.0
    assert torch.linalg.det(al.rotation) == pytest.approx(1.0)
    errs = rotation_errors(al.aligned, r_gt)
    assert errs.mean_sq_frobenius < 1e-20 and errs.median_angle_deg < 1e-5
    # forcing the wrong hand gives the large error, forcing the right one the same fit
    assert align_rotations(r_pred, r_gt, hands="flipped" if not flip else "original").mean_sq_frobenius > 1.0
    assert align_rotations(r_pred, r_gt, hands="flipped" if flip else "original").flip_hand is flip


def test_single_particle_and_float32_input():
    r_gt = random_rotmat(1, gen(2), dtype=torch.float32)
    q = random_rotmat(1, gen(3), dtype=torch.float32)[0]
    al = align_rotations(r_gt @ q, r_gt.numpy())
    assert al.rotation.dtype == torch.float64
    assert al.mean_sq_frobenius < 1e-10


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        align_rotations(torch.zeros(3, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError):
        align_rotations(random_rotmat(4), random_rotmat(5))
    with pytest.raises(ValueError):
        align_rotations(random_rotmat(4), random_rotmat(4), hands="left")


def test_known_perturbation_gives_known_errors():
    n, deg = 4000, 10.0
    r_gt = random_rotmat(n, gen(4), dtype=torch.float64)
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen(5), dtype=torch.float64), dim=-1)
    r_noisy = r_gt @ axis_angle_to_rotmat(axes * math.radians(deg))
    errs = rotation_errors(r_noisy, r_gt)
    sq = 8 * math.sin(math.radians(deg) / 2) ** 2  # ‖R1 − R2‖²_F = 8 sin²(θ/2) = 0.0608 for 10°
    assert errs.median_angle_deg == pytest.approx(deg, abs=1e-9)
    assert errs.mean_angle_deg == pytest.approx(deg, abs=1e-9)
    assert errs.mean_sq_frobenius == pytest.approx(sq, rel=1e-9)
    assert errs.median_sq_frobenius == pytest.approx(sq, rel=1e-9)
    # the same, in an arbitrary mirrored frame: alignment undoes the frame, not the noise
    q = random_rotmat(1, gen(6), dtype=torch.float64)[0]
    al = align_rotations(MIRROR @ r_noisy @ q @ MIRROR, r_gt)
    assert al.flip_hand
    errs = rotation_errors(al.aligned, r_gt)
    assert errs.median_angle_deg == pytest.approx(deg, abs=0.3)
    assert errs.mean_sq_frobenius == pytest.approx(sq, rel=0.03)


def test_random_predictions_are_far_from_truth():
    r_gt = random_rotmat(2000, gen(7), dtype=torch.float64)
    al = align_rotations(random_rotmat(2000, gen(8), dtype=torch.float64), r_gt)
    errs = rotation_errors(al.aligned, r_gt)
    assert errs.median_angle_deg > 100 and errs.mean_sq_frobenius > 5.5  # Haar: mean 6, median ≈ 126°


# --- the mirror and the map transform, checked with the projector -----------------------------------

def test_mirror_relation_with_projector():
    """projection(v(x, y, −z), R) == projection(v, M R M): the hand flip is a pose conjugation."""
    v = blobs(32, seed=1, cut=True)
    r = random_rotmat(5, gen(9), dtype=torch.float64)
    vm = mirror_volume(v)
    mirrored = project_real_space(vm, r)
    assert rel(mirrored, project_real_space(v, MIRROR @ r @ MIRROR)) < 1e-12
    assert rel(mirrored, project_real_space(v, r)) > 0.2          # the volume is chiral
    assert rel(mirrored, project_real_space(v, MIRROR @ r)) > 0.2  # not a one-sided product
    # the mirror on the grid and through the resampler agree (samples reproduced exactly)
    assert rel(transform_volume(v, EYE, True), vm) < 1e-12
    assert rel(transform_volume(v, EYE, True, oversample=1), vm) < 1e-12


def test_resample_convention_is_active_about_centre():
    """resample_volume(v, A)(r) = v(A r), r = (x, y, z) from index L//2: a 90° turn about z is exact."""
    v = blobs(16, seed=2)
    a = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # (x,y,z)→(−y,x,z)
    out = resample_volume(v, a, oversample=1)
    size = 16
    iz, iy, ix = torch.meshgrid(*(torch.arange(size),) * 3, indexing="ij")
    src_x = size - iy  # x' = −y  → index L//2 − (iy − L//2)
    inside = src_x < size
    expected = torch.zeros_like(v)
    expected[inside] = v[iz[inside], ix[inside], src_x[inside]]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(resample_volume(v, EYE), v, atol=1e-12, rtol=0)
    assert resample_volume(v.float(), EYE).dtype == torch.float32


@pytest.mark.parametrize("flip", [False, True])
def test_transform_volume_consistent_with_pose_alignment(flip):
    """Rendering the transformed map with aligned poses = rendering the predicted map with its poses,
    and the transform takes a prediction in a rotated/mirrored frame back onto the truth."""
    v = blobs(32, seed=3)
    r_gt = random_rotmat(200, gen(10), dtype=torch.float64)
    q = random_rotmat(1, gen(11), dtype=torch.float64)[0]
    h = MIRROR if flip else EYE
    r_pred = h @ r_gt @ q @ h
    v_pred = resample_volume(v, q @ h)  # v_pred(s) = v(Gᵀ H s) with G = Qᵀ: the prediction's map
    view = slice(0, 4)
    assert rel(project_real_space(v_pred, r_pred[view]), project_real_space(v, r_gt[view])) < 0.02

    al = align_rotations(r_pred, r_gt)
    v_al = transform_volume(v_pred, al.rotation, al.flip_hand)
    assert rel(project_real_space(v_al, al.aligned[view]), project_real_space(v_pred, r_pred[view])) < 0.02
    ball = ball_mask(32, 13)  # rotating a cube loses its corners: compare inside the inscribed ball
    assert rel(v_al * ball, v * ball) < 0.01
    assert fsc(v_al * ball, v * ball).curve[:13].min() > 0.99
    # the opposite rotation direction (or the other hand) does not align: the direction is pinned
    assert rel(transform_volume(v_pred, al.rotation.T, al.flip_hand), v) > 0.3
    assert rel(transform_volume(v_pred, al.rotation, not al.flip_hand), v) > 0.3


def test_oversampling_preserves_high_frequencies():
    """Rotating a real map back and forth: trilinear interpolation on a 2× finer (band-limited) grid
    keeps the high frequencies that plain trilinear interpolation smears."""
    v = torch.from_numpy(read_volume(ADK_L64).data.copy()).to(torch.float64)
    q = random_rotmat(1, gen(13), dtype=torch.float64)[0]
    fine = resample_volume(resample_volume(v, q, oversample=2), q.T, oversample=2)
    plain = resample_volume(resample_volume(v, q, oversample=1), q.T, oversample=1)
    f2, f1 = fsc(fine, v).curve, fsc(plain, v).curve
    assert f2[:29].min() > 0.98 and f1[28] < 0.9   # shell 28 = 0.44 cycles/px
    assert rel(fine, v) < 0.5 * rel(plain, v)


# --- shifts and global offsets ----------------------------------------------------------------------

def test_shift_volume_and_offset_estimate():
    v = blobs(32, seed=5)
    torch.testing.assert_close(shift_volume(v, [2, -1, 3]), torch.roll(v, (3, -1, 2), dims=(0, 1, 2)),
                               atol=1e-10, rtol=0)
    d = torch.tensor([1.5, -2.25, 0.75], dtype=torch.float64)
    est = estimate_volume_offset(shift_volume(v, d), v)
    torch.testing.assert_close(est, d, atol=1e-5, rtol=0)
    assert rel(shift_volume(shift_volume(v, d), -est), v) < 1e-4  # Nyquist plane: not exactly invertible


def test_translation_error_known_value():
    t = torch.randn(50, 2, generator=gen(13), dtype=torch.float64)
    assert translation_error(t, t) == 0.0
    assert translation_error(t + torch.tensor([3.0, 4.0], dtype=torch.float64), t) == pytest.approx(25.0)


def test_map_offset_and_shift_relation_with_projector():
    """A map translated by d gives the same images with shifts t + (R d)_xy (RELION origin sign)."""
    v = blobs(32, seed=6)
    d = torch.tensor([1.0, -2.0, 1.5], dtype=torch.float64)
    r = random_rotmat(6, gen(14), dtype=torch.float64)
    t = torch.randn(6, 2, generator=gen(15), dtype=torch.float64) * 2
    truth_images = apply_shift(project_real_space(v, r), t)
    moved = shift_volume(v, d)
    assert rel(apply_shift(project_real_space(moved, r), t + r[:, :2, :] @ d), truth_images) < 0.02
    assert rel(apply_shift(project_real_space(moved, r), t - r[:, :2, :] @ d), truth_images) > 0.3


def test_fit_global_offset_recovers_d():
    r = random_rotmat(400, gen(16), dtype=torch.float64)
    t_gt = torch.randn(400, 2, generator=gen(17), dtype=torch.float64) * 3
    d = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    t_pred = t_gt + r[:, :2, :] @ d
    est, after = fit_global_offset(r, t_pred, t_gt)
    torch.testing.assert_close(est, d, atol=1e-10, rtol=0)
    assert after < 1e-20 and translation_error(t_pred, t_gt) > 1.0
    # all particles seen along z: the z component of d is invisible and comes back as 0
    top = torch.eye(3, dtype=torch.float64).expand(10, 3, 3)
    est, after = fit_global_offset(top, t_gt[:10] + d[:2], t_gt[:10])
    torch.testing.assert_close(est, torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64), atol=1e-10, rtol=0)


# --- pose coverage ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_bins", [1, 2, 3, 10, 100, 768, 3072])
def test_equal_area_bands_partition(n_bins):
    bands = equal_area_bands(n_bins)
    assert bands.sum() == n_bins and (bands >= 1).all()


def test_cells_have_equal_area():
    dirs = torch.randn(400_000, 3, generator=gen(18), dtype=torch.float64)
    counts = np.bincount(viewing_direction_bin(dirs, 300), minlength=300)
    assert len(counts) == 300
    expected = 400_000 / 300
    assert np.abs(counts - expected).max() < 6 * math.sqrt(expected)  # Poisson spread only


def test_viewing_direction_is_third_row():
    # a pose whose image z axis points along volume +x, and one along −x, land in different cells
    along_x = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert torch.linalg.det(along_x[0]) == pytest.approx(1.0)
    from cryoace.evaluate.pose_metrics import viewing_directions
    torch.testing.assert_close(viewing_directions(along_x)[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    b = viewing_direction_bin(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 0, 1.0], [0, 0, -1.0]]), 768)
    assert len(set(b.tolist())) == 4 and b[2] == 0 and b[3] == 767


def test_pose_coverage_uniform_and_concentrated():
    assert pose_coverage(random_rotmat(20000, gen(19), dtype=torch.float64)) > 0.999
    n = 20000
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen(20), dtype=torch.float64), dim=-1)
    within_10deg = axis_angle_to_rotmat(axes * torch.rand(n, 1, generator=gen(21), dtype=torch.float64)
                                        * math.radians(10))
    assert pose_coverage(within_10deg) < 0.02          # a 10° cap is 0.76 % of the sphere
    # in-plane rotations do not move the viewing direction: one cell
    inplane = axis_angle_to_rotmat(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
                                   * torch.linspace(0, 6, 100, dtype=torch.float64)[:, None])
    assert pose_coverage(inplane) == pytest.approx(1 / 768)


def test_expected_uniform_coverage_matches_simulation():
    sims = [pose_coverage(random_rotmat(300, gen(30 + k), dtype=torch.float64)) for k in range(5)]
    assert np.mean(sims) == pytest.approx(expected_uniform_coverage(300), abs=0.02)
