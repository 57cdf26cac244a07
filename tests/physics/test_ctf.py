"""The RELION CTF: golden values from RELION's own formula, astigmatism angle, sign vs cryoDRGN."""

import math

import pytest
import torch

from cryoace.physics.ctf import compute_ctf, electron_wavelength_angst
from cryoace.physics.fourier import freq_grid_2d
from cryoace.types import CTFParams

F64 = torch.float64


def test_electron_wavelength():
    # textbook values: 300 kV → 0.01969 Å, 200 kV → 0.02508 Å, 100 kV → 0.03701 Å
    assert math.isclose(electron_wavelength_angst(300.0).item(), 0.0196876, rel_tol=1e-5)
    assert math.isclose(electron_wavelength_angst(200.0).item(), 0.0250795, rel_tol=1e-5)
    assert math.isclose(electron_wavelength_angst(100.0).item(), 0.0370141, rel_tol=1e-4)


def relion_ctf(kx: float, ky: float, du: float, dv: float, azimuth_deg: float, voltage_kv: float,
               cs_mm: float, w: float, phase_shift_deg: float, bfactor: float) -> float:
    """RELION's CTF::getCTF (ctf.h / ctf.cpp) written out in plain floats, independently of cryoace:
    RELION stores the defocus negated, deltaf = −(U+V)/2 − (U−V)/2·cos 2(atan2(ky, kx) − azimuth), and
    returns −sin(K1·deltaf·u² + K2·u⁴ − K5 − K3)·exp(K4·u²) with K1 = πλ, K2 = (π/2)·Cs·λ³,
    K3 = atan(Q0/√(1−Q0²)), K4 = −B/4, K5 = the phase shift; λ = 12.2643247/√(V(1 + 0.978466e-6·V))
    Å with V in volts. Frequencies (kx, ky) in 1/Å, defocus in Å, Cs in mm (→ Å), angles in degrees."""
    volts = voltage_kv * 1e3
    lam = 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))
    cs = cs_mm * 1e7
    k1, k2 = math.pi * lam, math.pi / 2 * cs * lam ** 3
    k3 = math.atan(w / math.sqrt(1 - w * w))
    k4, k5 = -bfactor / 4, math.radians(phase_shift_deg)
    defocus_average, defocus_deviation = -(du + dv) / 2, -(du - dv) / 2
    u2 = kx * kx + ky * ky
    ellipsoid_angle = math.atan2(ky, kx) - math.radians(azimuth_deg)
    deltaf = defocus_average + defocus_deviation * math.cos(2 * ellipsoid_angle)
    argument = k1 * deltaf * u2 + k2 * u2 * u2 - k5 - k3
    return -math.sin(argument) * math.exp(k4 * u2)


# (kx, ky) in 1/Å, defocus U, V (Å), angle (deg), Cs (mm), w, phase shift (deg), B (Å²) at 300 kV, and
# the value first computed by hand from RELION's ctf.h (kept: relion_ctf must reproduce it too).
GOLDEN = [
    ((0.05, 0.0), 15000, 13000, 30, 2.7, 0.1, 0, 0, 0.7183088862276201),
    ((0.0, 0.05), 15000, 13000, 30, 2.7, 0.1, 0, 0, 0.8168878861744072),
    ((0.03, 0.04), 15000, 13000, 30, 2.7, 0.1, 0, 0, 0.697408791204206),
    ((0.2, -0.1), 20000, 20000, 0, 2.7, 0.07, 0, 0, -0.9888258093529351),
    ((0.1, 0.1), 10000, 8000, -45, 0.01, 0.1, 90, 50, -0.6552589378052961),
    ((-0.07, 0.12), 25000, 22000, 100, 2.7, 0.07, 30, 80, None),
    ((0.15, 0.02), 5000, 4000, 170, 0.0, 0.1, 0, 0, None),
]


@pytest.mark.parametrize("k, du, dv, angle, cs, w, phase, bfac, recorded", GOLDEN)
def test_ctf_golden_values(k, du, dv, angle, cs, w, phase, bfac, recorded):
    expected = relion_ctf(*k, du, dv, angle, 300.0, cs, w, phase, bfac)
    if recorded is not None:
        assert math.isclose(expected, recorded, abs_tol=1e-9)
    params = CTFParams.create(du, dv, math.radians(angle), 300.0, cs, w, math.radians(phase), bfac)
    freq_px = torch.tensor(k, dtype=F64) * 2.0  # pixel size 2 Å: cycles/px = cycles/Å × 2
    value = compute_ctf(params, freq_px, 2.0)
    assert math.isclose(value.item(), expected, abs_tol=1e-9)


def test_ctf_at_dc_is_amplitude_contrast():
    params = CTFParams.create([10000., 25000.], [9000., 24000.], 0.3, 300., 2.7, [0.07, 0.1])
    ctf = compute_ctf(params, freq_grid_2d(32, dtype=F64), 1.2)
    assert ctf.shape == (2, 32, 32)
    assert torch.allclose(ctf[:, 16, 16], torch.tensor([0.07, 0.1], dtype=F64), atol=1e-12)


def test_astigmatism_angle_is_measured_from_x_axis():
    """Along the direction θ_ast the CTF is the isotropic CTF of defocus U; at θ_ast + 90°, of V."""
    theta = math.radians(35)
    astig = CTFParams.create(18000., 12000., theta)
    s = torch.linspace(0.0, 0.25, 50, dtype=F64)
    along_u = torch.stack([s * math.cos(theta), s * math.sin(theta)], -1)
    along_v = torch.stack([-s * math.sin(theta), s * math.cos(theta)], -1)
    iso_u, iso_v = CTFParams.create(18000.), CTFParams.create(12000.)
    assert torch.allclose(compute_ctf(astig, along_u, 1.0), compute_ctf(iso_u, along_u, 1.0), atol=1e-12)
    assert torch.allclose(compute_ctf(astig, along_v, 1.0), compute_ctf(iso_v, along_v, 1.0), atol=1e-12)


def cryodrgn_ctf(freqs, dfu, dfv, dfang, volt, cs, w, phase_shift=0.0, lam=None):
    """cryoDRGN's published formula (ctf.compute_ctf), re-typed here: freqs in 1/Å, angles in rad."""
    if lam is None:
        lam = 12.2639 / (volt * 1e3 + 0.97845e-6 * (volt * 1e3) ** 2) ** 0.5
    x, y = freqs[..., 0], freqs[..., 1]
    ang = torch.atan2(y, x)
    s2 = x ** 2 + y ** 2
    df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (ang - dfang)))
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs * 1e7 * lam ** 3 * s2 ** 2) - phase_shift
    return (1 - w ** 2) ** 0.5 * torch.sin(gamma) - w * torch.cos(gamma)


def test_ctf_is_minus_cryodrgn():
    freq = freq_grid_2d(64, dtype=F64)
    pixel_size = 1.7
    params = CTFParams.create(14000., 12500., 0.7, 300., 2.7, 0.1, 0.4)
    ours = compute_ctf(params, freq, pixel_size)
    # the same physics: identical once both use the same wavelength
    lam = electron_wavelength_angst(300.0).item()
    theirs = cryodrgn_ctf(freq / pixel_size, 14000., 12500., 0.7, 300., 2.7, 0.1, 0.4, lam=lam)
    assert torch.allclose(ours, -theirs, atol=1e-10)
    # cryoDRGN rounds the wavelength constants slightly differently (12.2639 vs 12.2643247)
    theirs = cryodrgn_ctf(freq / pixel_size, 14000., 12500., 0.7, 300., 2.7, 0.1, 0.4)
    assert torch.allclose(ours, -theirs, atol=5e-3)


def test_bfactor_envelope_and_batching():
    freq = freq_grid_2d(16, dtype=F64)
    sharp = CTFParams.create([15000., 16000.], bfactor=0.0)
    soft = CTFParams.create([15000., 16000.], bfactor=[100.0, 100.0])
    s2 = (freq ** 2).sum(-1) / 1.5 ** 2
    assert torch.allclose(compute_ctf(soft, freq, 1.5), compute_ctf(sharp, freq, 1.5) * torch.exp(-25 * s2))
    batched = compute_ctf(sharp, freq, torch.tensor([1.5, 2.0], dtype=F64))
    looped = torch.stack([compute_ctf(sharp[i], freq, p) for i, p in enumerate([1.5, 2.0])])
    assert torch.allclose(batched, looped)


def test_ctf_gradcheck():
    freq = freq_grid_2d(8, dtype=F64)
    du = torch.tensor([15000.0, 9000.0], dtype=F64, requires_grad=True)
    angle = torch.tensor([0.3, 1.0], dtype=F64, requires_grad=True)

    def f(du, angle):
        return compute_ctf(CTFParams.create(du, du - 500, angle), freq, 2.0)

    assert torch.autograd.gradcheck(f, (du, angle))
