"""Masks (cryoace.evaluate.mask): the raised-cosine edge profile, the thresholded voxels inside, the
exact distance transform, the default threshold on a real map."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryoace.evaluate.mask import default_threshold, distance_to_mask, make_mask
from cryoace.io.mrc import read_volume
from cryoace.physics.fourier import fourier_crop

from conftest import TEST_DATA  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"


@pytest.fixture(scope="module")
def adk32() -> torch.Tensor:
    return fourier_crop(torch.from_numpy(read_volume(ADK_L64).data.copy()).double(), 32, ndim=3)


def test_soft_edge_is_a_raised_cosine_of_the_given_width():
    """A slab (z < 10): the voxel at z = 9 + k is k voxels from it."""
    vol = torch.zeros(32, 32, 32)
    vol[:10] = 1.0
    extend, soft = 2.0, 5.0
    mask, threshold = make_mask(vol, threshold=0.5, extend_px=extend, soft_px=soft)
    assert threshold == 0.5
    profile = mask[:, 16, 16].double()
    expected = []
    for z in range(32):
        d = max(0, z - 9)
        if d <= extend:
            expected.append(1.0)
        elif d < extend + soft:
            expected.append(0.5 * (1 + math.cos(math.pi * (d - extend) / soft)))
        else:
            expected.append(0.0)
    np.testing.assert_allclose(profile.numpy(), expected, atol=1e-6)
    assert torch.equal(mask, mask[:, :1, :1].expand_as(mask))  # flat across the slab


def test_threshold_mask_contains_the_thresholded_voxels(adk32):
    t = 0.3 * float(adk32.max())
    hard, _ = make_mask(adk32, threshold=t, extend_px=0, soft_px=0)
    assert torch.equal(hard.bool(), adk32 > t)
    soft, _ = make_mask(adk32, threshold=t, extend_px=2, soft_px=3)
    assert bool((soft[adk32 > t] == 1).all())
    assert float(soft.min()) >= 0.0 and float(soft.max()) == 1.0
    assert float(soft.sum()) > float(hard.sum())


def test_distance_is_exact_up_to_the_needed_range(adk32):
    from scipy.ndimage import distance_transform_edt

    binary = adk32 > 0.3 * float(adk32.max())
    ours = distance_to_mask(binary, 6.0).numpy()
    ref = distance_transform_edt(~binary.numpy())
    near = ref <= 6.0
    np.testing.assert_allclose(ours[near], ref[near], atol=1e-9)
    assert np.isinf(ours[~near]).all()


def test_default_threshold_keeps_the_molecule(adk32):
    mask, threshold = make_mask(adk32)
    assert threshold == pytest.approx(default_threshold(adk32))
    positive = adk32.clamp_min(0)
    inside = float((positive * (mask >= 0.5)).sum() / positive.sum())
    assert inside > 0.95 and float((mask >= 0.5).double().mean()) < 0.5


def test_empty_and_bad_arguments_raise(adk32):
    with pytest.raises(ValueError, match="above the threshold"):
        make_mask(adk32, threshold=1e9)
    with pytest.raises(ValueError):
        make_mask(adk32, extend_px=-1)
    with pytest.raises(ValueError):
        make_mask(adk32, lowpass_angst=15.0)  # no voxel size
