"""Fourier shell correlation (FSC) between two maps and the resolution at a threshold.

Conventions (docs/conventions.md §1 "Metrics"):

* Both maps are transformed with :func:`cryoace.physics.fourier.fft3_centered` (unnormalized, DC at
  index ``L//2`` on every axis). Shells are one voxel wide, from
  :func:`cryoace.physics.fourier.radial_shell_index`: voxel ``k`` belongs to shell ``round(|k|·L)``.
  Shells ``0 .. L//2`` are kept (shell ``L//2`` is Nyquist, 0.5 cycles/px); the corners of the cube
  beyond Nyquist are ignored.
* ``FSC_k = Re Σ F1·conj(F2) / sqrt(Σ|F1|² · Σ|F2|²)`` over the voxels of shell ``k``. A shell where
  either map has no power (denominator 0) gets FSC 0: no signal, no correlation.
* A mask (soft masks allowed) multiplies both maps in real space before the transform.
* Frequencies are in cycles/px (``shell / L``); resolution is ``1 / freq`` px (``L / shell``,
  Nyquist = 2.0 px) and ``px × voxel_size`` Å. 0.5 is the threshold against a ground-truth map, 0.143
  between independently reconstructed half-maps.

Computation runs on the maps' device (CPU or CUDA) in float32 or float64 (inputs of other dtypes are
promoted to float32); shell sums are accumulated in float64 with ``scatter_add`` (no Python loops).
Results come back as NumPy float64 arrays on the host, ready for JSON and plotting.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..physics.fourier import fft3_centered, ifft3_centered, radial_shell_index

__all__ = ["FSCResult", "Resolution", "fsc", "DEFAULT_THRESHOLDS", "MaskedFSC", "masked_fsc",
           "randomize_phases"]

#: The two customary thresholds: vs ground truth (0.5) and between half-maps (0.143).
DEFAULT_THRESHOLDS = (0.5, 0.143)


@dataclasses.dataclass(frozen=True)
class Resolution:
    """Where an FSC curve first drops below ``threshold``.

    threshold    : the FSC threshold.
    shell        : fractional shell index of the crossing (linear interpolation between shells).
    freq_cyc_px  : ``shell / L`` (cycles/px).
    px           : resolution in pixels, ``L / shell = 1 / freq_cyc_px`` (Nyquist = 2.0).
    angstrom     : ``px × voxel_size`` in Å, or None when the voxel size is unknown.
    crossed      : False when the curve never drops below the threshold up to Nyquist; the values are
                   then Nyquist's (the true resolution is at least that good).
    """

    threshold: float
    shell: float
    freq_cyc_px: float
    px: float
    angstrom: float | None
    crossed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain floats / bools / None)."""
        return {k: (None if v is None else (bool(v) if isinstance(v, bool) else float(v)))
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class FSCResult:
    """An FSC curve over shells ``0 .. L//2``.

    freq_cyc_px : (L//2+1,) float64, shell index / L, cycles/px (last = 0.5, Nyquist).
    curve       : (L//2+1,) float64, FSC per shell, in [-1, 1] (0 where a shell has no power).
    n_voxels    : (L//2+1,) int64, number of Fourier voxels in each shell.
    box_size    : L (voxels per side).
    voxel_size  : Å/px, or None when unknown (then Å values are None).
    masked      : whether a real-space mask multiplied both maps first.
    """

    freq_cyc_px: np.ndarray
    curve: np.ndarray
    n_voxels: np.ndarray
    box_size: int
    voxel_size: float | None = None
    masked: bool = False

    @property
    def shells(self) -> np.ndarray:
        """Integer shell indices 0 .. L//2."""
        return np.arange(len(self.curve))

    @property
    def freq_per_angstrom(self) -> np.ndarray | None:
        """Shell frequencies in 1/Å (cycles/px ÷ voxel size), or None when the voxel size is unknown."""
        if not self.voxel_size:
            return None
        return self.freq_cyc_px / self.voxel_size

    def resolution(self, threshold: float = 0.143) -> Resolution:
        """First crossing of the curve below ``threshold``, searched from shell 1 upwards.

        Shell 0 (DC, a single voxel) is not a candidate. With ``k`` the first shell ``>= 1`` where
        ``curve[k] < threshold``, the crossing is interpolated linearly between shells ``k-1`` and
        ``k``: ``shell = k-1 + (curve[k-1] - threshold) / (curve[k-1] - curve[k])``. (Should the DC
        term itself be below the threshold when ``k == 1``, the crossing is put at shell 1, i.e. no
        resolution better than the box.) If the curve never drops below ``threshold``, the result is
        Nyquist (shell ``L//2``, 2.0 px) with ``crossed=False``.
        """
        curve = np.asarray(self.curve, dtype=np.float64)
        nyquist = len(curve) - 1
        below = np.nonzero(curve[1:] < threshold)[0]
        if below.size == 0:
            shell, crossed = float(nyquist), False
        else:
            k = int(below[0]) + 1
            hi, lo = curve[k - 1], curve[k]
            if hi >= threshold:
                shell = (k - 1) + float((hi - threshold) / (hi - lo))
            else:  # only possible for k == 1 with a DC term below the threshold
                shell = float(k)
            crossed = True
        shell = max(shell, 1e-12)  # guards L/shell; the interpolation above never gives less than 1
        freq = shell / self.box_size
        px = self.box_size / shell
        angstrom = px * self.voxel_size if self.voxel_size else None
        return Resolution(threshold=float(threshold), shell=shell, freq_cyc_px=freq, px=px,
                          angstrom=angstrom, crossed=crossed)

    def to_dict(self, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
        """JSON-ready dict: the curve per shell and the resolution at each threshold.

        Keys: ``box_size``, ``voxel_size`` (Å/px or None), ``masked``, ``shell``, ``freq_cyc_px``,
        ``freq_per_angstrom`` (or None), ``curve``, ``n_voxels``, and ``resolution``: a dict from the
        threshold written as a string (``"0.5"``, ``"0.143"``) to :meth:`Resolution.to_dict`.
        """
        inv_a = self.freq_per_angstrom
        return {
            "box_size": int(self.box_size),
            "voxel_size": None if not self.voxel_size else float(self.voxel_size),
            "masked": bool(self.masked),
            "shell": [int(s) for s in self.shells],
            "freq_cyc_px": [float(f) for f in self.freq_cyc_px],
            "freq_per_angstrom": None if inv_a is None else [float(f) for f in inv_a],
            "curve": [float(c) for c in self.curve],
            "n_voxels": [int(n) for n in self.n_voxels],
            "resolution": {_threshold_key(t): self.resolution(t).to_dict() for t in thresholds},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FSCResult:
        """Inverse of :meth:`to_dict` (the resolutions are recomputed, not read)."""
        return cls(freq_cyc_px=np.asarray(d["freq_cyc_px"], dtype=np.float64),
                   curve=np.asarray(d["curve"], dtype=np.float64),
                   n_voxels=np.asarray(d["n_voxels"], dtype=np.int64),
                   box_size=int(d["box_size"]), voxel_size=d.get("voxel_size") or None,
                   masked=bool(d.get("masked", False)))


def _threshold_key(t: float) -> str:
    return f"{float(t):g}"


def _as_tensor(x, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x if device is None else x.to(device)
    else:
        a = np.asarray(x)
        if not a.flags.writeable:  # read-only memmaps: torch warns on non-writable buffers
            a = a.copy()
        t = torch.from_numpy(np.ascontiguousarray(a))
        if device is not None:
            t = t.to(device)
    if t.is_complex():
        raise TypeError("fsc expects real-valued maps")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t


def _check_volume(t: torch.Tensor, name: str) -> int:
    if t.ndim != 3 or len(set(t.shape)) != 1:
        raise ValueError(f"{name} must be a cubic (z, y, x) volume, got shape {tuple(t.shape)}")
    size = int(t.shape[0])
    if size % 2 or size < 2:
        raise ValueError(f"{name} must have an even box size, got {size}")
    return size


@torch.no_grad()
def fsc(vol1, vol2, mask=None, voxel_size: float | None = None) -> FSCResult:
    """Fourier shell correlation of two maps (torch tensors or NumPy arrays, (z, y, x), cubic, even L).

    ``mask`` (same shape, optional, soft masks allowed) multiplies both maps before the transform.
    ``voxel_size`` (Å/px) is only recorded in the result so that resolutions come out in Å too.
    The computation runs on ``vol1``'s device; the dtype is float64 if either map is float64, else
    float32. See the module docstring for the shell and sign conventions.
    Runs under ``torch.no_grad()`` (a metric, not a loss). Raises ``ValueError`` for non-cubic,
    odd-sized or mismatched shapes.
    """
    v1 = _as_tensor(vol1)
    v2 = _as_tensor(vol2, device=v1.device)
    size = _check_volume(v1, "vol1")
    _check_volume(v2, "vol2")
    if v1.shape != v2.shape:
        raise ValueError(f"maps differ in shape: {tuple(v1.shape)} vs {tuple(v2.shape)}")
    dtype = torch.promote_types(v1.dtype, v2.dtype)
    v1, v2 = v1.to(dtype), v2.to(dtype)
    if mask is not None:
        m = _as_tensor(mask, device=v1.device)
        if m.shape != v1.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} differs from the maps' {tuple(v1.shape)}")
        m = m.to(dtype)
        v1, v2 = v1 * m, v2 * m

    f1 = fft3_centered(v1).reshape(-1)
    f2 = fft3_centered(v2).reshape(-1)
    n_shells = size // 2 + 1
    # corners beyond Nyquist all go to one extra bin (index n_shells), dropped below: no boolean
    # indexing, hence no copies of the spectra and no host-device sync on CUDA
    idx = radial_shell_index(size, 3, device=v1.device).reshape(-1).clamp_(max=n_shells)
    sums = torch.zeros(3, n_shells + 1, dtype=torch.float64, device=v1.device)
    sums[0].scatter_add_(0, idx, (f1.real * f2.real + f1.imag * f2.imag).double())  # Re F1·conj(F2)
    sums[1].scatter_add_(0, idx, (f1.real.square() + f1.imag.square()).double())
    sums[2].scatter_add_(0, idx, (f2.real.square() + f2.imag.square()).double())
    sums = sums[:, :n_shells]
    counts = torch.bincount(idx, minlength=n_shells + 1)[:n_shells]
    denom = torch.sqrt(sums[1] * sums[2])
    curve = torch.where(denom > 0, sums[0] / torch.where(denom > 0, denom, torch.ones_like(denom)),
                        torch.zeros_like(denom))
    curve = curve.clamp(-1.0, 1.0)  # rounding can put a perfect correlation a hair above 1

    return FSCResult(
        freq_cyc_px=np.arange(n_shells, dtype=np.float64) / size,
        curve=curve.cpu().numpy(),
        n_voxels=counts.cpu().numpy().astype(np.int64),
        box_size=size,
        voxel_size=float(voxel_size) if voxel_size else None,
        masked=mask is not None,
    )


# ---------------------------------------------------------------------------------------------
# Masked FSC with the phase-randomization correction
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MaskedFSC:
    """A masked FSC corrected for the correlation the mask itself adds (Chen et al. 2013).

    corrected : the curve to report: the masked FSC up to ``randomize_from_shell``, then
                ``(FSC_t − FSC_n) / (1 − FSC_n)`` (FSC_t masked, FSC_n of the phase-randomized maps,
                masked the same way).
    unmasked, masked : the plain FSC and the FSC of the masked maps.
    randomized : FSC_n, or None when no correction was needed (mask all ones, or the unmasked FSC
                 never drops below the randomization threshold).
    randomize_from_shell : first shell whose phases were randomized (None when not randomized).
    """

    corrected: FSCResult
    unmasked: FSCResult
    masked: FSCResult
    randomized: FSCResult | None
    randomize_from_shell: int | None

    def to_dict(self, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
        """JSON-ready dict: the corrected curve (:meth:`FSCResult.to_dict`) under the top-level keys,
        plus ``phase_randomization`` with the first randomized shell and the other three curves."""
        d = self.corrected.to_dict(thresholds)
        d["phase_randomization"] = {
            "method": "Chen et al. 2013: phases randomized beyond the shell where the unmasked FSC "
                      "first drops below the threshold; FSC_true = (FSC_t - FSC_n) / (1 - FSC_n)",
            "randomize_from_shell": self.randomize_from_shell,
            "unmasked": self.unmasked.to_dict(thresholds),
            "masked": self.masked.to_dict(thresholds),
            "randomized": None if self.randomized is None else self.randomized.to_dict(thresholds),
        }
        return d


def randomize_phases(volume: torch.Tensor, from_shell: int, generator: torch.Generator) -> torch.Tensor:
    """The map with random phases at shells ``>= from_shell`` (amplitudes kept), a real map.

    The random phases are those of the transform of real white noise, which are odd in k, so that
    adding them keeps the spectrum Hermitian (the map real).
    """
    size = volume.shape[-1]
    spec = fft3_centered(volume)
    noise = torch.randn(volume.shape, generator=generator, dtype=volume.dtype).to(volume.device)
    phase = torch.angle(fft3_centered(noise))
    outer = radial_shell_index(size, 3, device=volume.device) >= from_shell
    spec = torch.where(outer, spec * torch.polar(torch.ones_like(phase), phase), spec)
    return ifft3_centered(spec).real


@torch.no_grad()
def masked_fsc(vol1, vol2, mask, voxel_size: float | None = None, seed: int = 0,
               randomize_below: float = 0.8) -> MaskedFSC:
    """Masked FSC with the phase-randomization correction of Chen et al. (2013).

    Phases of both maps are randomized independently (one generator seeded by ``seed``) at every shell
    from the first where the *unmasked* FSC drops below ``randomize_below`` (0.8); the masked FSC of
    those maps, ``FSC_n``, measures the correlation the mask alone creates, and beyond that shell
    ``FSC_true = (FSC_t − FSC_n) / (1 − FSC_n)`` (0 where ``FSC_n`` ≈ 1: nothing left to measure).
    A mask of all ones changes nothing, so there is nothing to correct: the result is then the plain
    FSC. Inputs as in :func:`fsc` (``mask`` required, soft allowed).
    """
    unmasked = fsc(vol1, vol2, voxel_size=voxel_size)
    masked = fsc(vol1, vol2, mask=mask, voxel_size=voxel_size)
    v1 = _as_tensor(vol1)
    m = _as_tensor(mask, device=v1.device)
    below = np.nonzero(unmasked.curve[1:] < randomize_below)[0]
    if bool((m == 1).all()) or below.size == 0:
        return MaskedFSC(corrected=dataclasses.replace(masked, curve=masked.curve.copy()),
                         unmasked=unmasked, masked=masked, randomized=None, randomize_from_shell=None)
    start = int(below[0]) + 1
    dtype = torch.promote_types(v1.dtype, torch.float32)
    v2 = _as_tensor(vol2, device=v1.device)
    generator = torch.Generator().manual_seed(int(seed))
    r1 = randomize_phases(v1.to(dtype), start, generator)
    r2 = randomize_phases(v2.to(dtype), start, generator)
    randomized = fsc(r1, r2, mask=m, voxel_size=voxel_size)
    curve = masked.curve.copy()
    fsc_t, fsc_n = masked.curve[start:], randomized.curve[start:]
    denom = 1.0 - fsc_n
    safe = denom > 1e-6
    curve[start:] = np.where(safe, (fsc_t - fsc_n) / np.where(safe, denom, 1.0), 0.0)
    corrected = dataclasses.replace(masked, curve=np.clip(curve, -1.0, 1.0))
    return MaskedFSC(corrected=corrected, unmasked=unmasked, masked=masked, randomized=randomized,
                     randomize_from_shell=start)
