"""Pose search by projection matching: the rotation and shift of each image that best explain it
under a given Fourier volume (exhaustive over SO(3), or locally around earlier poses).

**Score.** The model of an image with pose (R, t) is ``P(k) = C(k)·e^{2πi k·t}·V̂(Rᵀk)`` — exactly
:func:`cryoace.physics.forward.render_spectra` — and a candidate's error is the training loss's
``Σ_k w(k)·|Ŷ(k) − P(k)|²`` over the half-spectrum points of a :class:`~cryoace.physics.band.HalfDiscGrid`
of ``shells`` Fourier shells (:func:`search_band`; w = the half-grid weights / L⁴). Dropping the candidate-independent
``Σ w|Ŷ|²`` it is ``−2·Re Σ w·conj(Ŷ)·C·e^{2πi k·t}·S_R + Σ w·C²·|S_R|²`` with ``S_R = V̂(Rᵀk)``: for a
set of rotations shared by all images (the global search) both terms are matrix products of the
images' (B·J, K) rows (J shifts) with the slices' (K, R) columns, so millions of candidates per image
cost a few GEMMs; slices are computed once per rotation, not per image.

**Global search** (:func:`global_search`): rotations of :func:`so3_grid` (Fibonacci-sphere viewing
directions × uniform in-plane angles, about ``step`` degrees apart) × shifts on a small grid.
**Local search** (:func:`local_search`): each image's own rotation turned by every element of a small
cube of rotation vectors (:func:`local_offsets`) and its shift moved on a small grid; repeated with
halving steps and growing band (coarse to fine).

The volume is any callable ``coords (…, 3) cycles/px → complex``: a decoder, or (much faster for
thousands of rotations) :class:`~cryoace.physics.forward.VoxelFourierVolume` of a map.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..physics.band import HalfDiscGrid
from ..physics.ctf import compute_ctf
from ..physics.rotations import axis_angle_to_rotmat, euler_relion_to_rotmat, geodesic_angle
from ..physics.shift import phase_ramp
from ..physics.slicing import central_slice_coords
from ..types import CTFParams, Pose

__all__ = ["SearchResult", "search_band", "so3_grid", "local_offsets", "shift_grid", "global_search",
           "local_search", "pose_posterior", "pose_confidence", "pose_score", "shift_disc", "centring_shifts",
           "centred_shift_grid"]

FourierVolume = Callable[[torch.Tensor], torch.Tensor]


def search_band(size: int, shells: int, device=None, dtype: torch.dtype = torch.float32) -> HalfDiscGrid:
    """The loss's half-disc grid of ``shells`` Fourier shells (clamped to 1 … L/2) of an L = ``size`` box."""
    shells = int(min(max(1, shells), size // 2))
    return HalfDiscGrid(size, device=device, dtype=dtype, radius_cyc_px=shells / size)


def _ctf_values(band: HalfDiscGrid, ctf: CTFParams | None, pixel_size: torch.Tensor, batch: int) -> torch.Tensor:
    """CTF values (B, K) at the band's points (ones without CTF)."""
    if ctf is None:
        return torch.ones(batch, band.freq.shape[0], dtype=band.freq.dtype, device=band.freq.device)
    return compute_ctf(ctf, band.freq, pixel_size).to(band.freq.dtype)


def so3_grid(step_deg: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotations (R, 3, 3) covering SO(3) about ``step_deg`` degrees apart: Fibonacci-sphere viewing
    directions (n ≈ 4π/step²) × ``ceil(360/step)`` uniform in-plane angles (RELION ZYZ, psi last)."""
    step = math.radians(float(step_deg))
    n_dir = max(2, math.ceil(4 * math.pi / step ** 2))
    n_psi = max(1, math.ceil(2 * math.pi / step))
    i = torch.arange(n_dir, dtype=torch.float64)
    tilt = torch.arccos(1 - 2 * (i + 0.5) / n_dir)
    rot = torch.remainder(i * math.pi * (3 - math.sqrt(5)), 2 * math.pi)  # golden-angle spiral
    psi = torch.arange(n_psi, dtype=torch.float64) * (2 * math.pi / n_psi)
    rotmat = euler_relion_to_rotmat(rot[:, None], tilt[:, None], psi[None, :])
    return rotmat.reshape(-1, 3, 3).to(device=device, dtype=dtype)


def local_offsets(step_deg: float, half_width: int = 1, device=None, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Small rotations (Q, 3, 3): rotation vectors on the cube {−n…n}³·step (n = ``half_width``),
    identity first."""
    r = torch.arange(-half_width, half_width + 1, dtype=torch.float64)
    vec = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    vec = vec[torch.argsort(vec.norm(dim=-1), stable=True)] * math.radians(float(step_deg))
    return axis_angle_to_rotmat(vec).to(device=device, dtype=dtype)


def shift_grid(half_width: int, step_px: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Shifts (J, 2) in px on the square grid {−n…n}²·step (n = ``half_width``), zero first."""
    r = torch.arange(-half_width, half_width + 1, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(r, r, indexing="xy"), -1).reshape(-1, 2)
    grid = grid[torch.argsort(grid.norm(dim=-1), stable=True)] * float(step_px)
    return grid.to(device=device, dtype=dtype)


def shift_disc(radius_px: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer shifts (J, 2) in px with |t| ≤ ``radius_px``, zero first (nearest first)."""
    n = int(math.floor(radius_px))
    grid = shift_grid(n, 1.0, dtype=torch.float64)
    return grid[grid.norm(dim=-1) <= radius_px + 1e-9].to(device=device, dtype=dtype)


def centring_shifts(volume: FourierVolume, images: torch.Tensor, pixel_size: torch.Tensor, band: HalfDiscGrid,
                    radius_px: float, ctf: CTFParams | None = None, step_deg: float = 30.0,
                    step_px: float = 2.0) -> torch.Tensor:
    """Each image's shift (B, 2) in px (the pose shift's convention), within ``radius_px`` of 0, from a
    coarse global search — SO(3) every ``step_deg``, shifts every ``step_px`` on a disc — in ``band``
    (low: the coarse steps need no finer detail): where the particle is. The centre of a global
    search's finer shift grid, so that particles far off-centre are found (a grid of ±1 px around 0
    misses most beyond ~3 px). Cheap: a few hundred rotations × the disc's shifts."""
    shifts = shift_disc(radius_px / step_px, device=images.device, dtype=band.freq.dtype) * step_px
    rotations = so3_grid(step_deg, device=images.device, dtype=band.freq.dtype)
    found = global_search(volume, images, pixel_size, band, rotations, ctf, shifts_px=shifts)
    return found.pose.shift_angst / pixel_size.to(band.freq.dtype)[:, None]


def centred_shift_grid(volume: FourierVolume, images: torch.Tensor, pixel_size: torch.Tensor, band: HalfDiscGrid,
                       radius_px: float, shifts_px: torch.Tensor, ctf: CTFParams | None = None) -> torch.Tensor:
    """Each image's shifts (B, 2J, 2) px for a :func:`global_search`: the grid ``shifts_px`` (J, 2) around
    its :func:`centring_shifts` (within ``radius_px``) and around 0 — around 0 as well because at low
    SNR the centring of small elongated particles is sometimes off (S2 protomer at SNR 0.05: 17 % more
    than 3 px from the truth) where the grid around 0 still holds the particles near the centre."""
    centres = centring_shifts(volume, images, pixel_size, band, radius_px, ctf)
    grid = shifts_px.to(device=centres.device, dtype=centres.dtype)[None]
    return torch.cat([centres[:, None, :] + grid, grid.expand(len(centres), -1, -1)], 1)


@dataclasses.dataclass
class SearchResult:
    """Best pose per image: ``pose`` (rotmat, shift in Å) and its ``error`` (B,): the training loss's
    per-image error ``Σ w·|Ŷ − P|²`` within the band (≈ mean squared pixel error)."""

    pose: Pose
    error: torch.Tensor


def _image_rows(band: HalfDiscGrid, images, ctf_values, shift_px) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w·conj(Ŷ)·C·e^{2πi k·t}`` for every image and shift (B, J, K), ``w·C²`` (B, K) and the
    candidate-independent ``Σ w·|Ŷ|²`` (B,)."""
    spectra = band.target(images)
    base = band.weights * spectra.conj() * ctf_values  # (B, K)
    ramps = phase_ramp(band.freq, shift_px)              # (B, J, K)
    power = (band.weights * (spectra.real ** 2 + spectra.imag ** 2)).sum(-1)
    return base[:, None, :] * ramps, band.weights * ctf_values ** 2, power


def global_search(volume: FourierVolume, images: torch.Tensor, pixel_size: torch.Tensor, band: HalfDiscGrid,
                  rotations: torch.Tensor, ctf: CTFParams | None = None,
                  shifts_px: torch.Tensor | None = None, rotation_chunk: int = 4096, top_k: int = 1,
                  distinct_rotations: bool = False) -> SearchResult:
    """The best of ``rotations`` (R, 3, 3) × shifts for each image (B, L, L).

    pixel_size : (B,) Å/px; ctf : (B,) or None.
    shifts_px  : (J, 2) shifts (px) tried for every image (:func:`shift_grid`; just zero if None), or
                 (B, J, 2) each image's own (e.g. a grid around its :func:`centring_shifts`).
    top_k      : keep the ``top_k`` best candidates per image (pose and error gain a dimension k after
                 the batch, best first) instead of the single best.
    distinct_rotations : the ``top_k`` candidates are ``top_k`` different rotations, each with its best
                 shift (else a rotation may come back with several shifts).
    """
    batch, device = images.shape[0], images.device
    dtype = band.freq.dtype
    offsets = torch.zeros(1, 2, dtype=dtype, device=device) if shifts_px is None else shifts_px.to(dtype)
    candidates = offsets if offsets.ndim == 3 else offsets[None].expand(batch, -1, -1)  # (B, J, 2)
    rows, energy_rows, power = _image_rows(band, images, _ctf_values(band, ctf, pixel_size, batch), candidates)
    n_shift = rows.shape[1]
    lhs = torch.cat([rows.real, -rows.imag], -1).reshape(batch * n_shift, -1)  # Re(a·s) = aᵣsᵣ − aᵢsᵢ
    best_err = torch.full((batch, top_k), math.inf, dtype=dtype, device=device)
    best_flat = torch.zeros(batch, top_k, dtype=torch.long, device=device)  # shift · R + rotation
    n_rot = rotations.shape[0]
    with torch.no_grad():
        for start in range(0, n_rot, rotation_chunk):
            rot = rotations[start:start + rotation_chunk].to(device=device, dtype=dtype)
            slices = volume(central_slice_coords(rot, band.freq)).to(rows.dtype)  # (r, K)
            cross = lhs @ torch.cat([slices.real, slices.imag], -1).T              # (B·J, r)
            energy = energy_rows @ (slices.real ** 2 + slices.imag ** 2).T         # (B, r)
            err = energy[:, None, :] - 2 * cross.reshape(batch, n_shift, -1)  # (B, J, r)
            r = rot.shape[0]
            if distinct_rotations:  # each rotation once, at its best shift
                err, best_shift = err.min(1)
                chunk_err, chunk_arg = err.topk(min(top_k, r), dim=-1, largest=False)
                chunk_flat = best_shift.gather(1, chunk_arg) * n_rot + start + chunk_arg
            else:
                err = err.reshape(batch, -1)
                chunk_err, chunk_arg = err.topk(min(top_k, err.shape[1]), dim=-1, largest=False)
                chunk_flat = (chunk_arg // r) * n_rot + start + chunk_arg % r
            both_err = torch.cat([best_err, chunk_err], -1)
            both_flat = torch.cat([best_flat, chunk_flat], -1)
            best_err, pick = both_err.topk(top_k, dim=-1, largest=False)
            best_flat = both_flat.gather(-1, pick)
    best_err = best_err + power[:, None]
    rotmat = rotations.to(device=device, dtype=dtype)[best_flat % n_rot]
    shift_px = candidates.gather(1, (best_flat // n_rot)[..., None].expand(-1, -1, 2))
    if top_k == 1:
        rotmat, shift_px, best_err = rotmat[:, 0], shift_px[:, 0], best_err[:, 0]
    scale = pixel_size.to(dtype).reshape(-1, *([1] * (shift_px.ndim - 1)))
    return SearchResult(Pose(rotmat=rotmat, shift_angst=shift_px * scale), best_err)


def local_search(volume: FourierVolume, images: torch.Tensor, pixel_size: torch.Tensor, band: HalfDiscGrid,
                 pose: Pose, rotation_offsets: torch.Tensor, shifts_px: torch.Tensor,
                 ctf: CTFParams | None = None) -> SearchResult:
    """The best of ``R·Δ`` for Δ in ``rotation_offsets`` (Q, 3, 3) and ``t + δ`` for δ in ``shifts_px``
    (J, 2) px around each image's ``pose`` (B)."""
    batch, device = images.shape[0], images.device
    dtype = band.freq.dtype
    rotmat = pose.rotmat.to(device=device, dtype=dtype)
    centre = pose.shift_angst.to(dtype) / pixel_size[:, None].to(dtype)
    candidates = centre[:, None, :] + shifts_px.to(dtype)[None]         # (B, J, 2)
    rows, energy_rows, power = _image_rows(band, images, _ctf_values(band, ctf, pixel_size, batch), candidates)
    trial = rotmat[:, None] @ rotation_offsets.to(device=device, dtype=dtype)[None]  # (B, Q, 3, 3)
    with torch.no_grad():
        # sampled frequency-major (B, K, Q): the Q nearby rotations' samples of one frequency lie close
        # together in the volume, so the interpolation reads memory in order (~20 % faster on a CPU)
        slices = volume(central_slice_coords(trial, band.freq).transpose(1, 2)).to(rows.dtype)  # (B, K, Q)
        cross = torch.einsum("bjk,bkq->bjq", rows, slices).real
        energy = torch.einsum("bk,bkq->bq", energy_rows, slices.real ** 2 + slices.imag ** 2)
    err = (energy[:, None, :] - 2 * cross).reshape(batch, -1) + power[:, None]
    best_err, arg = err.min(-1)
    n_rot = trial.shape[1]
    index = torch.arange(batch, device=device)
    best_rotmat = trial[index, arg % n_rot]
    shift_px = candidates[index, arg // n_rot]
    return SearchResult(Pose(rotmat=best_rotmat, shift_angst=shift_px * pixel_size[:, None].to(dtype)), best_err)


def pose_posterior(error: torch.Tensor, coefficients: float, temperature: float = 1.0) -> torch.Tensor:
    """Posterior probabilities (B, K) of candidate poses from their errors (B, K), best first.

    Under white Gaussian noise of power E_min/K per Fourier coefficient (E_min: the best candidate's
    error, K = ``coefficients`` in the band, counting both Hermitian halves), the log-likelihood of a
    candidate is −E·K/(2·E_min) up to a constant; ``temperature`` > 1 flattens it."""
    best = error[..., :1].clamp(min=torch.finfo(error.dtype).tiny)
    logits = -(error - best) * (coefficients / (2 * best * temperature))
    return torch.softmax(logits, dim=-1)


def band_coefficients(band: HalfDiscGrid) -> float:
    """Fourier coefficients of an image inside ``band``, both Hermitian halves (the weights are the
    half-grid multiplicities / L⁴)."""
    return float(band.weights.sum()) * band.size ** 4


def pose_confidence(candidates: SearchResult, radius_deg: float) -> torch.Tensor:
    """Each image's pose confidence (B,) in [0, 1]: the fraction of its ``top_k`` best rotations (a
    :func:`global_search` with ``distinct_rotations``) that lie within ``radius_deg`` of the best one.

    When the data single out a pose, the next-best rotations are its neighbours in the basin around
    it (confidence near 1); when they do not (noise, a wrong map), the best rotations are scattered
    over SO(3) (confidence near 1/k). Unlike the white-noise posterior of the candidates
    (:func:`pose_posterior`), which puts most of its mass on the best candidate even for pure noise
    images (the chance correlations of a high-dimensional reference), this needs no noise model."""
    if candidates.error.ndim != 2:
        raise ValueError("pose_confidence needs the top_k > 1 candidates of a global search")
    rotmat = candidates.pose.rotmat
    angle = torch.rad2deg(geodesic_angle(rotmat[:, :1].expand_as(rotmat), rotmat))
    return (angle <= radius_deg).to(candidates.error.dtype).mean(-1)


def pose_score(volume: FourierVolume, images: torch.Tensor, pixel_size: torch.Tensor, band: HalfDiscGrid,
               pose: Pose, rotations: torch.Tensor, ctf: CTFParams | None = None) -> torch.Tensor:
    """Each image's pose score (B,): by how many standard deviations its pose's error beats the
    errors of ``rotations`` (Q, 3, 3; e.g. a seeded uniform draw, shared by all images) at the same
    shift, CTF and band: ``(mean_q E_q − E) / std_q E_q``.

    The spread of the random rotations' errors holds both the noise and the signal's own variation
    over views, so the score saturates: the right pose of a noise-free image scores ~5–9, of one at a
    whole-box SNR of 0.1 (64 px) ~4–7, a local optimum in a wrong basin ~3–5 (measured). It tells
    right from wrong only statistically — :func:`~cryoace.reconstruct.refine.extend_refinement`
    calibrates its threshold on particles with known poses. Unlike :func:`pose_confidence` it needs
    no global search: one GEMM per call, as a chunk of a global search."""
    batch, dtype = images.shape[0], band.freq.dtype
    shift_px = (pose.shift_angst.to(dtype) / pixel_size[:, None].to(dtype))[:, None, :]
    rows, energy_rows, _ = _image_rows(band, images, _ctf_values(band, ctf, pixel_size, batch), shift_px)
    rows = rows[:, 0]                                                            # (B, K)
    with torch.no_grad():
        random = volume(central_slice_coords(rotations.to(device=images.device, dtype=dtype), band.freq)
                        ).to(rows.dtype)                                         # (Q, K)
        own = volume(central_slice_coords(pose.rotmat.to(device=images.device, dtype=dtype), band.freq)
                     ).to(rows.dtype)                                            # (B, K)
        # the error up to the candidate-independent Σ w|Ŷ|²: Σ w·C²·|S|² − 2·Re Σ w·conj(Ŷ)·C·e^{2πik·t}·S
        random_err = energy_rows @ (random.real ** 2 + random.imag ** 2).T - 2 * (rows @ random.T).real
        own_err = (energy_rows * (own.real ** 2 + own.imag ** 2)).sum(-1) - 2 * (rows * own).sum(-1).real
    spread = random_err.std(-1).clamp(min=torch.finfo(dtype).tiny)
    return (random_err.mean(-1) - own_err) / spread
