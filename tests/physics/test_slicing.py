"""Fourier slice theorem, the real-space projector, and agreement with RELION's relion_project."""


import numpy as np
import pytest
import torch

from cryoace.io.mrc import open_mrc, read_volume
from cryoace.physics.forward import VoxelFourierVolume, render_images, render_spectra
from cryoace.physics.fourier import circular_mask, fft2_centered, fft3_centered, freq_grid_2d
from cryoace.physics.projector import project_real_space
from cryoace.physics.rotations import euler_relion_to_rotmat, random_rotmat
from cryoace.physics.shift import apply_shift
from cryoace.physics.slicing import central_slice_coords, extract_slices
from cryoace.types import CTFParams, Pose

F64 = torch.float64
from conftest import TEST_DATA  # noqa: E402


def euler_deg(*angles):
    return euler_relion_to_rotmat(*torch.tensor(np.radians(np.array(angles)), dtype=F64))


@pytest.fixture(scope="module")
def adk():
    return torch.tensor(read_volume(TEST_DATA / "volumes/adk_open_4ake_L64_1.5A.mrc").data, dtype=F64)


def test_slice_coordinates_are_rotmat_transpose_times_k():
    r = random_rotmat(5, torch.Generator().manual_seed(0), F64)
    freq = freq_grid_2d(8, dtype=F64)
    coords = central_slice_coords(r, freq)
    k3 = torch.cat([freq, torch.zeros(8, 8, 1, dtype=F64)], -1)
    expected = torch.einsum("bji,yxj->byxi", r, k3)  # Rᵀ k
    assert torch.allclose(coords, expected)


@pytest.mark.parametrize("angles", [(0, 0, 0), (90, 0, 0), (0, 90, 0), (90, 90, 0), (0, 90, 90),
                                    (180, 90, 270), (270, 180, 0)])
def test_fourier_slice_theorem_exact_for_axis_aligned_poses(angles):
    g = torch.Generator().manual_seed(1)
    size = 24
    # support inside the box so real-space 90° rotations lose nothing
    v = torch.randn(size, size, size, dtype=F64, generator=g) * circular_mask(size, size / 2 - 2, 3)
    r = euler_deg(*angles)
    image_ft = fft2_centered(project_real_space(v, r))
    slice_ft = extract_slices(fft3_centered(v), central_slice_coords(r, freq_grid_2d(size, dtype=F64)))
    inside = circular_mask(size, size / 2 - 1)  # the −Nyquist row has no +Nyquist twin on the grid
    assert torch.allclose(image_ft[inside], slice_ft[inside], atol=1e-9)


def test_fourier_slice_theorem_random_poses_within_interpolation_error(adk):
    r = random_rotmat(6, torch.Generator().manual_seed(2), F64)
    reference = project_real_space(adk, r)
    images = render_images(VoxelFourierVolume.from_real(adk, pad_factor=2), Pose(r, torch.zeros(6, 2, dtype=F64)),
                           1.5, 64)
    rel_err = (images - reference).norm(dim=(-2, -1)) / reference.norm(dim=(-2, -1))
    assert rel_err.max() < 0.06
    # without padding trilinear Fourier interpolation is coarser but still close
    coarse = render_images(VoxelFourierVolume.from_real(adk), Pose(r, torch.zeros(6, 2, dtype=F64)), 1.5, 64)
    assert ((coarse - reference).norm(dim=(-2, -1)) / reference.norm(dim=(-2, -1))).max() < 0.2


def test_centred_delta_stays_centred_under_rotation():
    v = torch.zeros(16, 16, 16, dtype=F64)
    v[8, 8, 8] = 1.0
    images = project_real_space(v, random_rotmat(4, torch.Generator().manual_seed(3), F64))
    assert all(int(img.argmax()) == 8 * 16 + 8 for img in images)


def test_off_centre_point_projects_where_rotmat_sends_it():
    """R maps volume to image coordinates: a voxel at volume (x, y, z) appears at image (R·r)_xy."""
    v = torch.zeros(32, 32, 32, dtype=F64)
    v[16 + 0, 16 + 0, 16 + 5] = 1.0  # volume point r = (5, 0, 0)
    r = euler_deg(90, 0, 0)  # R·(5,0,0) = (0,-5,0)
    img = project_real_space(v, r)
    y, x = divmod(int(img.argmax()), 32)
    assert (x - 16, y - 16) == (0, -5)


@pytest.mark.parametrize("name", ["rln_proj_64", "rln_proj_64_centered", "rln_proj_64_shifted"])
def test_projections_match_relion_project(name):
    import starfile

    folder = TEST_DATA / "particles/relion_project_aspire"
    volume = torch.tensor(read_volume(folder / "clean70SRibosome_vol_64_aspire_downsampled.mrc").data, dtype=F64)
    star = starfile.read(folder / f"{name}.star")
    particles = star["particles"] if isinstance(star, dict) else star
    angles = particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    r = euler_deg(*angles.T)
    ours = project_real_space(volume, r)
    if "rlnOriginX" in particles:
        ours = apply_shift(ours, torch.tensor(particles[["rlnOriginX", "rlnOriginY"]].to_numpy(), dtype=F64))
    relion = np.asarray(open_mrc(folder / f"{name}.mrcs").data)
    transposed = project_real_space(volume, r.transpose(-1, -2))
    for i in range(len(particles)):
        assert np.corrcoef(ours[i].numpy().ravel(), relion[i].ravel())[0, 1] >= 0.95
        # the transposed convention does not match: the test can fail
        assert np.corrcoef(transposed[i].numpy().ravel(), relion[i].ravel())[0, 1] < 0.9
    # the Fourier path (with padding) gives the same images
    fourier = render_images(VoxelFourierVolume.from_real(volume, 2), Pose(r, torch.zeros(len(r), 2, dtype=F64)),
                            1.0, 64)
    if "rlnOriginX" in particles:
        fourier = apply_shift(fourier, torch.tensor(particles[["rlnOriginX", "rlnOriginY"]].to_numpy(), dtype=F64))
    for i in range(len(particles)):
        assert np.corrcoef(fourier[i].numpy().ravel(), relion[i].ravel())[0, 1] >= 0.95


def test_render_shift_in_angstrom_and_batched_equals_looped(adk):
    r = random_rotmat(3, torch.Generator().manual_seed(4), F64)
    shift_angst = torch.tensor([[3.0, -4.5], [0.0, 1.5], [-6.0, 0.0]], dtype=F64)
    ctf = CTFParams.create([12000., 15000., 20000.], [11000., 15000., 19000.], 0.4)
    vol = VoxelFourierVolume.from_real(adk, 2)
    batched = render_spectra(vol, Pose(r, shift_angst), 1.5, 64, ctf)
    looped = torch.stack([render_spectra(vol, Pose(r[i], shift_angst[i]), 1.5, 64, ctf[i]) for i in range(3)])
    assert torch.allclose(batched, looped)
    # a shift of (3 Å, −4.5 Å) at 1.5 Å/px is (2, −3) px: the image is the unshifted one rolled by −t
    plain = render_images(vol, Pose(r, torch.zeros(3, 2, dtype=F64)), 1.5, 64)
    shifted = render_images(vol, Pose(r, shift_angst), 1.5, 64)
    assert torch.allclose(shifted[0], torch.roll(plain[0], shifts=(3, -2), dims=(-2, -1)), atol=1e-9)


def test_gradcheck_through_slice_ctf_and_shift():
    g = torch.Generator().manual_seed(5)
    size = 6
    volume_ft = torch.randn(size, size, size, dtype=torch.complex128, generator=g).requires_grad_()
    six = torch.randn(6, dtype=F64, generator=g)
    from cryoace.physics.rotations import rotmat_from_6d

    def render(volume_ft, six, shift, defocus):
        pose = Pose(rotmat_from_6d(six)[None], shift[None])
        ctf = CTFParams.create(defocus[None], defocus[None] * 0.9, 0.2)
        return torch.view_as_real(render_spectra(extract_slices_fn(volume_ft), pose, 2.0, size, ctf))

    def extract_slices_fn(volume_ft):
        return lambda coords: extract_slices(volume_ft, coords)

    shift = torch.tensor([0.7, -1.3], dtype=F64, requires_grad=True)
    defocus = torch.tensor([9000.0], dtype=F64, requires_grad=True).squeeze()
    six.requires_grad_()
    assert torch.autograd.gradcheck(render, (volume_ft, six, shift, defocus), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(adk):
    r = random_rotmat(4, torch.Generator().manual_seed(6), torch.float32)
    pose = Pose(r, torch.randn(4, 2))
    ctf = CTFParams.create([15000.] * 4, dtype=torch.float32)
    vol = adk.float()
    cpu = render_images(VoxelFourierVolume.from_real(vol, 2), pose, 1.5, 64, ctf)
    gpu = render_images(VoxelFourierVolume.from_real(vol.cuda(), 2), pose.to("cuda"), 1.5, 64, ctf.to("cuda"))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3 * cpu.abs().max().item())


def test_half_grid_rendering_equals_full_grid(adk):
    r = random_rotmat(3, torch.Generator().manual_seed(7), F64)
    pose = Pose(r, torch.tensor([[1.5, -3.0], [0.0, 0.0], [4.5, 2.0]], dtype=F64))
    ctf = CTFParams.create([12000., 15000., 20000.], [11000., 15000., 19000.], 0.4)
    vol = VoxelFourierVolume.from_real(adk, 2)
    full = render_spectra(vol, pose, 1.5, 64, ctf)
    half = render_spectra(vol, pose, 1.5, 64, ctf, half=True)
    assert torch.allclose(half[..., :32], full[..., 32:])
    from cryoace.physics.fourier import ifft2_centered
    # the full grid's −Nyquist row/column has no +Nyquist twin, so its inverse is not exactly real;
    # the half-grid image is its Hermitian part: equal up to that Nyquist term
    reference = ifft2_centered(full).real
    assert torch.allclose(render_images(vol, pose, 1.5, 64, ctf), reference, atol=1e-3 * reference.abs().max())
