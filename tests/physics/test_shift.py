"""Shift convention: the observed image is the projection translated by −origin (RELION)."""

import torch

from cryoace.physics.fourier import fft2_centered, freq_grid_2d
from cryoace.physics.shift import apply_shift, phase_ramp

F64 = torch.float64


def test_whole_pixel_shift_is_roll_with_relion_sign():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 32, 32, dtype=F64, generator=g)
    shifts = torch.tensor([[3.0, -5.0], [0.0, 7.0], [-2.0, 0.0]], dtype=F64)
    shifted = apply_shift(images, shifts)
    for img, out, (tx, ty) in zip(images, shifted, shifts.long().tolist(), strict=True):
        assert torch.allclose(out, torch.roll(img, shifts=(-ty, -tx), dims=(-2, -1)), atol=1e-12)


def test_delta_moves_to_centre_minus_origin():
    image = torch.zeros(16, 16, dtype=F64)
    image[8, 8] = 1.0  # particle at the box centre L//2
    out = apply_shift(image, torch.tensor([2.0, 3.0], dtype=F64))
    y, x = divmod(int(out.argmax()), 16)
    assert (x, y) == (8 - 2, 8 - 3)


def test_negative_shift_undoes_and_subpixel_is_unitary():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 24, 24, dtype=F64, generator=g)
    t = torch.randn(4, 2, dtype=F64, generator=g) * 3
    freq = freq_grid_2d(24, dtype=F64)
    spectra = fft2_centered(images)
    there_and_back = spectra * phase_ramp(freq, t) * phase_ramp(freq, -t)
    assert torch.allclose(there_and_back, spectra)
    assert torch.allclose(phase_ramp(freq, t).abs(), torch.ones(4, 24, 24, dtype=F64))


def test_phase_ramp_gradcheck():
    freq = freq_grid_2d(6, dtype=F64)
    t = torch.tensor([[0.3, -1.2]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.view_as_real(phase_ramp(freq, t)), (t,))
