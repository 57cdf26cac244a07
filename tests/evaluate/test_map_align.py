"""Map-to-map alignment without poses (cryoace.evaluate.map_align): a known rotation, shift and mirror
of a real map (ADK, Fourier-cropped to 32 voxels at 3 Å for speed) is recovered to < 2° and < 0.5 px,
also from a map of another box and voxel size; resampling, the rotation grid, the no-search path."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryoace.evaluate.align import MIRROR, mirror_volume, shift_volume, transform_volume
from cryoace.evaluate.map_align import align_maps, map_correlation, resample_map, rotation_grid
from cryoace.io.mrc import read_volume
from cryoace.physics.fourier import fourier_crop
from cryoace.physics.rotations import geodesic_angle, random_rotmat

from conftest import TEST_DATA  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"
FAST = dict(angular_step_deg=20.0, coarse_size=16)  # a coarser search keeps each case ~1–2 s
EYE = torch.eye(3, dtype=torch.float64)


@pytest.fixture(scope="module")
def ref32() -> torch.Tensor:
    """ADK at 3 Å/px in a 32-voxel box."""
    data = torch.from_numpy(read_volume(ADK_L64).data.copy()).to(torch.float64)
    return fourier_crop(data, 32, ndim=3).to(torch.float32)


def _moved(ref: torch.Tensor, seed: int, flip: bool):
    """``ref`` moved by a random rotation Q, mirror and shift t: moved(r) = ref(H Q (r − t))."""
    g = torch.Generator().manual_seed(seed)
    q = random_rotmat(1, g, dtype=torch.float64)[0]
    t = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * 6  # up to ±3 px per axis
    return shift_volume(transform_volume(ref, q, flip), t), q, t


def _errors(result, q: torch.Tensor, t: torch.Tensor, flip: bool) -> tuple[float, float]:
    """Residual rotation (degrees) and translation (px) of aligned(r) = ref(HQ(HG(r − s) − t)):
    the composite is r ↦ HQHG r − HQHG s − HQ t, the identity when HQHG = I and s = −HQ t."""
    hq = MIRROR @ q if flip else q
    total = hq @ result.matrix
    assert float(torch.linalg.det(total)) > 0, "wrong hand"
    angle = math.degrees(float(geodesic_angle(EYE, total)))
    return angle, float((result.shift_px + hq @ t).norm())


@pytest.mark.parametrize("flip,seed", [(True, 3), (False, 8)])
def test_recovers_rotation_shift_and_hand(ref32, flip, seed):
    moving, q, t = _moved(ref32, seed, flip)
    result = align_maps(moving, ref32, 3.0, 3.0, **FAST)
    assert result.flip_hand == flip
    angle, shift_err = _errors(result, q, t, flip)
    assert angle < 2.0 and shift_err < 0.5
    assert result.correlation > 0.98 and result.correlation_other_hand < result.correlation - 0.1
    # the returned map is the moving map carried by the returned transform
    again = shift_volume(transform_volume(moving, result.rotation, result.flip_hand), result.shift_px)
    torch.testing.assert_close(again, result.aligned, atol=1e-4, rtol=0)
    assert map_correlation(result.aligned, ref32) == pytest.approx(result.correlation)


def test_other_box_and_voxel_size(ref32):
    """The moving map is given at 2.5 Å/px in a 40-voxel box; the shift comes back in the reference's
    voxels (3 Å) and Å."""
    moving, q, t = _moved(ref32, 11, True)
    moving = resample_map(moving, 3.0, 2.5, 40)
    assert moving.shape == (40, 40, 40)
    result = align_maps(moving, ref32, 2.5, 3.0, **FAST)
    assert result.resampled_from == (40, 2.5) and result.aligned.shape == ref32.shape
    assert result.flip_hand
    angle, shift_err = _errors(result, q, t, True)
    assert angle < 2.0 and shift_err < 0.5
    torch.testing.assert_close(result.shift_angst, result.shift_px * 3.0)


def test_resample_map_round_trip_and_identity(ref32):
    assert resample_map(ref32, 3.0, 3.0, 32) is not None
    torch.testing.assert_close(resample_map(ref32, 3.0, 3.0, 32), ref32)
    there = resample_map(ref32, 3.0, 2.5, 40)
    back = resample_map(there, 2.5, 3.0, 32)
    assert map_correlation(back, ref32) > 0.99
    # the same physical box at half the voxel size: Fourier crop back is near exact
    padded = resample_map(ref32, 3.0, 3.0, 48)
    torch.testing.assert_close(padded[8:40, 8:40, 8:40], ref32)
    assert float(padded[:8].abs().max()) == 0.0


def test_no_search_only_mirrors(ref32):
    result = align_maps(ref32, ref32, hands="flipped", search=False)
    assert not result.searched and result.flip_hand
    torch.testing.assert_close(result.aligned, mirror_volume(ref32))
    torch.testing.assert_close(result.rotation, EYE)
    assert float(result.shift_px.abs().max()) == 0.0
    d = json.loads(json.dumps(result.to_dict()))
    assert d["flip_hand"] and d["shift_px"] == [0.0, 0.0, 0.0] and d["matrix_HG"][2][2] == -1.0


def test_rotation_grid_is_near_uniform():
    grid = rotation_grid(30.0)
    assert len(grid) == math.ceil(8 * math.pi ** 2 / math.radians(30.0) ** 3)
    torch.testing.assert_close(grid @ grid.transpose(-1, -2), EYE.expand_as(grid))
    assert bool((torch.linalg.det(grid) > 0).all())
    probes = random_rotmat(500, torch.Generator().manual_seed(0), dtype=torch.float64)
    nearest = geodesic_angle(probes[:, None], grid[None]).min(1).values
    assert math.degrees(float(nearest.max())) < 30.0  # every rotation is within a step of the grid


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="hands"):
        align_maps(torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), hands="left")
    with pytest.raises(ValueError, match="cubic"):
        align_maps(torch.zeros(8, 8, 6), torch.zeros(8, 8, 8))


def test_half_map_fsc_of_independently_moved_noisy_copies(ref32):
    """A = map + noise; B = (map + other noise) rotated, mirrored and shifted: after aligning B onto A
    the FSC is the one of the two noisy copies in a common frame."""
    from cryoace.evaluate.fsc import fsc
    from cryoace.evaluate.map_align import half_map_fsc

    g = torch.Generator().manual_seed(5)
    sigma = 0.5 * float(ref32.std())
    noisy = [ref32 + sigma * torch.randn(ref32.shape, generator=g) for _ in range(2)]
    half_b, _, _ = _moved(noisy[1], 4, True)
    result = half_map_fsc(noisy[0], half_b, voxel_size=3.0, **FAST)
    assert result.alignment.flip_hand
    expected = fsc(noisy[0], noisy[1], voxel_size=3.0)
    # interpolation (two resamplings of B) attenuates the highest shells a little
    np.testing.assert_allclose(result.fsc.curve[:12], expected.curve[:12], atol=0.05)
    assert result.resolution.threshold == 0.143 and result.resolution.angstrom is not None
    assert abs(result.resolution.shell - expected.resolution(0.143).shell) < 1.0
