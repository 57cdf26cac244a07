"""cryoSPIN's multi-head encoder: K rotation hypotheses per image, all rendered, the best-fitting one
kept ("winner takes all") in the loss, in the PIP loss and in prediction; only the winner is trained."""

from __future__ import annotations

import pytest
import torch

from cryoace.models import PoseEncoder, ResNetPoseEncoder
from cryoace.physics.forward import VoxelFourierVolume, render_images
from cryoace.physics.rotations import random_rotmat
from cryoace.train.losses import HalfDiscGrid, compute_loss
from cryoace.train.pip import PIPBatch, pip_pose_loss
from cryoace.types import Pose

from helpers import adk_volume  # noqa: E402

F64 = torch.float64


def test_encoder_gives_k_proper_rotations_per_image_that_differ_at_initialisation():
    torch.manual_seed(0)
    encoder = PoseEncoder(32, 2.0, channels=(8, 16), convs_per_block=(1, 1), mlp_hidden=32, n_heads=4).eval()
    pose = encoder(torch.randn(5, 32, 32))
    assert pose.rotmat.shape == (5, 4, 3, 3) and pose.shift_angst.shape == (5, 2)
    eye = torch.eye(3).expand(5, 4, 3, 3)
    assert torch.allclose(pose.rotmat @ pose.rotmat.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(pose.rotmat), torch.ones(5, 4), atol=1e-5)
    # the hypotheses of one image are different rotations (angles between heads well above 0)
    rel = pose.rotmat[:, :1].transpose(-1, -2) @ pose.rotmat[:, 1:]
    angle = torch.arccos(((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))
    assert angle.min() > 0.05
    # one head keeps the single-pose shape, and the ResNet trunk takes the option too
    assert PoseEncoder(32, 2.0, channels=(8,), convs_per_block=(1,)).eval()(torch.randn(2, 32, 32)).rotmat.shape \
        == (2, 3, 3)
    resnet = ResNetPoseEncoder(32, 2.0, widths=(8, 8, 8, 8), mlp_hidden=16, n_heads=3).eval()
    assert resnet(torch.randn(2, 32, 32)).rotmat.shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match="n_heads"):
        PoseEncoder(32, 2.0, channels=(8,), convs_per_block=(1,), n_heads=0)


class _Hypotheses(torch.nn.Module):
    """An 'encoder' whose K rotation hypotheses are given parameters (so their gradients can be read)."""

    def __init__(self, rotmat: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.rotmat = torch.nn.Parameter(rotmat.clone())
        self.shift = shift

    def forward(self, images):
        views = images.shape[0] // self.rotmat.shape[0]
        return Pose(self.rotmat.repeat(views, 1, 1, 1), self.shift.repeat(views, 1))


@pytest.mark.parametrize("loss", ["l2", "symmetric", "gsym"])
def test_the_loss_keeps_the_hypothesis_whose_projection_fits_and_trains_only_it(loss):
    size, pixel_size, n, heads = 32, 1.5, 5, 3
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(11)
    r_true = random_rotmat(n, g, F64)
    t_true = torch.randn(n, 2, generator=g, dtype=F64) * 2.0
    images = render_images(volume, Pose(r_true, t_true), pixel_size, size)
    right_head = torch.tensor([2, 0, 1, 1, 0])  # the true rotation sits in a different head per image
    hypotheses = random_rotmat(n * heads, g, F64).reshape(n, heads, 3, 3)
    hypotheses[torch.arange(n), right_head] = r_true
    encoder = _Hypotheses(hypotheses, t_true)
    grid = HalfDiscGrid(size, dtype=F64)
    ps = torch.full((n,), pixel_size, dtype=F64)
    out = compute_loss(encoder, volume, images, ps, grid, loss=loss)
    assert torch.equal(out.head, right_head)
    assert not out.rotated_won.any()
    assert torch.allclose(out.pose.rotmat, r_true, atol=1e-12)
    assert torch.allclose(out.pose.shift_angst, t_true, atol=1e-12)
    assert out.error.max() < 1e-6 * images.pow(2).mean()
    # the kept error is the minimum over the heads of each head's own loss
    per_head = torch.stack([compute_loss(_Hypotheses(hypotheses[:, h:h + 1], t_true), volume, images, ps, grid,
                                         loss=loss).error for h in range(heads)])
    assert torch.allclose(out.error, per_head.min(0).values)
    # winner takes all: a slightly wrong winner gets a gradient, the losing hypotheses none
    nudge = torch.linalg.matrix_exp(torch.tensor([[0, -0.05, 0], [0.05, 0, 0], [0, 0, 0]], dtype=F64))
    encoder.rotmat.data[torch.arange(n), right_head] = r_true @ nudge
    compute_loss(encoder, volume, images, ps, grid, loss=loss).loss.backward()
    grad = encoder.rotmat.grad.flatten(2).norm(dim=-1)  # (n, heads)
    winners = torch.zeros(n, heads, dtype=torch.bool)
    winners[torch.arange(n), right_head] = True
    assert (grad[winners] > 0).all() and (grad[~winners] == 0).all()


def test_the_symmetric_loss_searches_every_head_on_both_paths():
    size, pixel_size, n, heads = 32, 1.5, 4, 2
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(12)
    r_true = random_rotmat(n, g, F64)
    images = render_images(volume, Pose(r_true, torch.zeros(n, 2, dtype=F64)), pixel_size, size)
    d = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64))
    # head 1 of the *rotated* path holds the rotated image's pose D·R; everything else is wrong

    class RightOnRotatedHead1(torch.nn.Module):
        def forward(self, views):
            rotmat = random_rotmat(2 * n * heads, g, F64).reshape(2 * n, heads, 3, 3)
            rotmat[n:, 1] = d @ r_true
            return Pose(rotmat, torch.zeros(2 * n, 2, dtype=F64))

    out = compute_loss(RightOnRotatedHead1(), volume, images, torch.full((n,), pixel_size, dtype=F64),
                       HalfDiscGrid(size, dtype=F64), loss="symmetric")
    assert out.rotated_won.all() and (out.head == 1).all()
    assert torch.allclose(out.pose.rotmat, r_true, atol=1e-12)  # mapped back to the original frame


def test_pip_pose_loss_scores_the_closest_hypothesis():
    g = torch.Generator().manual_seed(13)
    target = PIPBatch(images=torch.zeros(3, 8, 8, dtype=F64), rotmat=random_rotmat(3, g, F64),
                      shift_angst=torch.zeros(3, 2, dtype=F64))
    ps = torch.ones(3, dtype=F64)
    hypotheses = random_rotmat(6, g, F64).reshape(3, 2, 3, 3)
    wrong = pip_pose_loss(Pose(hypotheses, torch.zeros(3, 2, dtype=F64)), target, ps)
    assert wrong.rotation > 0.1
    hypotheses[:, 1] = target.rotmat
    right = pip_pose_loss(Pose(hypotheses, torch.zeros(3, 2, dtype=F64)), target, ps)
    assert right.rotation.abs() < 1e-24 and right.loss.abs() < 1e-24


def test_predict_poses_without_the_symmetric_choice_still_picks_the_fitting_hypothesis():
    """``predict_poses(symmetric=False)`` renders a multi-head encoder's hypotheses (the l2 path) and
    returns one rotation per particle: the one whose projection fits."""
    from types import SimpleNamespace

    from cryoace.train.predict import predict_poses

    size, pixel_size, n, heads = 32, 1.5, 4, 3
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(14)
    r_true = random_rotmat(n, g, F64)
    images = render_images(volume, Pose(r_true, torch.zeros(n, 2, dtype=F64)), pixel_size, size)
    hypotheses = random_rotmat(n * heads, g, F64).reshape(n, heads, 3, 3)
    hypotheses[torch.arange(n), torch.tensor([1, 2, 0, 1])] = r_true
    encoder = _Hypotheses(hypotheses, torch.zeros(n, 2, dtype=F64))
    encoder.n_heads = heads
    batch = SimpleNamespace(images=images, ctf=None, pixel_size=torch.full((n,), pixel_size, dtype=F64),
                            index=torch.arange(n))
    dataset = type("Stack", (), {"image_size": size, "has_ctf": False, "__len__": lambda self: n,
                                 "batches": lambda self, batch_size: [batch]})()
    pose = predict_poses(encoder, volume, dataset, symmetric=False)
    assert pose.rotmat.shape == (n, 3, 3)
    assert torch.allclose(pose.rotmat, r_true, atol=1e-12)
