"""Centred FFT helpers, frequency grids, shells, masks and Fourier cropping."""

import torch

from cryoace.physics import fourier as ft

F64 = torch.float64


def test_grid_is_fftfreq_not_linspace():
    f = ft.freq_1d(8, dtype=F64)
    assert torch.equal(f, torch.tensor([-0.5, -0.375, -0.25, -0.125, 0, 0.125, 0.25, 0.375], dtype=F64))
    grid = ft.freq_grid_2d(8, dtype=F64)
    assert grid[4, 4].abs().sum() == 0  # DC at index L//2
    assert grid[4, 5, 0] == 0.125 and grid[5, 4, 1] == 0.125  # x along the last axis, y along rows
    g3 = ft.freq_grid_3d(8, dtype=F64)
    assert g3[4, 4, 5, 0] == 0.125 and g3[4, 5, 4, 1] == 0.125 and g3[5, 4, 4, 2] == 0.125


def test_centred_fft_dc_and_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 16, dtype=F64, generator=g)
    spec = ft.fft2_centered(x)
    assert torch.allclose(spec[:, 8, 8].real, x.sum((-2, -1)))
    assert torch.allclose(ft.ifft2_centered(spec).real, x)
    v = torch.randn(12, 12, 12, dtype=F64, generator=g)
    assert torch.allclose(ft.ifft3_centered(ft.fft3_centered(v)).real, v)


def test_centred_delta_has_flat_real_spectrum():
    """The real-space centre is L//2: a delta there transforms to a constant with zero phase."""
    x = torch.zeros(10, 10, dtype=F64)
    x[5, 5] = 1.0
    assert torch.allclose(ft.fft2_centered(x), torch.ones(10, 10, dtype=torch.complex128))


def test_shells_and_masks():
    shells = ft.radial_shell_index(16, 2)
    assert shells[8, 8] == 0 and shells[8, 16 - 1] == 7 and shells[0, 8] == 8
    disc = ft.circular_mask(16)  # Nyquist disc: radius 8
    assert disc[0, 8] and not disc[0, 0]
    ball = ft.circular_mask(16, 3.0, ndim=3)
    assert ball.sum() == sum(1 for z in range(-8, 8) for y in range(-8, 8) for x in range(-8, 8)
                             if x * x + y * y + z * z <= 9)


def test_fourier_crop_keeps_values_and_low_frequencies():
    const = torch.full((3, 32, 32), 2.5, dtype=F64)
    assert torch.allclose(ft.fourier_crop(const, 16), torch.full((3, 16, 16), 2.5, dtype=F64))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 32, dtype=F64, generator=g)
    small = ft.fourier_crop(x, 16)
    # the low-frequency coefficients are kept, scaled by the pixel-count ratio
    big_spec, small_spec = ft.fft2_centered(x), ft.fft2_centered(small)
    assert torch.allclose(small_spec[4:12, 4:12] * 4, big_spec[12:20, 12:20])


def test_half_spectrum_layout_round_trip_and_weights():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 16, dtype=F64, generator=g)
    full, half = ft.fft2_centered(x), ft.rfft2_centered(x)
    assert half.shape == (3, 16, 9)
    # columns kx = 0 … 0.5 of the half layout are the full layout's columns L//2 … L−1, then −0.5
    assert torch.allclose(half[..., :8], full[..., 8:])
    assert torch.allclose(half[..., 8], full[..., 0])
    grid, grid_half = ft.freq_grid_2d(16, dtype=F64), ft.freq_grid_2d_half(16, dtype=F64)
    assert torch.equal(grid_half[:, :8], grid[:, 8:]) and torch.all(grid_half[:, 8, 0] == 0.5)
    assert torch.allclose(ft.irfft2_centered(half, 16), x)
    # weighted half-grid sums equal full-grid sums (Parseval on the half grid)
    w = ft.half_grid_weights(16, dtype=F64)
    assert torch.allclose((half.abs() ** 2 * w).sum((-2, -1)), (full.abs() ** 2).sum((-2, -1)))
