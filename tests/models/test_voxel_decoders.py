"""Voxel-grid decoders: slices equal the physics reference, exact Hermitian symmetry, the periodic
Nyquist edge, export through evaluate_grid, gradients, registry, and fitting a known volume."""

import pytest
import torch

from cryoace.models import (
    DECODERS,
    VoxelFourierDecoder,
    VoxelRealDecoder,
    build_decoder,
    count_parameters,
    evaluate_grid,
)
from cryoace.physics.forward import VoxelFourierVolume, render_spectra
from cryoace.physics.fourier import fft3_centered, freq_grid_2d, freq_grid_2d_half, ifft3_centered
from cryoace.physics.rotations import random_rotmat
from cryoace.physics.slicing import central_slice_coords, sample_grid
from cryoace.types import Pose

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
L = 12


def _volume(size=L, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, size, size, generator=g, dtype=dtype)


def _slice_coords(n_poses=6, size=L, seed=1, dtype=F64):
    """Volume-frame coordinates Rᵀk of full central slices inside the Nyquist disc (P·Q, 3)."""
    rot = random_rotmat(n_poses, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    k = freq_grid_2d(size, dtype=dtype)
    k = k[k.norm(dim=-1) <= 0.5]
    return central_slice_coords(rot, k).reshape(-1, 3)


def _periodic_reference(volume_ft, coords):
    """Trilinear samples of the full centred DFT grid extended by its periodic +Nyquist planes
    (independent of the decoders' half-grid code)."""
    n = volume_ft.shape[-1]
    ext = torch.cat([volume_ft, volume_ft[:1]], 0)
    ext = torch.cat([ext, ext[:, :1]], 1)
    ext = torch.cat([ext, ext[:, :, :1]], 2)
    parts = torch.view_as_real(ext).movedim(-1, 0)
    out = sample_grid(parts, coords * n + n // 2)
    return torch.complex(out[0], out[1])


def _padded_spectrum(vol, pad):
    return VoxelFourierVolume.from_real(vol, pad).volume_ft


def _decoders_holding(vol, pad):
    """A VoxelRealDecoder with map ``vol`` and a VoxelFourierDecoder with its padded transform."""
    real = VoxelRealDecoder(vol.shape[-1], pad_factor=pad, output_scale=3.0).double()
    real.load_volume(vol)
    fourier = VoxelFourierDecoder(pad * vol.shape[-1], output_scale=3.0).double()
    fourier.load_spectrum(_padded_spectrum(vol, pad))
    return real, fourier


@pytest.mark.parametrize("pad", [1, 2])
def test_slices_equal_the_physics_voxel_volume(pad):
    vol = _volume()
    coords = _slice_coords()
    n = pad * L
    reference = VoxelFourierVolume.from_real(vol, pad)(coords)
    periodic = _periodic_reference(_padded_spectrum(vol, pad), coords)
    # extract_slices reads zeros past index n-1: it agrees where every component is <= 0.5 - 1/n
    inner = coords.max(dim=-1).values <= 0.5 - 1.0 / n
    assert inner.float().mean() > 0.6
    scale = reference.abs().max().item()
    for dec in _decoders_holding(vol, pad):
        with torch.no_grad():
            values = dec(coords)
        assert values.dtype == torch.complex128 and values.shape == coords.shape[:-1]
        torch.testing.assert_close(values[inner], reference[inner], rtol=0, atol=1e-12 * scale)
        # everywhere in the disc: trilinear interpolation of the periodic DFT grid
        torch.testing.assert_close(values, periodic, rtol=0, atol=1e-12 * scale)
        assert (values[~inner] - reference[~inner]).abs().max() > 1e-3 * scale  # the edge band differs


def test_nyquist_edge_is_periodic():
    """±0.5 cycles/px is one DFT frequency: the decoders give the same value on both faces."""
    vol = _volume()
    g = torch.Generator().manual_seed(3)
    k = (torch.rand(50, 3, generator=g, dtype=F64) - 0.5) * 0.6
    k_plus, k_minus = k.clone(), k.clone()
    k_plus[:, 0], k_minus[:, 0] = 0.5, -0.5
    for dec in _decoders_holding(vol, 1):
        with torch.no_grad():
            torch.testing.assert_close(dec(k_plus), dec(k_minus), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cls", [VoxelFourierDecoder, VoxelRealDecoder])
def test_hermitian_symmetry_exact_including_the_kz0_plane(cls):
    torch.manual_seed(0)
    dec = cls(8, init_std=1.0)
    g = torch.Generator().manual_seed(0)
    k = torch.rand(400, 3, generator=g) - 0.5
    k[:100, 2] = 0.0  # the kz = 0 plane
    k[100:120, 1:] = 0.0  # the kx axis
    k = torch.cat([k, torch.zeros(1, 3)])  # DC
    with torch.no_grad():
        assert torch.equal(dec(-k), dec(k).conj())
        assert dec(torch.zeros(3)).imag == 0
        # one Hermitian grid: no jump across kz = 0 (VoxelFourierDecoder symmetrises its kz = 0 plane;
        # the FFT of a real map is Hermitian there to rounding)
        dec = dec.double()
        above, below = k[:100].double(), k[:100].double()
        above[:, 2], below[:, 2] = 1e-9, -1e-9
        values = dec(above)
        torch.testing.assert_close(values, dec(below), rtol=0, atol=1e-6 * values.abs().max().item())


@pytest.mark.parametrize("name", ["voxel-fourier", "voxel-real"])
def test_gradients_reach_the_grid_from_zero_initialisation(name):
    dec = build_decoder(name, size=8, output_scale=8.0)
    (param,) = list(dec.parameters())
    assert torch.count_nonzero(param) == 0 and torch.count_nonzero(dec(torch.rand(5, 3) - 0.5)) == 0
    target = torch.randn(50, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    coords = _slice_coords(3, 8, dtype=torch.float32)[:50]
    (dec(coords) - target).abs().square().sum().backward()
    assert param.grad is not None and torch.count_nonzero(param.grad) > 0


@pytest.mark.parametrize("pad", [1, 2])
def test_export_through_evaluate_grid_returns_the_map(pad):
    vol = _volume(8)
    dec = VoxelRealDecoder(8, pad_factor=pad, output_scale=2.0).double()
    dec.load_volume(vol)
    torch.testing.assert_close(dec.real_space_volume(), vol)
    spectrum = evaluate_grid(dec, 8, chunk=100)
    torch.testing.assert_close(spectrum, fft3_centered(vol), rtol=0, atol=1e-10)
    torch.testing.assert_close(ifft3_centered(spectrum).real, vol, rtol=0, atol=1e-12)
    fourier = VoxelFourierDecoder(8).double()
    fourier.load_spectrum(fft3_centered(vol))
    torch.testing.assert_close(evaluate_grid(fourier, 8, chunk=77), fft3_centered(vol), rtol=0, atol=1e-10)


def test_registry_options_and_learning_rate_hint():
    assert {"voxel-fourier", "voxel-real"} <= set(DECODERS)
    assert isinstance(build_decoder("voxel_real", size=8, pad_factor=None), VoxelRealDecoder)
    fourier = build_decoder("voxel-fourier", size=8, init_std=None)
    assert isinstance(fourier, VoxelFourierDecoder) and fourier.hermitian
    assert fourier.grid.shape == (2, 5, 9, 9) and count_parameters(fourier) == 2 * 5 * 81
    assert set(fourier.state_dict()) == {"output_scale", "shell_scale", "grid"}
    real = build_decoder("voxel-real", size=8, pad_factor=1)
    assert set(real.state_dict()) == {"output_scale", "shell_scale", "volume"} and real.volume.shape == (8, 8, 8)
    assert VoxelFourierDecoder.default_lr == VoxelRealDecoder.default_lr == 1.0
    assert all(build_decoder(n).default_lr is None for n in ("fouriernet", "siren", "relu-pe"))
    with pytest.raises(TypeError):
        build_decoder("voxel-real", size=8, hidden=64)  # strict: no neural-field keywords
    for bad in (7, 0):
        with pytest.raises(ValueError):
            VoxelFourierDecoder(bad)
    with pytest.raises(ValueError):
        VoxelRealDecoder(8, pad_factor=0)
    with pytest.raises(ValueError):
        fourier.load_spectrum(torch.zeros(6, 6, 6, dtype=torch.complex64))


def test_is_a_fourier_volume_for_the_forward_model():
    """Rendering a voxel decoder through physics.forward equals rendering the voxel volume."""
    vol = _volume(L, dtype=torch.float32)
    dec = VoxelRealDecoder(L, pad_factor=2)
    dec.load_volume(vol)
    rot = random_rotmat(3, generator=torch.Generator().manual_seed(0))
    pose = Pose(rotmat=rot, shift_angst=torch.randn(3, 2))
    spectra = render_spectra(dec, pose, pixel_size=1.5, size=L, half=True)
    reference = render_spectra(VoxelFourierVolume.from_real(vol, 2), pose, pixel_size=1.5, size=L, half=True)
    # compare where extract_slices has every trilinear neighbour (see test above)
    ok = central_slice_coords(rot, freq_grid_2d_half(L)).max(dim=-1).values <= 0.5 - 1 / (2 * L)
    scale = reference.abs().max().item()
    torch.testing.assert_close(spectra[ok], reference[ok], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", ["voxel-real", "voxel-fourier"])
def test_a_few_adamw_steps_fit_slices_of_a_known_volume(name):
    """From zero, 20 AdamW steps on 20 central slices of a blob's 2×-padded transform. The grids'
    parameters are O(1) here (``output_scale`` = the map's peak resp. the spectrum's), the regime in
    which their large learning rates (default_lr = 1) make sense."""
    size = 12
    c = torch.arange(size, dtype=torch.float32) - size // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.exp(-((x - 1.0) ** 2 + (y + 1.0) ** 2 + (z - 0.5) ** 2) / 8.0)
    coords = _slice_coords(20, size, dtype=torch.float32)
    target = VoxelFourierVolume.from_real(vol, 2)(coords)
    if name == "voxel-real":
        dec = build_decoder(name, size=size, pad_factor=2, output_scale=vol.max().item())
    else:  # twice the map's box: the same sampling as the target
        dec = build_decoder(name, size=2 * size, output_scale=target.abs().max().item())
    opt = torch.optim.AdamW(dec.parameters(), lr=0.1 * dec.default_lr, weight_decay=0.0)
    errors = []
    for _ in range(20):
        loss = (dec(coords) - target).abs().square().mean() / target.abs().square().mean()
        errors.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert errors[0] == pytest.approx(1.0)
    assert errors[-1] < 0.15, errors
