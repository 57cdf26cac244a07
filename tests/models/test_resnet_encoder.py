"""ResNetPoseEncoder: PoseEncoder's interface and heads on a ResNet-18 trunk (plain torch)."""

import pytest
import torch

from cryoace.models import FilterBankPoseEncoder, PoseEncoder, ResNetPoseEncoder, count_parameters
from cryoace.models.resnet import BasicBlock, ResNetTrunk
from cryoace.types import Pose

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(widths=(4, 8, 8, 16), mlp_hidden=16)


def _images(n, size, seed=0):
    return torch.randn(n, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [16, 32, 48])
def test_shapes_and_valid_rotations(size):
    torch.manual_seed(0)
    enc = ResNetPoseEncoder(size, pixel_size=2.0, **TINY)
    pose = enc(_images(4, size))
    assert isinstance(pose, Pose) and isinstance(enc, FilterBankPoseEncoder)
    assert pose.rotmat.shape == (4, 3, 3) and pose.shift_angst.shape == (4, 2)
    assert pose.rotmat.dtype == torch.float32
    r = pose.rotmat.double()
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert enc.latent_dim == 16 and enc.latent(_images(2, size)).shape == (2, 16)
    assert enc.feature_size == max(1, -(-size // 32))  # /32, rounded up by the padded strides


def test_same_bank_heads_and_shift_bound_as_pose_encoder():
    torch.manual_seed(0)
    enc = ResNetPoseEncoder(32, pixel_size=2.5, **TINY)
    vgg = PoseEncoder(32, pixel_size=2.5, channels=(8,), convs_per_block=(1,), mlp_hidden=16)
    assert torch.equal(enc.filters, vgg.filters) and enc.sigmas_px == vgg.sigmas_px
    assert "filters" in enc.state_dict() and all(p is not enc.filters for p in enc.parameters())
    assert enc.max_shift_angst == pytest.approx(0.15 * 32 * 2.5)
    assert [type(m) for m in enc.rotation_head] == [type(m) for m in vgg.rotation_head]
    assert enc.rotation_head[-1].out_features == 6 and enc.shift_head[-1].out_features == 2
    assert enc(_images(8, 32)).shift_angst.abs().max() < 0.05 * enc.max_shift_angst  # starts near 0
    with torch.no_grad():  # saturated head: bounded by max_shift_angst
        enc.shift_head[-1].weight.normal_(0, 100.0)
    shift = enc(_images(8, 32)).shift_angst
    assert shift.abs().max() <= enc.max_shift_angst and shift.abs().max() > 0.9 * enc.max_shift_angst
    off = ResNetPoseEncoder(32, pixel_size=1.0, max_shift_angst=0.0, **TINY)
    assert torch.count_nonzero(off(_images(2, 32)).shift_angst) == 0


def test_every_parameter_gets_gradients():
    torch.manual_seed(0)
    enc = ResNetPoseEncoder(32, pixel_size=1.0, **TINY)
    pose = enc(_images(4, 32))
    shift = pose.shift_angst
    loss = ((pose.rotmat - torch.randn(4, 3, 3)) ** 2).sum() + (shift ** 2).sum() + shift.sum()
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert enc.filters.grad is None


def test_full_width_resnet18_trunk_has_about_11m_parameters():
    enc = ResNetPoseEncoder(64, pixel_size=1.0)
    trunk = count_parameters(enc.cnn)
    # torchvision's resnet18 without fc: 11,176,512 with a 3-channel stem; ours has 5 channels
    assert trunk == 11_176_512 + 7 * 7 * 2 * 64 == 11_182_784
    assert enc.latent_dim == 512
    convs = [m for m in enc.cnn.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(convs) == 17 and len([m for m in enc.cnn.modules() if isinstance(m, BasicBlock)]) == 8
    assert enc.cnn.stem[0].in_channels == 5 and enc.cnn.stem[0].kernel_size == (7, 7)


def test_trunk_options_and_validation():
    trunk = ResNetTrunk(5, widths=(4, 8), blocks=(1, 3), stem_kernel=3, stem_pool=False)
    x = torch.randn(2, 5, 32, 32)
    assert trunk(x).shape == (2, 8, 1, 1)
    assert trunk.output_size(32) == 8 and trunk.stages(trunk.stem(x)).shape[-1] == 8
    with pytest.raises(ValueError):
        ResNetTrunk(5, widths=(4, 8), blocks=(2,))
