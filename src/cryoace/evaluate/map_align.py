"""Volume-to-volume alignment without poses: rotation, translation and hand of one map onto another.

An ab initio map lives in an arbitrary frame and hand (docs/conventions.md §1 "Metrics"). Without ground-truth
poses, the frame is found by searching the map itself: :func:`align_maps` returns the rotation ``G``,
the hand and the translation that carry the moving map onto the reference.

**Transform (the convention of** :mod:`cryoace.evaluate.align` **).** With ``H = MIRROR`` =
diag(1, 1, −1) when the hand is flipped (else I), coordinates ``r = (x, y, z)`` in voxels of the
reference grid from its centre ``L//2``, and ``s`` = :attr:`MapAlignment.shift_px`,

    aligned(r) = moving(H G (r − s))        i.e. shift_volume(transform_volume(moving, G, flip), s).

In Å about the box centres the same formula holds with ``r`` and ``s`` in Å, whatever the two grids
(the moving map is first resampled onto the reference's voxel size and box, about the centres).

**Search.** Both maps are Fourier-cropped to a small box (``coarse_size``, default 20 voxels) and
low-passed; the mean-free moving map, masked by the inscribed ball so that rotations lose nothing in
the corners, is rotated by every rotation of a near-uniform grid (super-Fibonacci spiral on the unit
quaternions, Alexa 2022, about ``8π²/step³`` rotations for a spacing ``step``), for each hand tried
(``H G`` for the mirror). Each rotation is scored by the peak of its FFT cross-correlation with the
reference (the best translation for that rotation), normalized by both maps' norms; rotations are
processed in batches. The best few of each hand are refined by a shrinking pattern search (small
rotations about x, y, z on the left of ``G``) on maps Fourier-cropped to ``refine_size``, the peak
value interpolated per axis by a parabola so that the score varies smoothly with the rotation.
Finally, at full resolution, the best rotation of each hand is applied with
:func:`~cryoace.evaluate.align.transform_volume`, the sub-voxel translation is fitted with
:func:`~cryoace.evaluate.align.estimate_volume_offset`, and the hand with the higher real-space
correlation wins.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ..physics.fourier import fourier_crop, radial_distance
from ..physics.rotations import axis_angle_to_rotmat, geodesic_angle, quaternion_to_rotmat
from ..physics.slicing import sample_grid
from .align import (
    MIRROR,
    estimate_volume_offset,
    fourier_upsample,
    mirror_volume,
    resample_volume,
    shift_volume,
    transform_volume,
)
from .fsc import FSCResult, Resolution, fsc

__all__ = ["MapAlignment", "align_maps", "resample_map", "rotation_grid", "map_correlation",
           "HalfMapFSC", "half_map_fsc", "gaussian_lowpass"]

#: Relative tolerance under which two voxel sizes count as equal.
VOXEL_SIZE_RTOL = 1e-4
#: Spectral width of the Gaussian low-pass of the coarse search, cycles/px of the coarse box.
COARSE_LOWPASS_SIGMA = 0.25


@dataclasses.dataclass
class MapAlignment:
    """The transform that carries a moving map onto a reference: ``aligned(r) = moving(H G (r − s))``.

    rotation    : (3, 3) float64 rotation ``G``.
    flip_hand   : True when the moving map is the mirror image of the reference (``H = MIRROR``).
    shift_px    : (3,) float64 translation ``s`` = (x, y, z) in voxels of the reference grid.
    voxel_size  : Å/px of the reference grid (None when neither map knows it).
    correlation : Pearson correlation of the aligned map with the reference over the whole box.
    correlation_other_hand : the same for the best alignment in the rejected hand (None if not tried).
    aligned     : the aligned moving map on the reference grid, (L, L, L), float32.
    resampled_from : (box, voxel size Å) of the moving map when it was resampled, else None.
    searched    : False when no search ran (identity rotation, no shift: only resampling/mirroring).
    """

    rotation: torch.Tensor
    flip_hand: bool
    shift_px: torch.Tensor
    voxel_size: float | None
    correlation: float
    correlation_other_hand: float | None
    aligned: torch.Tensor
    resampled_from: tuple[int, float | None] | None = None
    searched: bool = True

    @property
    def matrix(self) -> torch.Tensor:
        """``H G`` (3, 3): the aligned map is ``moving(H G (r − s))``; determinant −1 when flipped."""
        return MIRROR @ self.rotation if self.flip_hand else self.rotation.clone()

    @property
    def angle_deg(self) -> float:
        """Rotation angle of ``G`` in degrees."""
        return float(torch.rad2deg(geodesic_angle(torch.eye(3, dtype=torch.float64), self.rotation)))

    @property
    def shift_angst(self) -> torch.Tensor | None:
        """``shift_px`` in Å (None when the voxel size is unknown)."""
        return None if not self.voxel_size else self.shift_px * self.voxel_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description of the transform (not the map)."""
        sa = self.shift_angst
        return {
            "convention": "aligned(r) = moving(H G (r - shift)), r and shift (x, y, z) about the box "
                          "centres (index L//2) of the reference grid; H = diag(1, 1, -1) if "
                          "flip_hand else I; G = rotation (row-major)",
            "rotation": [[float(v) for v in row] for row in self.rotation.tolist()],
            "rotation_angle_deg": self.angle_deg,
            "flip_hand": bool(self.flip_hand),
            "matrix_HG": [[float(v) for v in row] for row in self.matrix.tolist()],
            "shift_px": [float(v) for v in self.shift_px.tolist()],
            "shift_angst": None if sa is None else [float(v) for v in sa.tolist()],
            "voxel_size": self.voxel_size,
            "correlation": float(self.correlation),
            "correlation_other_hand": (None if self.correlation_other_hand is None
                                       else float(self.correlation_other_hand)),
            "resampled_from": (None if self.resampled_from is None else
                               {"box_size": int(self.resampled_from[0]),
                                "voxel_size": self.resampled_from[1]}),
            "searched": bool(self.searched),
        }


# ---------------------------------------------------------------------------------------------
# Grids and resampling
# ---------------------------------------------------------------------------------------------

def rotation_grid(step_deg: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A near-uniform grid of rotations (N, 3, 3) with a typical spacing of ``step_deg`` degrees.

    ``N = ceil(8π² / step³)`` (the volume of SO(3) in the angle metric over a cell of side ``step``,
    radians) unit quaternions on a super-Fibonacci spiral (Alexa, CVPR 2022): deterministic, no
    clustering at poles, unlike Euler-angle grids.
    """
    if not step_deg > 0:
        raise ValueError(f"step_deg must be positive, got {step_deg}")
    n = max(1, math.ceil(8 * math.pi ** 2 / math.radians(step_deg) ** 3))
    phi, psi = math.sqrt(2.0), 1.533751168755204288118041  # the two irrational winding numbers
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r = torch.sqrt(s / n)
    big_r = torch.sqrt(1.0 - s / n)
    alpha, beta = 2 * math.pi * s / phi, 2 * math.pi * s / psi
    q = torch.stack([r * torch.sin(alpha), r * torch.cos(alpha),
                     big_r * torch.sin(beta), big_r * torch.cos(beta)], -1)
    return quaternion_to_rotmat(q).to(dtype)


def _center_box(volume: torch.Tensor, size: int) -> torch.Tensor:
    """Crop or zero-pad a cubic map to ``size``³ keeping the centre voxel L//2 at size//2."""
    old = volume.shape[-1]
    if size == old:
        return volume
    if size < old:
        lo = old // 2 - size // 2
        return volume[lo:lo + size, lo:lo + size, lo:lo + size]
    out = volume.new_zeros((size,) * 3)
    lo = size // 2 - old // 2
    out[lo:lo + old, lo:lo + old, lo:lo + old] = volume
    return out


def _even_ceil(x: float) -> int:
    return 2 * math.ceil(x / 2 - 1e-9)


def resample_map(volume: torch.Tensor, voxel_size: float, new_voxel_size: float, box_size: int,
                 oversample: int = 2) -> torch.Tensor:
    """Resample a cubic map (L, L, L) at ``voxel_size`` Å/px onto a ``box_size``³ grid at
    ``new_voxel_size`` Å/px, about the box centres (index L//2 → box_size//2).

    A coarser target is first Fourier-cropped (no aliasing beyond its Nyquist); the box then changes by
    a centred crop or zero-pad, and a remaining scale factor is applied by band-limited interpolation
    (:func:`~cryoace.evaluate.align.resample_volume` with the matrix ``scale·I``). Points outside the
    source box read 0. Returns a float32 or float64 tensor like the input.
    """
    if voxel_size <= 0 or new_voxel_size <= 0:
        raise ValueError(f"voxel sizes must be positive, got {voxel_size} and {new_voxel_size}")
    work = volume.to(torch.float64)
    size = work.shape[-1]
    if new_voxel_size > voxel_size * (1 + VOXEL_SIZE_RTOL):
        n = _even_ceil(size * voxel_size / new_voxel_size)
        if n < size:
            work = fourier_crop(work, n, ndim=3)
            voxel_size, size = voxel_size * size / n, n
    scale = new_voxel_size / voxel_size
    if abs(scale - 1) > VOXEL_SIZE_RTOL:
        # the scaled grid must see the whole target box: pad the source first when it would not
        big = max(size, box_size, _even_ceil(scale * box_size))
        work = resample_volume(_center_box(work, big), scale * torch.eye(3, dtype=torch.float64),
                               oversample=oversample)
    return _center_box(work, box_size).to(volume.dtype).contiguous()


def map_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps over the whole box (a scalar in [−1, 1])."""
    x = a.to(torch.float64).flatten()
    y = b.to(torch.float64).flatten().to(x.device)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------

class _Scorer:
    """Scores of ``moving(A r)`` against a reference, for batches of matrices ``A``.

    The moving map is made mean-free inside the inscribed ball and zero outside it (so no rotation
    loses density in the corners), upsampled band-limitedly once (``oversample``), and sampled
    trilinearly inside the ball for every matrix (as :func:`~cryoace.evaluate.align.resample_volume`
    does for one matrix on the whole box).
    """

    def __init__(self, moving: torch.Tensor, reference: torch.Tensor, lowpass_sigma: float | None,
                 oversample: int = 2, batch: int = 64):
        size = moving.shape[-1]
        self.size, self.oversample, self.batch = size, oversample, batch
        mov, ref = moving.to(torch.float32), reference.to(torch.float32)
        if lowpass_sigma is not None:
            mov, ref = gaussian_lowpass(mov, lowpass_sigma), gaussian_lowpass(ref, lowpass_sigma)
        self.inside = (radial_distance(size, 3, dtype=torch.float32) <= size / 2 - 1).reshape(-1)
        ball = self.inside.reshape(mov.shape).to(torch.float32)
        mov = (mov - mov[ball > 0].mean()) * ball
        self.fine = fourier_upsample(mov, oversample) if oversample > 1 else mov
        self.ref = ref - ref.mean()  # mean-free: the moving map's DC cannot add to the correlation
        self.ref_ft_conj = torch.fft.rfftn(self.ref).conj()
        self.ref_norm = float(self.ref.norm())
        offsets = torch.arange(size, dtype=torch.float32) - size // 2
        z, y, x = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
        self.points = torch.stack([x, y, z], -1).reshape(-1, 3)[self.inside]

    def rotate(self, matrices: torch.Tensor) -> torch.Tensor:
        """``moving(A r)`` for (N, 3, 3) matrices → (N, L, L, L) (zero outside the ball)."""
        a = matrices.to(torch.float32)
        src = torch.einsum("qj,nij->nqi", self.points, a)  # A r for every voxel r in the ball
        src = src * self.oversample + (self.oversample * self.size) // 2
        out = self.fine.new_zeros(len(a), self.size ** 3)
        out[:, self.inside] = sample_grid(self.fine, src)
        return out.reshape(-1, self.size, self.size, self.size)

    def peak_scores(self, matrices: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
        """(N,) float64: max over whole-voxel translations of the FFT cross-correlation, divided by
        ‖moving‖·‖reference‖ (plain ``rfftn``, DC in the corner: only the peak value matters)."""
        out = []
        for start in range(0, len(matrices), self.batch):
            vols = self.rotate(matrices[start:start + self.batch])
            cc = torch.fft.irfftn(torch.fft.rfftn(vols, dim=(-3, -2, -1)) * self.ref_ft_conj,
                                  s=(self.size,) * 3, dim=(-3, -2, -1))
            peak = _peak_value(cc, interpolate)
            norms = vols.flatten(1).to(torch.float64).norm(dim=1) * self.ref_norm
            out.append(peak / norms.clamp_min(1e-30))
        return torch.cat(out)



class _ShiftedScore:
    """Correlation of ``moving(A r)`` with the reference translated by the current sub-voxel offset
    ``o`` (``reference(r − o)``), batched over ``A``: smooth in the rotation, which the whole-voxel
    FFT peak is not (its value jumps as the peak moves between voxels). ``update`` re-fits ``o`` at a
    new best rotation, so rotation and translation are refined alternately."""

    def __init__(self, scorer: _Scorer, matrix: torch.Tensor):
        self.scorer = scorer
        self.update(matrix)

    def update(self, matrix: torch.Tensor) -> None:
        vol = self.scorer.rotate(matrix[None])[0]
        self.offset = estimate_volume_offset(vol, self.scorer.ref)  # vol(r) ≈ ref(r − offset)
        ref = shift_volume(self.scorer.ref, self.offset).flatten().to(torch.float64)
        ref = ref - ref.mean()
        self.ref = ref / ref.norm().clamp_min(1e-30)

    def __call__(self, matrices: torch.Tensor) -> torch.Tensor:
        vols = self.scorer.rotate(matrices).flatten(1).to(torch.float64)
        vols = vols - vols.mean(1, keepdim=True)
        return (vols @ self.ref) / vols.norm(dim=1).clamp_min(1e-30)


def _peak_value(cc: torch.Tensor, interpolate: bool) -> torch.Tensor:
    """Maximum of each (L, L, L) correlation in a batch; with ``interpolate``, raised by a parabola
    through the peak and its two neighbours on each axis (circular), so the value is continuous in
    the sub-voxel position of the peak."""
    n, size = cc.shape[0], cc.shape[-1]
    flat = cc.reshape(n, -1).to(torch.float64)
    c0, idx = flat.max(1)
    if not interpolate:
        return c0
    pos = [idx // (size * size), (idx // size) % size, idx % size]
    rows = torch.arange(n)
    cube = flat.reshape(n, size, size, size)
    gain = torch.zeros_like(c0)
    for axis in range(3):
        lo, hi = list(pos), list(pos)
        lo[axis] = (pos[axis] - 1) % size
        hi[axis] = (pos[axis] + 1) % size
        cm, cp = cube[(rows, *lo)], cube[(rows, *hi)]
        curv = cp + cm - 2 * c0
        gain += torch.where(curv < 0, -(cp - cm) ** 2 / (8 * torch.where(curv < 0, curv, -1.0)), 0.0)
    return c0 + gain


def gaussian_lowpass(volume: torch.Tensor, sigma_cyc_px: float) -> torch.Tensor:
    """Multiply the spectrum by ``exp(−|k|²/(2σ²))`` (k in cycles/px): a smooth low-pass, no ringing."""
    size = volume.shape[-1]
    k = torch.fft.fftfreq(size, dtype=torch.float64)
    kr = torch.fft.rfftfreq(size, dtype=torch.float64)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
    filt = torch.exp(-k2 / (2 * sigma_cyc_px ** 2)).to(volume.dtype)
    return torch.fft.irfftn(torch.fft.rfftn(volume) * filt, s=volume.shape).to(volume.dtype)


def _with_hand(rotations: torch.Tensor, flip: bool) -> torch.Tensor:
    return MIRROR @ rotations if flip else rotations


def _distinct_top(scores: torch.Tensor, rotations: torch.Tensor, k: int, min_angle: float) -> list[int]:
    """Indices of the ``k`` best scores whose rotations are at least ``min_angle`` rad apart."""
    picked: list[int] = []
    for i in torch.argsort(scores, descending=True).tolist():
        if all(float(geodesic_angle(rotations[i], rotations[j])) >= min_angle for j in picked):
            picked.append(i)
            if len(picked) == k:
                break
    return picked


def _refine(score, rotation: torch.Tensor, flip: bool, step: float, min_step: float,
            max_iter: int = 100) -> tuple[torch.Tensor, float]:
    """Pattern search: try small rotations ±step about x, y, z (applied as ``exp(δ) G``), move to the
    best if it improves ``score`` (matrices (N, 3, 3) → (N,)), else halve the step; stop below
    ``min_step`` (radians). A score with an ``update(matrix)`` method is told of every move (and the
    best score is then re-evaluated with the updated score)."""
    axes = torch.cat([torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)])
    g = rotation
    best = float(score(_with_hand(g[None], flip))[0])
    for _ in range(max_iter):
        if step < min_step:
            break
        trial = axis_angle_to_rotmat(axes * step) @ g
        scores = score(_with_hand(trial, flip))
        i = int(torch.argmax(scores))
        if float(scores[i]) > best:
            g, best = trial[i], float(scores[i])
            if hasattr(score, "update"):
                score.update(_with_hand(g, flip))
                best = float(score(_with_hand(g[None], flip))[0])
        else:
            step /= 2
    return g, best


def _final(moving: torch.Tensor, reference: torch.Tensor, rotation: torch.Tensor, flip: bool,
           oversample: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Full resolution: rotate, fit the sub-voxel translation, and score by real-space correlation."""
    rotated = transform_volume(moving, rotation, flip, oversample=oversample)
    offset = estimate_volume_offset(rotated, reference)  # rotated(r) ≈ reference(r − offset)
    aligned = shift_volume(rotated, -offset)
    return aligned, -offset, map_correlation(aligned, reference)


def _prepare(moving, reference, moving_voxel_size, reference_voxel_size):
    """Tensors, and the moving map on the reference grid (resampled when box or voxel size differ)."""
    mov = _as_map(moving, "moving")
    ref = _as_map(reference, "reference")
    vm, vr = float(moving_voxel_size or 0.0), float(reference_voxel_size or 0.0)
    # an unknown voxel size is taken to be the other map's (the maps then differ only in box)
    vm, vr = (vm or vr), (vr or vm)
    resampled_from = None
    scale_differs = vm > 0 and abs(vm - vr) > VOXEL_SIZE_RTOL * max(vm, vr)
    if scale_differs or mov.shape != ref.shape:
        resampled_from = (mov.shape[-1], vm or None)
        if scale_differs:
            mov = resample_map(mov, vm, vr, ref.shape[-1])
        else:
            mov = _center_box(mov, ref.shape[-1]).contiguous()
    return mov, ref, (vr or None), resampled_from


def _as_map(x, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
    if t.ndim != 3 or len(set(t.shape)) != 1 or t.shape[0] % 2:
        raise ValueError(f"{name} must be a cubic (z, y, x) map with an even box, got {tuple(t.shape)}")
    return t.to(torch.float32).cpu()


def align_maps(moving, reference, moving_voxel_size: float | None = None,
               reference_voxel_size: float | None = None, *, hands: str = "both", search: bool = True,
               angular_step_deg: float = 18.0, coarse_size: int = 20, refine_size: int = 64,
               n_candidates: int = 2, min_step_deg: float = 0.1, oversample: int = 2) -> MapAlignment:
    """Align ``moving`` onto ``reference`` (arrays or tensors, (z, y, x), cubic, even boxes).

    moving_voxel_size, reference_voxel_size : Å/px (None or 0 = unknown: taken from the other map).
        Maps of different box or voxel size are compared on the reference's grid (see
        :func:`resample_map`).
    hands            : ``"both"`` (try the mirror too, keep the better), ``"original"`` or ``"flipped"``.
    search           : False: no rotation or translation search; the result is the moving map on the
                       reference grid, mirrored when ``hands == "flipped"``.
    angular_step_deg : spacing of the global rotation grid (degrees); ~2 500 rotations per hand at 18°.
    coarse_size      : box (voxels) of the global search (both maps Fourier-cropped to it).
    refine_size      : box (voxels) of the local refinement (Fourier-cropped when the maps are larger).
    n_candidates     : best grid rotations of each hand that are refined.
    min_step_deg     : the refinement stops when its step falls below this (degrees).
    oversample       : band-limited upsampling before trilinear interpolation (see resample_volume).
    Runs on the CPU in float32 (float64 for the transforms).
    """
    if hands not in ("both", "original", "flipped"):
        raise ValueError(f"hands must be 'both', 'original' or 'flipped', got {hands!r}")
    mov, ref, voxel_size, resampled_from = _prepare(moving, reference, moving_voxel_size,
                                                    reference_voxel_size)
    eye = torch.eye(3, dtype=torch.float64)
    if not search:
        flip = hands == "flipped"
        aligned = mirror_volume(mov) if flip else mov
        return MapAlignment(rotation=eye, flip_hand=flip, shift_px=torch.zeros(3, dtype=torch.float64),
                            voxel_size=voxel_size, correlation=map_correlation(aligned, ref),
                            correlation_other_hand=None, aligned=aligned.to(torch.float32),
                            resampled_from=resampled_from, searched=False)

    size = ref.shape[-1]
    flips = [False, True] if hands == "both" else [hands == "flipped"]
    step = math.radians(angular_step_deg)
    # 1. global search on small, low-passed maps (plain trilinear: the low-pass leaves little for
    #    interpolation to attenuate), then each hand's best few refined there down to ~1/8 of a step
    small = min(size, _even_ceil(coarse_size))
    coarse = _Scorer(fourier_crop(mov, small, ndim=3), fourier_crop(ref, small, ndim=3),
                     lowpass_sigma=COARSE_LOWPASS_SIGMA, oversample=1)
    grid = rotation_grid(angular_step_deg)
    coarse_refined = {}
    for flip in flips:
        scores = coarse.peak_scores(_with_hand(grid, flip))
        refined = [_refine(lambda m: coarse.peak_scores(m, interpolate=True), grid[i], flip, step / 2,
                           step / 8)
                   for i in _distinct_top(scores, grid, n_candidates, step)]
        coarse_refined[flip] = max(refined, key=lambda gs: gs[1])[0]
    # 2. the hand: full-resolution correlation of each hand's best
    finals = {flip: (g, *_final(mov, ref, g, flip, oversample)) for flip, g in coarse_refined.items()}
    flip = max(finals, key=lambda f: finals[f][3])
    # 3. fine refinement of the winner (box <= refine_size), rotation and sub-voxel shift in turn
    mid = min(size, _even_ceil(refine_size))
    fine = _Scorer(fourier_crop(mov, mid, ndim=3), fourier_crop(ref, mid, ndim=3), lowpass_sigma=None,
                   oversample=oversample)
    g0 = finals[flip][0]
    g, _ = _refine(_ShiftedScore(fine, _with_hand(g0, flip)), g0, flip, step / 8,
                   math.radians(min_step_deg))
    _, aligned, shift, corr = finals[flip] = (g, *_final(mov, ref, g, flip, oversample))
    other = finals.get(not flip)
    return MapAlignment(rotation=g, flip_hand=bool(flip), shift_px=shift, voxel_size=voxel_size,
                        correlation=corr, correlation_other_hand=None if other is None else other[3],
                        aligned=aligned.to(torch.float32), resampled_from=resampled_from)


# ---------------------------------------------------------------------------------------------
# Half maps
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class HalfMapFSC:
    """The FSC of two independently reconstructed half maps after aligning B onto A.

    fsc        : FSC of half A against the aligned half B.
    alignment  : how B was moved (:class:`MapAlignment`; ``aligned`` is B in A's frame).
    resolution : where ``fsc`` first drops below 0.143 (px and Å).
    """

    fsc: FSCResult
    alignment: MapAlignment
    resolution: Resolution


def half_map_fsc(half_a, half_b, voxel_size: float | None = None, **align_kwargs) -> HalfMapFSC:
    """Align ``half_b`` onto ``half_a`` (rotation, shift and hand: independent ab initio runs live in
    different frames) and return their FSC with its 0.143 resolution (``voxel_size`` in Å/px).
    ``align_kwargs`` go to :func:`align_maps`."""
    alignment = align_maps(half_b, half_a, voxel_size, voxel_size, **align_kwargs)
    result = fsc(half_a, alignment.aligned, voxel_size=voxel_size)
    return HalfMapFSC(fsc=result, alignment=alignment, resolution=result.resolution(0.143))
