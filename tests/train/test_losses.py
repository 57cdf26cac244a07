"""The symmetric loss: the 180° rotation is exact about L//2, the pose of the rotated path maps back
to the original frame as (diag(−1,−1,1)·R, −t) (checked with renders of a real map), the loss keeps the
better path per image, and the error is the mean squared pixel error of band-limited images."""

from __future__ import annotations

import torch

from cryoace.physics.forward import VoxelFourierVolume, render_images
from cryoace.physics.fourier import circular_mask, fft2_centered, ifft2_centered, rfft2_centered
from cryoace.physics.rotations import random_rotmat
from cryoace.train.losses import HalfDiscGrid, compute_loss, rotate_180, unrotate_pose
from cryoace.types import CTFParams, Pose

from helpers import adk_volume  # noqa: E402

F64 = torch.float64


def test_rotate_180_is_exact_about_the_box_centre():
    size = 16
    img = torch.zeros(size, size)
    img[size // 2, size // 2] = 1.0
    assert torch.equal(rotate_180(img), img)  # a centred delta stays at L//2
    img = torch.zeros(size, size)
    img[size // 2 + 3, size // 2 - 5] = 1.0  # offset (y, x) = (+3, −5) -> (−3, +5)
    out = rotate_180(img)
    assert out[size // 2 - 3, size // 2 + 5] == 1.0 and out.sum() == 1.0
    x = torch.randn(3, size, size, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate_180(rotate_180(x)), x)
    i, j = 2, 11
    assert rotate_180(x)[0, i, j] == x[0, (size - i) % size, (size - j) % size]
    # the rotated image's centred spectrum is the conjugate, on the full and on the half grid
    assert torch.allclose(fft2_centered(rotate_180(x)), fft2_centered(x).conj(), atol=1e-12)
    assert torch.allclose(rfft2_centered(rotate_180(x)), rfft2_centered(x).conj(), atol=1e-12)
    # a plain flip turns about (L−1)/2 instead: not the same
    assert not torch.allclose(torch.flip(x, (-2, -1)), rotate_180(x))


def test_rotated_image_has_pose_d_r_and_minus_t_by_rendering():
    size, pixel_size = 32, 1.5
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(3)
    r = random_rotmat(4, g, F64)
    t = torch.randn(4, 2, generator=g, dtype=F64) * 3.0  # Å
    ctf = CTFParams.create(defocus_u=torch.tensor([3000.0, 5000, 8000, 4000], dtype=F64),
                           defocus_v=torch.tensor([2800.0, 5000, 7600, 4100], dtype=F64),
                           defocus_angle=torch.tensor([0.3, 0.0, 1.2, 2.0], dtype=F64))
    images = render_images(volume, Pose(r, t), pixel_size, size, ctf)
    rotated = rotate_180(images)
    assert (rotated - images).norm() > 0.5 * images.norm()  # an asymmetric molecule: a real test
    # rendering the rotated image's pose (D·R, −t) gives the rotated image ...
    d = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64))
    rendered = render_images(volume, Pose(d @ r, -t), pixel_size, size, ctf)
    assert torch.allclose(rendered, rotated, atol=1e-9 * images.abs().max())
    # ... and unrotate_pose maps the rotated image's pose back to the original one
    back = unrotate_pose(Pose(d @ r, -t))
    assert torch.allclose(back.rotmat, r) and torch.allclose(back.shift_angst, t)
    assert torch.allclose(torch.linalg.det(d @ r), torch.ones(4, dtype=F64))


class _FixedPoses(torch.nn.Module):
    """An 'encoder' returning given poses, in order, for whatever batch it sees."""

    def __init__(self, pose: Pose):
        super().__init__()
        self.pose = pose

    def forward(self, images):
        assert images.shape[0] == self.pose.rotmat.shape[0]
        return self.pose


def test_symmetric_loss_keeps_the_better_path_and_its_pose():
    size, pixel_size, n = 32, 1.5, 6
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(4)
    r_true = random_rotmat(n, g, F64)
    t_true = torch.randn(n, 2, generator=g, dtype=F64) * 2.0
    images = render_images(volume, Pose(r_true, t_true), pixel_size, size)
    d = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=F64))
    wrong = random_rotmat(n, g, F64)
    # the direct path is right for images 0-2 and wrong for 3-5; the rotated path the other way round
    direct_ok = torch.tensor([True, True, True, False, False, False])
    r1 = torch.where(direct_ok[:, None, None], r_true, wrong)
    r2 = torch.where(direct_ok[:, None, None], wrong, d @ r_true)
    t1 = torch.where(direct_ok[:, None], t_true, torch.zeros_like(t_true))
    t2 = torch.where(direct_ok[:, None], torch.zeros_like(t_true), -t_true)
    encoder = _FixedPoses(Pose(torch.cat([r1, r2]), torch.cat([t1, t2])))
    grid = HalfDiscGrid(size, dtype=F64)
    ps = torch.full((n,), pixel_size, dtype=F64)
    out = compute_loss(encoder, volume, images, ps, grid, loss="symmetric")
    assert torch.equal(out.rotated_won, ~direct_ok)
    assert out.error.max() < 1e-6 * images.pow(2).mean()
    assert torch.allclose(out.pose.rotmat, r_true, atol=1e-12)
    assert torch.allclose(out.pose.shift_angst, t_true, atol=1e-12)
    # the kept error is the per-image minimum of the two paths' errors
    e1 = grid.error(_render(volume, Pose(r1, t1), grid), grid.target(images))
    e2 = grid.error(_render(volume, Pose(r2, t2), grid), grid.target(rotate_180(images)))
    assert torch.allclose(out.error, torch.minimum(e1, e2))
    assert torch.allclose(out.loss, torch.minimum(e1, e2).mean())
    # plain L2 uses the direct path only
    l2 = compute_loss(_FixedPoses(Pose(r1, t1)), volume, images, ps, grid, loss="l2")
    assert torch.allclose(l2.error, e1) and not l2.rotated_won.any()
    assert l2.loss > out.loss


def _render(volume, pose, grid):
    from cryoace.physics.forward import render_spectra
    return render_spectra(volume, pose, 1.5, grid.size, freq_cyc_px=grid.freq.to(F64))


def test_error_is_mean_squared_pixel_error_of_disc_limited_images():
    size = 24
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, size, size, dtype=F64, generator=g)
    x = ifft2_centered(fft2_centered(x) * circular_mask(size, size / 2 - 1)).real  # inside the disc
    grid = HalfDiscGrid(size, dtype=F64)
    err = grid.error(torch.zeros(3, len(grid.index), dtype=torch.complex128), grid.target(x))
    assert torch.allclose(err, x.pow(2).mean(dim=(-2, -1)), rtol=1e-10)
    # the grid holds exactly the half-spectrum points inside the Nyquist disc
    assert torch.all(grid.freq.pow(2).sum(-1) <= 0.25 + 1e-12) and torch.all(grid.freq[:, 0] >= 0)


# -- ACE-EM: generalized symmetric loss, warm-up labels -------------------------------------------

def test_rotate_mirror_images_turns_about_the_box_centre():
    from cryoace.train.losses import rotate_mirror_images

    size = 16
    x = torch.randn(2, size, size, dtype=F64, generator=torch.Generator().manual_seed(7))
    # a half turn on the pixel grid is exactly rotate_180; a quarter turn moves (x, y) -> (−y, x)
    half = rotate_mirror_images(x, torch.full((2,), torch.pi, dtype=F64), torch.zeros(2, dtype=torch.bool))
    inner = (slice(None), slice(1, None), slice(1, None))  # row/column 0 has no partner inside the box
    assert torch.allclose(half[inner], rotate_180(x)[inner], atol=1e-9)
    img = torch.zeros(1, size, size, dtype=F64)
    img[0, size // 2 + 2, size // 2 + 5] = 1.0  # (x, y) = (+5, +2)
    quarter = rotate_mirror_images(img, torch.tensor([torch.pi / 2], dtype=F64), torch.tensor([False]))
    assert quarter[0, size // 2 + 5, size // 2 - 2] > 0.999  # (−2, +5)
    mirrored = rotate_mirror_images(img, torch.zeros(1, dtype=F64), torch.tensor([True]))
    assert mirrored[0, size // 2 + 2, size // 2 - 5] > 0.999  # x -> −x about L//2
    assert torch.allclose(rotate_mirror_images(x, torch.zeros(2, dtype=F64), torch.zeros(2, dtype=torch.bool)), x)


def test_turned_view_has_pose_rz_r_and_rotated_shift_by_rendering():
    """A view turned in-plane by θ is the render with (Rz(θ)·R, R_θ·t); rotated_view_pose undoes it."""
    from cryoace.physics.rotations import axis_angle_to_rotmat
    from cryoace.train.losses import rotate_mirror_images, rotated_view_pose

    size, pixel_size = 32, 1.5
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(8)
    r = random_rotmat(3, g, F64)
    t = torch.randn(3, 2, generator=g, dtype=F64) * 3.0
    theta = torch.tensor([0.4, 2.0, -1.1], dtype=F64)
    images = render_images(volume, Pose(r, t), pixel_size, size)
    views = rotate_mirror_images(images, theta, torch.zeros(3, dtype=torch.bool))
    rz = axis_angle_to_rotmat(torch.stack([0 * theta, 0 * theta, theta], -1))
    c, s = torch.cos(theta), torch.sin(theta)
    r2 = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    view_pose = Pose(rz @ r, (r2 @ t[..., None])[..., 0])
    expected = render_images(volume, view_pose, pixel_size, size)
    mask = circular_mask(size, size / 2 - 2).to(F64)  # the corners leave the box when turned
    def rel(a, b):
        return ((a - b) * mask).flatten(1).norm(dim=1) / (b * mask).flatten(1).norm(dim=1)

    assert rel(views, expected).max() < 0.15  # bilinear interpolation only (a turn and back: 4 %)
    wrong = render_images(volume, Pose(rz.transpose(-1, -2) @ r, t), pixel_size, size)
    assert rel(views, wrong).min() > 0.4
    back = rotated_view_pose(view_pose, theta)
    assert torch.allclose(back.rotmat, r, atol=1e-12) and torch.allclose(back.shift_angst, t, atol=1e-12)


def test_gsym_keeps_the_best_view_and_reports_an_unmirrored_pose():
    size, pixel_size, n = 32, 1.5, 4
    volume = VoxelFourierVolume.from_real(adk_volume(size), pad_factor=2)
    g = torch.Generator().manual_seed(9)
    r_true = random_rotmat(n, g, F64)
    images = render_images(volume, Pose(r_true, torch.zeros(n, 2, dtype=F64)), pixel_size, size)
    grid = HalfDiscGrid(size, dtype=F64)
    ps = torch.full((n,), pixel_size, dtype=F64)

    class TrueForDirect(torch.nn.Module):  # right pose for the direct view, random for every other
        def forward(self, views):
            wrong = random_rotmat(views.shape[0] - n, g, F64)
            return Pose(torch.cat([r_true, wrong]), torch.zeros(views.shape[0], 2, dtype=F64))

    torch.manual_seed(0)
    out = compute_loss(TrueForDirect(), volume, images, ps, grid, loss="gsym", n_random=3)
    assert not out.rotated_won.any()
    assert out.error.max() < 1e-6 * images.pow(2).mean()
    assert torch.allclose(out.pose.rotmat, r_true, atol=1e-12)


def test_warmup_labels_low_pass_the_target_with_the_gaussian_transfer_function():
    size, sigma = 24, 1.5
    x = torch.randn(2, size, size, dtype=F64, generator=torch.Generator().manual_seed(10))
    grid = HalfDiscGrid(size, dtype=F64)
    raw, low = grid.target(x), grid.target(x, lowpass_sigma_px=sigma)
    k2 = (grid.freq ** 2).sum(-1)
    assert torch.allclose(low, raw * torch.exp(-2 * torch.pi ** 2 * sigma ** 2 * k2))
    # the same as convolving with a (wide-support) sampled Gaussian of σ px about L//2
    offsets = torch.arange(size, dtype=F64) - size // 2
    g1 = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = g1[:, None] * g1[None, :]
    kernel = kernel / kernel.sum()
    conv = ifft2_centered(fft2_centered(x) * fft2_centered(kernel)).real
    assert torch.allclose(grid.target(conv), low, rtol=1e-3, atol=1e-5 * raw.abs().max())  # aliasing at Nyquist
