"""PoseEncoder: shapes, valid rotations, bounded shifts, the fixed Gaussian bank, sizes, channels_last."""

import pytest
import torch

from cryoace.models import PoseEncoder, ResNetPoseEncoder, count_parameters, gaussian_filter_bank
from cryoace.types import Pose

TINY = dict(channels=(8, 16, 32), convs_per_block=(1, 1, 1), mlp_hidden=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, size, size, generator=g)


@pytest.mark.parametrize("size", [32, 48, 64, 128])
def test_tiny_encoder_shapes_and_valid_rotations(size):
    torch.manual_seed(0)
    enc = PoseEncoder(size, pixel_size=2.0, **TINY)
    pose = enc(_images(4, size))
    assert isinstance(pose, Pose)
    assert pose.rotmat.shape == (4, 3, 3) and pose.shift_angst.shape == (4, 2)
    r = pose.rotmat.double()
    eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    torch.testing.assert_close(r @ r.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert enc.feature_size >= 1 and enc.latent_dim == 32 * min(2, enc.feature_size) ** 2


def test_default_widths_build_and_run_at_small_size():
    torch.manual_seed(0)
    enc = PoseEncoder(32, pixel_size=1.0)
    assert enc.feature_size == 1  # five pools: 32 → 1
    assert len([m for m in enc.cnn if isinstance(m, torch.nn.Conv2d)]) == 13  # VGG16: 2+2+3+3+3
    pose = enc(_images(2, 32))
    assert pose.rotmat.shape == (2, 3, 3)
    # pooling stops at 1 px even when there are more blocks than halvings
    enc = PoseEncoder(32, pixel_size=1.0, channels=(4,) * 7, convs_per_block=(1,) * 7, mlp_hidden=8)
    assert enc(_images(2, 32)).rotmat.shape == (2, 3, 3)


def test_shift_bounded_in_angstrom_and_default_bound():
    enc = PoseEncoder(32, pixel_size=2.5, **TINY)
    assert enc.max_shift_angst == pytest.approx(0.15 * 32 * 2.5)
    pose = enc(_images(8, 32))
    assert pose.shift_angst.abs().max() < 0.05 * enc.max_shift_angst  # starts near 0
    with torch.no_grad():  # saturate the head: shifts reach but never pass the bound
        enc.shift_head[-1].weight.normal_(0, 100.0)
    shift = enc(_images(8, 32)).shift_angst
    assert shift.abs().max() <= enc.max_shift_angst
    assert shift.abs().max() > 0.9 * enc.max_shift_angst
    enc0 = PoseEncoder(32, pixel_size=1.0, max_shift_angst=0.0, **TINY)
    assert torch.count_nonzero(enc0(_images(2, 32)).shift_angst) == 0


def test_filter_bank_is_fixed_and_narrowest_is_identity():
    enc = PoseEncoder(32, pixel_size=1.0, **TINY)
    assert enc.filters.shape == (5, 1, 11, 11)
    assert not enc.filters.requires_grad
    assert all(p is not enc.filters for p in enc.parameters())
    assert "filters" in enc.state_dict()
    assert enc.sigmas_px[0] == pytest.approx(0.1) and enc.sigmas_px[-1] == pytest.approx(10.0)
    torch.testing.assert_close(enc.filters.sum(dim=(-2, -1)), torch.ones(5, 1))
    identity = torch.zeros(11, 11)
    identity[5, 5] = 1
    torch.testing.assert_close(enc.filters[0, 0], identity, atol=1e-12, rtol=0)
    # the sigma=0.1 channel of the filtered stack is the (standardised) image itself
    img = _images(2, 32)
    filtered = enc.filter_images(img)
    assert filtered.shape == (2, 5, 32, 32)
    std = (img - img.mean((-2, -1), keepdim=True)) / (img.std((-2, -1), keepdim=True) + 1e-6)
    torch.testing.assert_close(filtered[:, 0], std, atol=1e-5, rtol=0)
    # wider filters smooth more: the filtered variance decreases with sigma
    var = filtered.var(dim=(-2, -1)).mean(0)
    assert torch.all(var[1:] < var[:-1])
    # a training step leaves the bank untouched
    before = enc.filters.clone()
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc(img).rotmat.sum().backward()
    opt.step()
    assert torch.equal(enc.filters, before) and enc.filters.grad is None


def test_gaussian_filter_bank_custom():
    bank = gaussian_filter_bank([1.0, 2.0], size=7, dtype=torch.float64)
    assert bank.shape == (2, 1, 7, 7)
    torch.testing.assert_close(bank[:, 0], bank[:, 0].transpose(-1, -2))
    assert bank[0, 0, 3, 3] == bank[0, 0].max()
    with pytest.raises(ValueError):
        gaussian_filter_bank([1.0], size=6)


def test_every_parameter_gets_gradients_shift_head_included():
    torch.manual_seed(0)
    enc = PoseEncoder(32, pixel_size=1.0, **TINY)
    pose = enc(_images(4, 32))
    target = torch.randn(4, 3, 3)
    loss = ((pose.rotmat - target) ** 2).sum() + (pose.shift_angst ** 2).sum() + pose.shift_angst.sum()
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("cls, kwargs, size", [
    (PoseEncoder, TINY, 64),
    (ResNetPoseEncoder, dict(widths=(4, 8, 8, 16), mlp_hidden=16), 32),
])
def test_channels_last_matches_contiguous(cls, kwargs, size):
    torch.manual_seed(0)
    enc = cls(size, pixel_size=1.0, **kwargs).eval()
    img = _images(3, size)
    ref = enc(img)
    enc_cl = cls(size, pixel_size=1.0, channels_last=True, **kwargs).eval()
    enc_cl.load_state_dict(enc.state_dict())
    enc_cl = enc_cl.to(memory_format=torch.channels_last)
    out = enc_cl(img)
    torch.testing.assert_close(out.rotmat, ref.rotmat, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.shift_angst, ref.shift_angst, atol=1e-5, rtol=1e-4)


def test_accepts_channel_dim_float64_and_batch_statistics_in_train_mode():
    torch.manual_seed(0)
    enc = PoseEncoder(32, pixel_size=1.0, **TINY).eval()
    img = _images(2, 32)
    a = enc(img)
    b = enc(img[:, None].double())
    torch.testing.assert_close(a.rotmat, b.rotmat)
    assert a.rotmat.dtype == torch.float32
    assert count_parameters(enc) > 0


def _mean_viewing_direction_norm(rotmat: torch.Tensor) -> float:
    """|mean of the viewing directions| (the volume-frame image z axis, row 3 of R): about 0 for poses
    spread over SO(3), 1 when every image gets the same direction."""
    return float(rotmat[:, 2, :].double().mean(0).norm())


@pytest.mark.parametrize("cls,kwargs", [(PoseEncoder, TINY), (PoseEncoder, dict(channels=(16, 32, 64, 64),
                                        convs_per_block=(1, 1, 1, 1), mlp_hidden=128)),
                                        (ResNetPoseEncoder, dict(widths=(8, 16, 32, 64), mlp_hidden=64))])
def test_initial_rotations_spread_over_so3(cls, kwargs):
    """At initialisation the rotation head's predictions for random images are spread (issue 14): the
    mean viewing direction (averaged over three initialisations) is short in training mode and, once
    the BatchNorm running statistics have seen the data, in eval mode. Without the head's BatchNorm
    layers it is 0.7-0.99 long; uniformly random poses give about 0.1 for 96 images."""
    train, evaluated = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        enc = cls(32, pixel_size=2.0, **kwargs).train()
        images = _images(96, 32, seed=10 + seed)
        with torch.no_grad():
            train.append(_mean_viewing_direction_norm(enc(images).rotmat))
            for i in range(100):  # the running statistics converge (momentum 0.1)
                enc(images[torch.randperm(96, generator=torch.Generator().manual_seed(i))[:32]])
            evaluated.append(_mean_viewing_direction_norm(enc.eval()(images).rotmat))
    assert sum(train) / 3 < 0.3 and sum(evaluated) / 3 < 0.3, (train, evaluated)


def test_checkpoint_without_head_batchnorm_still_loads():
    """An encoder state dict from before the rotation head had BatchNorm layers loads with identity
    norms (eval-mode predictions unchanged to float precision)."""
    torch.manual_seed(0)
    before = PoseEncoder(32, pixel_size=2.0, head_batchnorm=False, **TINY).eval()
    images = _images(5, 32)
    expected = before(images)
    enc = PoseEncoder(32, pixel_size=2.0, **TINY).eval()
    enc.load_state_dict(before.state_dict())
    got = enc(images)
    torch.testing.assert_close(got.rotmat, expected.rotmat, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.shift_angst, expected.shift_angst, atol=1e-4, rtol=1e-4)
