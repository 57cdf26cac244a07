"""Tests of cryoace.evaluate.fsc (FSC curve, resolution, masks, devices) and evaluate.plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryoace.evaluate import FSCResult, fsc, plot_fsc
from cryoace.io.mrc import read_volume
from cryoace.physics.fourier import fft3_centered, ifft3_centered, radial_shell_index

from conftest import TEST_DATA  # noqa: E402

ADK_L64 = TEST_DATA / "volumes" / "adk_open_4ake_L64_1.5A.mrc"


def random_map(size: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(size, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sharp_lowpass(vol: torch.Tensor, max_shell: int) -> torch.Tensor:
    """Keep Fourier shells 0..max_shell (same shell index as fsc uses), zero the rest."""
    keep = radial_shell_index(vol.shape[-1], 3) <= max_shell
    return ifft3_centered(fft3_centered(vol) * keep).real.to(vol.dtype)


def numpy_shells(size: int) -> np.ndarray:
    """Shell index on NumPy's uncentred FFT layout, computed independently of physics.fourier."""
    f = np.fft.fftfreq(size) * size
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    return np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int)


@pytest.fixture(scope="module")
def adk() -> tuple[np.ndarray, float]:
    m = read_volume(ADK_L64)
    return m.data, m.voxel_size


# --- the curve ------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_numpy,dtype", [(False, torch.float32), (True, torch.float64)])
def test_self_fsc_is_one_in_every_shell(as_numpy, dtype):
    v = random_map(32, 0, dtype)
    if as_numpy:
        v = v.numpy()
    r = fsc(v, v)
    assert r.box_size == 32 and r.curve.shape == (17,) and r.n_voxels.shape == (17,)
    np.testing.assert_allclose(r.curve, 1.0, atol=1e-6)
    np.testing.assert_allclose(r.freq_cyc_px, np.arange(17) / 32)
    assert r.freq_cyc_px[-1] == 0.5
    assert r.resolution(0.143).px == 2.0 and not r.resolution(0.143).crossed


def test_shell_voxel_counts():
    r = fsc(random_map(16, 1), random_map(16, 2))
    shells = numpy_shells(16)
    expected = np.bincount(shells.ravel())[:9]
    np.testing.assert_array_equal(r.n_voxels, expected)
    assert r.n_voxels[0] == 1 and r.n_voxels[1] == 18  # DC; 6 face + 12 edge neighbours


def test_anticorrelated_map_gives_minus_one():
    v = random_map(16, 3)
    np.testing.assert_allclose(fsc(v, -v).curve, -1.0, atol=1e-6)


def test_shells_without_power_are_zero_not_nan():
    v = random_map(16, 4)
    r = fsc(v, torch.zeros_like(v))
    assert np.isfinite(r.curve).all()
    np.testing.assert_array_equal(r.curve, 0.0)
    assert r.resolution(0.143).shell == pytest.approx(1.0)  # no information: crossing at shell 1


def test_independent_noise_maps_correlate_about_one_over_sqrt_n():
    r = fsc(random_map(64, 5), random_map(64, 6))
    z = r.curve[2:] * np.sqrt(r.n_voxels[2:])  # ~ N(0, 1) per shell
    assert np.abs(z).max() < 4.5
    assert 0.6 < z.std() < 1.5
    assert abs(z.mean()) < 0.6


def test_two_noisy_copies_follow_s_over_s_plus_n(adk):
    """F_i = S + N_i with independent white noise of variance s2: E[FSC_k] ≈ S_k / (S_k + N_k),
    S_k = Σ_shell |S|², N_k = n_k · L³ · s2 (unnormalized FFT). Predicted independently with NumPy."""
    signal, voxel_size = adk
    size = signal.shape[0]
    sigma = 0.01
    rng = np.random.default_rng(7)
    v1 = signal + rng.normal(0.0, sigma, signal.shape)
    v2 = signal + rng.normal(0.0, sigma, signal.shape)
    r = fsc(v1, v2, voxel_size=voxel_size)

    shells = numpy_shells(size)
    n_shells = size // 2 + 1
    inside = shells < n_shells
    s_k = np.bincount(shells[inside], np.abs(np.fft.fftn(signal.astype(np.float64))[inside]) ** 2,
                      n_shells)
    n_k = np.bincount(shells[inside], minlength=n_shells) * size**3 * sigma**2
    predicted = s_k / (s_k + n_k)
    assert predicted[1] > 0.9 and predicted[-1] < 0.1  # the curve really spans the thresholds
    tol = 4.0 / np.sqrt(r.n_voxels[2:]) + 0.01
    assert (np.abs(r.curve[2:] - predicted[2:]) < tol).all()
    # and the resolution agrees with the predicted curve's to within a shell
    expected = FSCResult(r.freq_cyc_px, predicted, r.n_voxels, size, voxel_size)
    for t in (0.5, 0.143):
        assert abs(r.resolution(t).shell - expected.resolution(t).shell) < 1.0


# --- resolution -----------------------------------------------------------------------------------

def test_sharp_lowpass_at_shell_10_crosses_near_shell_10():
    size = 64
    v = random_map(size, 8)
    r = fsc(v, sharp_lowpass(v, 10))
    np.testing.assert_allclose(r.curve[1:11], 1.0, atol=1e-5)
    # beyond the cutoff only float32 rounding noise is left; FSC is scale-free, so it reads as noise
    assert (np.abs(r.curve[11:]) < 4.0 / np.sqrt(r.n_voxels[11:])).all()
    res = r.resolution(0.5)
    assert res.crossed and 10.0 <= res.shell <= 11.0
    assert res.shell == pytest.approx(10.5, abs=0.05)  # linear interpolation between ~1.0 and ~0.0
    assert res.px == pytest.approx(size / res.shell) and res.px == pytest.approx(size / 10.5, rel=0.01)
    assert res.angstrom is None  # no voxel size given
    assert r.resolution(0.143).shell == pytest.approx(10.857, abs=0.05)


def test_real_map_lowpassed_to_6_angstrom(adk):
    """ADK (L=64, 1.5 Å/px) low-passed at 6 Å = 0.25 cycles/px = shell 16: the resolution comes out
    between shells 16 and 17, i.e. between 64/17·1.5 = 5.65 Å and 64/16·1.5 = 6.0 Å."""
    data, voxel_size = adk
    assert voxel_size == pytest.approx(1.5)
    vol = torch.from_numpy(data.copy())
    cutoff_shell = round(data.shape[0] * voxel_size / 6.0)
    assert cutoff_shell == 16
    r = fsc(data, sharp_lowpass(vol, cutoff_shell).numpy(), voxel_size=voxel_size)
    for t in (0.5, 0.143):
        res = r.resolution(t)
        assert res.crossed
        assert 64 / 17 * 1.5 <= res.angstrom <= 6.0
        assert res.angstrom == pytest.approx(res.px * 1.5)
        assert res.px == pytest.approx(1.0 / res.freq_cyc_px)
    assert r.resolution(0.5).angstrom == pytest.approx(64 / 16.5 * 1.5, rel=0.01)


def test_resolution_interpolation_and_nyquist():
    size = 16
    freq = np.arange(9) / size
    n = np.ones(9, dtype=np.int64)
    curve = np.array([1.0, 1.0, 0.9, 0.6, 0.4, 0.1, 0.0, 0.0, 0.0])
    r = FSCResult(freq, curve, n, size, voxel_size=2.0)
    res = r.resolution(0.5)
    assert res.shell == pytest.approx(3.5)
    assert res.px == pytest.approx(16 / 3.5) and res.angstrom == pytest.approx(2 * 16 / 3.5)
    assert r.resolution(0.143).shell == pytest.approx(4 + (0.4 - 0.143) / 0.3)
    # a curve that never drops below the threshold reports Nyquist: 2.0 px
    flat = FSCResult(freq, np.full(9, 0.8), n, size, voxel_size=1.5)
    nyq = flat.resolution(0.5)
    assert not nyq.crossed and nyq.px == 2.0 and nyq.angstrom == 3.0 and nyq.freq_cyc_px == 0.5
    # DC below the threshold does not count as a crossing; DC and shell 1 below: crossing at shell 1
    dc_low = FSCResult(freq, np.array([-1.0, 1.0, 1.0, 0.0, 0, 0, 0, 0, 0]), n, size)
    assert dc_low.resolution(0.5).shell == pytest.approx(2.5)
    both_low = FSCResult(freq, np.array([0.1, 0.1, 1.0, 1, 1, 1, 1, 1, 1]), n, size)
    assert both_low.resolution(0.5).shell == 1.0 and both_low.resolution(0.5).px == 16.0


def test_to_dict_is_json_and_round_trips():
    v = random_map(16, 9)
    r = fsc(v, sharp_lowpass(v, 4), voxel_size=1.5)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert set(d["resolution"]) == {"0.5", "0.143"}
    assert d["resolution"]["0.5"]["px"] == pytest.approx(r.resolution(0.5).px)
    assert d["resolution"]["0.143"]["angstrom"] == pytest.approx(r.resolution(0.143).angstrom)
    assert d["voxel_size"] == 1.5 and d["box_size"] == 16 and len(d["curve"]) == 9
    assert d["freq_per_angstrom"][-1] == pytest.approx(0.5 / 1.5)
    back = FSCResult.from_dict(d)
    np.testing.assert_allclose(back.curve, r.curve)
    assert back.resolution(0.5) == r.resolution(0.5)
    assert FSCResult.from_dict(fsc(v, v).to_dict()).voxel_size is None


# --- masks, dtypes, devices, errors ---------------------------------------------------------------

def test_all_ones_mask_equals_unmasked():
    a, b = random_map(32, 10), random_map(32, 11)
    b = a + 0.5 * b
    unmasked = fsc(a, b)
    masked = fsc(a, b, mask=torch.ones(32, 32, 32))
    np.testing.assert_allclose(masked.curve, unmasked.curve, atol=1e-6)
    assert masked.masked and not unmasked.masked


def test_soft_mask_multiplies_both_maps():
    a, b = random_map(32, 12), random_map(32, 13)
    b = a + b
    mask = torch.sigmoid(10.0 - radial_shell_index(32, 3).float())  # soft sphere, radius ~10 px
    np.testing.assert_allclose(fsc(a, b, mask=mask).curve, fsc(a * mask, b * mask).curve, atol=1e-6)
    assert not np.allclose(fsc(a, b, mask=mask).curve, fsc(a, b).curve, atol=1e-3)


def test_float32_and_float64_agree():
    a, b = random_map(32, 14, torch.float64), random_map(32, 15, torch.float64)
    b = a + b
    np.testing.assert_allclose(fsc(a.float(), b.float()).curve, fsc(a, b).curve, atol=1e-5)
    np.testing.assert_allclose(fsc(a.numpy(), b.numpy()).curve, fsc(a, b).curve, atol=1e-12)


def test_inputs_requiring_grad_are_fine():
    v = random_map(16, 20).requires_grad_()
    np.testing.assert_allclose(fsc(v, v).curve, 1.0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    a, b = random_map(64, 16), random_map(64, 17)
    b = a + b
    mask = torch.sigmoid(20.0 - radial_shell_index(64, 3).float())
    cpu = fsc(a, b, mask=mask)
    gpu = fsc(a.cuda(), b.cuda(), mask=mask.cuda())
    np.testing.assert_allclose(gpu.curve, cpu.curve, atol=1e-5)
    np.testing.assert_array_equal(gpu.n_voxels, cpu.n_voxels)


@pytest.mark.parametrize("shape1,shape2,mask_shape", [
    ((16, 16, 16), (32, 32, 32), None),   # different boxes
    ((15, 15, 15), (15, 15, 15), None),   # odd box
    ((16, 16, 8), (16, 16, 8), None),     # not cubic
    ((16, 16), (16, 16), None),           # not 3D
    ((16, 16, 16), (16, 16, 16), (8, 8, 8)),  # mask mismatch
])
def test_bad_shapes_raise_value_error(shape1, shape2, mask_shape):
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError):
        fsc(torch.zeros(shape1), torch.zeros(shape2), mask=mask)


# --- plots ----------------------------------------------------------------------------------------

def test_plot_fsc_writes_png_atomically(tmp_path):
    v = random_map(32, 18)
    noisy = v + random_map(32, 19)
    with_a = fsc(v, noisy, voxel_size=1.5)
    out = tmp_path / "plots" / "fsc.png"
    plot_fsc({"noisy": with_a, "low-pass": fsc(v, sharp_lowpass(v, 8), voxel_size=1.5)}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "single.png"
    plot_fsc(fsc(v, noisy), out2, thresholds=(0.143,))  # one result, no voxel size: cycles/px axis
    assert out2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


# --- masked FSC with phase randomization (Chen et al. 2013) --------------------------------------

@pytest.fixture(scope="module")
def adk32() -> torch.Tensor:
    from cryoace.physics.fourier import fourier_crop

    return fourier_crop(torch.from_numpy(read_volume(ADK_L64).data.copy()).double(), 32, ndim=3)


def test_masked_fsc_with_all_ones_mask_is_the_plain_fsc(adk32):
    from cryoace.evaluate.fsc import masked_fsc

    a, b = adk32, sharp_lowpass(adk32, 8) + 0.01 * random_map(32, 3, torch.float64)
    result = masked_fsc(a, b, torch.ones(32, 32, 32), voxel_size=3.0)
    np.testing.assert_allclose(result.corrected.curve, fsc(a, b).curve, atol=1e-12)
    np.testing.assert_allclose(result.masked.curve, result.unmasked.curve, atol=1e-12)
    assert result.randomized is None and result.randomize_from_shell is None
    assert result.corrected.masked


def test_phase_randomization_removes_mask_induced_correlation(adk32):
    """Half maps = the map low-passed at shell 8 + independent noise: beyond shell 8 they share
    nothing, yet a tight mask correlates them; the corrected FSC is back near 0 there, and never above
    the masked FSC where the randomized FSC is positive."""
    from cryoace.evaluate.fsc import masked_fsc
    from cryoace.evaluate.mask import make_mask

    signal = sharp_lowpass(adk32, 8)
    g = torch.Generator().manual_seed(0)
    noise = [0.3 * float(adk32.std()) * torch.randn(adk32.shape, generator=g, dtype=torch.float64)
             for _ in range(2)]
    mask, _ = make_mask(adk32, extend_px=0, soft_px=2)
    result = masked_fsc(signal + noise[0], signal + noise[1], mask, voxel_size=3.0, seed=1)
    start = result.randomize_from_shell
    assert start == 9  # where the unmasked FSC first drops below 0.8
    outer = slice(10, None)
    assert result.masked.curve[outer].mean() > 0.4  # the mask's own correlation
    assert abs(result.corrected.curve[outer].mean()) < 0.1
    np.testing.assert_array_equal(result.corrected.curve[:start], result.masked.curve[:start])
    positive = result.randomized.curve >= 0
    assert (result.corrected.curve[positive] <= result.masked.curve[positive] + 1e-12).all()
    d = json.loads(json.dumps(result.to_dict()))
    assert d["phase_randomization"]["randomize_from_shell"] == 9 and d["masked"]
    # the corrected resolution is the honest one: well below the inflated masked one
    assert result.corrected.resolution(0.143).shell < 10 < result.masked.resolution(0.143).shell


def test_randomize_phases_keeps_amplitudes_and_inner_shells(adk32):
    from cryoace.evaluate.fsc import randomize_phases

    out = randomize_phases(adk32, 6, torch.Generator().manual_seed(0))
    f0, f1 = fft3_centered(adk32), fft3_centered(out)
    torch.testing.assert_close(f1.abs(), f0.abs(), atol=1e-8, rtol=1e-8)
    inner = radial_shell_index(32, 3) < 6
    torch.testing.assert_close(f1[inner], f0[inner], atol=1e-8, rtol=1e-8)
    assert fsc(adk32, out).curve[8:].max() < 0.3
