"""Put an ab initio result in the frame and hand of the ground truth: poses, then the map.

An ab initio reconstruction lives in an arbitrary frame and may be the mirror image of the truth.
With ground-truth poses, the global rotation and the hand are fitted by least squares over *all*
particles (docs/conventions.md §1 "Metrics"); the same transform then carries the predicted map into the
truth's frame, so that the FSC against the true map measures the map, not the frame.

**Derivation (R maps volume → image coordinates; ``image(x) = Σ_z v(Rᵀ x)``, docs/conventions.md §1).**

*Rotation.* If the predicted map is the truth expressed in a rotated frame, ``v_pred(r) = v(Q r)``,
then ``Σ_z v_pred(R_predᵀ x) = Σ_z v(Q R_predᵀ x)``, which is the true projection for
``R_gtᵀ = Q R_predᵀ``, i.e. ``R_pred = R_gt Qᵀ``: a global change of the volume frame acts on the
**right** of every pose. The alignment ``G`` is therefore the rotation with ``R_gt ≈ R_pred G`` for
all particles, minimising ``Σ_i ‖R_gt,i − R_pred,i G‖²_F = Σ_i (6 − 2 tr(Gᵀ R_pred,iᵀ R_gt,i))``:
with ``S = Σ_i R_pred,iᵀ R_gt,i = U Σ Vᵀ`` (SVD), ``G = U diag(1, 1, det(U Vᵀ)) Vᵀ`` (orthogonal
Procrustes / the chordal L2 mean of ``R_pred,iᵀ R_gt,i``, projected on SO(3)). If
``R_pred = R_gt Q`` exactly, ``G = Qᵀ`` exactly.

*Hand.* The mirror image of a map is modelled as ``v_mirror(x, y, z) = v(x, y, −z)``, i.e.
``v_mirror(r) = v(M r)`` with ``M = diag(1, 1, −1)`` (any other mirror is ``M`` times a rotation,
which ``G`` absorbs; the point inversion ``−I`` is ``M`` times a 180° turn about z). Substituting
``z → −z`` in the sum along the beam, ``Σ_z v(M Rᵀ x) = Σ_z v(M Rᵀ M x)``, so

    projection(v_mirror, R) == projection(v, M R M)        (the same image, pixel for pixel),

and ``M R M`` is a proper rotation. A mirrored prediction is therefore aligned by fitting ``G`` to
``R_gt ≈ (M R_pred M) G``. Both hands are fitted and the one with the smaller mean squared Frobenius
error wins. Because the image is unchanged (not mirrored), **image shifts are unchanged by the hand
flip** as well as by any global rotation about the box centre; only a global *translation* of the
map changes the shifts (see :func:`cryoace.evaluate.pose_metrics.fit_global_offset`).

*Map.* With ``H = M`` for the flipped hand and ``H = I`` otherwise, the predicted map in the truth's
frame is ``v_aligned(r) = v_pred(H G r)`` (:func:`transform_volume`): rendering ``v_aligned`` with
the aligned poses ``H R_pred H G`` gives exactly the images ``v_pred`` gives with ``R_pred``.

Coordinates ``r = (x, y, z)`` are in voxels from the centre index ``L//2`` (docs/conventions.md §1).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..physics.fourier import fft3_centered, freq_grid_3d, ifft3_centered
from ..physics.slicing import sample_grid

__all__ = ["RotationAlignment", "MIRROR", "align_rotations", "apply_alignment", "resample_volume",
           "transform_volume", "mirror_volume", "shift_volume", "estimate_volume_offset",
           "fourier_upsample"]

#: The mirror that models a hand flip: (x, y, z) → (x, y, −z).
MIRROR = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


@dataclasses.dataclass(frozen=True)
class RotationAlignment:
    """The global alignment of predicted poses to ground truth.

    rotation       : (3, 3) float64 rotation ``G``: ``R_gt ≈ H R_pred H G`` (``H = MIRROR`` if
                     ``flip_hand`` else I); the aligned map is ``v_pred(H G r)``.
    flip_hand      : True when the predicted map is the mirror image of the truth.
    aligned        : (N, 3, 3) float64 aligned predicted rotations ``H R_pred H G``.
    mean_sq_frobenius            : mean ``‖R_gt − aligned‖²_F`` for the chosen hand.
    mean_sq_frobenius_other_hand : the same for the rejected hand (how decisive the choice was).
    reference      : (N, 3, 3) the true rotations as compared: ``R_gt`` itself, or with symmetry
                     operators each particle's nearest symmetry mate ``R_gt g`` (None only for an
                     alignment rebuilt without them, e.g. from a saved record).
    """

    rotation: torch.Tensor
    flip_hand: bool
    aligned: torch.Tensor
    mean_sq_frobenius: float
    mean_sq_frobenius_other_hand: float
    reference: torch.Tensor | None = None

    @property
    def hand(self) -> str:
        """``"flipped"`` or ``"original"``."""
        return "flipped" if self.flip_hand else "original"


def _as_rotations(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim != 3 or t.shape[-2:] != (3, 3) or t.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, 3, 3) stack of rotations, got {tuple(t.shape)}")
    return t


def _mirror_conjugate(rotmat: torch.Tensor) -> torch.Tensor:
    """``M R M`` for M = diag(1, 1, −1): flip the sign of the entries that couple z with x or y."""
    m = MIRROR.to(device=rotmat.device, dtype=rotmat.dtype)
    return m @ rotmat @ m


def _procrustes(rot_pred: torch.Tensor, rot_gt: torch.Tensor) -> torch.Tensor:
    """The rotation G minimising Σ‖R_gt − R_pred G‖²_F (see the module docstring)."""
    s = (rot_pred.transpose(-1, -2) @ rot_gt).sum(0)
    u, _, vh = torch.linalg.svd(s)
    d = torch.ones(3, dtype=s.dtype, device=s.device)
    d[2] = torch.sign(torch.linalg.det(u @ vh))
    if d[2] == 0:  # degenerate only for S = 0; any rotation is then optimal
        d[2] = 1.0
    return u @ torch.diag(d) @ vh


def apply_alignment(rot_pred: torch.Tensor, rotation: torch.Tensor, flip_hand: bool) -> torch.Tensor:
    """Aligned rotations ``H R_pred H G`` (H = MIRROR if ``flip_hand`` else I), float64."""
    r = _as_rotations(rot_pred, "rot_pred")
    g = torch.as_tensor(rotation, dtype=torch.float64, device=r.device)
    return (_mirror_conjugate(r) if flip_hand else r) @ g


def _procrustes_modulo(src: torch.Tensor, rg: torch.Tensor, operators: torch.Tensor, candidates: int = 64,
                       iterations: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, each particle's nearest mate R_gt g) minimising Σ min_g ‖R_gt g − R_pred G‖²_F.

    A particle of a symmetric molecule may be posed at any of its mates, so no single least-squares
    fit applies: each of ``candidates`` particles proposes ``G = R_predᵀ R_gt g`` for every operator,
    the proposal with the smallest median distance to the nearest mates over all particles wins, and
    mates and least-squares G are then refined in turn until the mates stop changing."""
    from ..physics.symmetry import nearest_mates

    ops = operators.to(rg)
    pick = torch.randperm(len(src), generator=torch.Generator().manual_seed(0))[:candidates].to(src.device)
    proposals = (src[pick].transpose(-1, -2) @ rg[pick])[:, None] @ ops[None]  # (S, K, 3, 3)
    proposals = proposals.reshape(-1, 3, 3)
    sample = src[:4096] if len(src) > 4096 else src
    sample_mates = rg[:len(sample), None] @ ops[None]  # (S, K, 3, 3), the same for every proposal
    best, best_cost = proposals[0], math.inf
    for g in proposals:
        cost = float(((sample_mates - (sample @ g)[:, None]) ** 2).sum((-1, -2)).min(1).values.median())
        if cost < best_cost:
            best, best_cost = g, cost
    g, mates = best, nearest_mates(src @ best, rg, ops)
    for _ in range(iterations):
        g = _procrustes(src, mates)
        again = nearest_mates(src @ g, rg, ops)
        if torch.equal(again, mates):
            break
        mates = again
    return g, mates


def align_rotations(rot_pred, rot_gt, hands: str = "both", operators: torch.Tensor | None = None
                    ) -> RotationAlignment:
    """Fit the global rotation (and hand) that best maps predicted poses onto the ground truth.

    rot_pred, rot_gt : (N, 3, 3) rotations of the same particles (tensors or arrays, any float dtype).
    hands            : ``"both"`` (default: try the original and the mirrored hand, keep the better),
                       ``"original"`` or ``"flipped"`` to force one.
    operators        : (K, 3, 3) symmetry operators of the true map, in its frame
                       (:mod:`cryoace.physics.symmetry`): each particle is then compared with its
                       nearest symmetry mate ``R_gt g`` (the same image), and ``reference`` holds them.
    Least squares over all particles (chordal L2 mean, closed form by SVD; with symmetry, alternated
    with the choice of mates from the best of many single-particle proposals); computed in float64.
    """
    rp, rg = _as_rotations(rot_pred, "rot_pred"), _as_rotations(rot_gt, "rot_gt")
    if rp.shape != rg.shape:
        raise ValueError(f"rot_pred {tuple(rp.shape)} and rot_gt {tuple(rg.shape)} differ in shape")
    rg = rg.to(rp.device)
    if hands not in ("both", "original", "flipped"):
        raise ValueError(f"hands must be 'both', 'original' or 'flipped', got {hands!r}")
    symmetric = operators is not None and len(operators) > 1
    fits = {}
    for flip in (False, True):
        src = _mirror_conjugate(rp) if flip else rp
        if symmetric:
            g, reference = _procrustes_modulo(src, rg, torch.as_tensor(operators, dtype=torch.float64))
        else:
            g, reference = _procrustes(src, rg), rg
        aligned = src @ g
        err = float(((aligned - reference) ** 2).sum((-1, -2)).mean())
        fits[flip] = (g, aligned, err, reference)
    if hands == "both":
        flip = fits[True][2] < fits[False][2]
    else:
        flip = hands == "flipped"
    g, aligned, err, reference = fits[flip]
    return RotationAlignment(rotation=g, flip_hand=bool(flip), aligned=aligned, mean_sq_frobenius=err,
                             mean_sq_frobenius_other_hand=fits[not flip][2], reference=reference)


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------

def fourier_upsample(volume: torch.Tensor, factor: int) -> torch.Tensor:
    """Band-limited (trigonometric) interpolation of a real (L, L, L) volume onto a grid ``factor``
    times finer: voxel ``i`` of the input is voxel ``factor·i`` of the output (centre L//2 → factor·L//2),
    and the input samples are reproduced exactly."""
    size = volume.shape[-1]
    big = factor * size
    spec = fft3_centered(volume)
    padded = torch.zeros((big,) * 3, dtype=spec.dtype, device=spec.device)
    lo = big // 2 - size // 2
    padded[lo:lo + size, lo:lo + size, lo:lo + size] = spec
    # .real puts half of the unpaired Nyquist plane at ±0.5 (the Hermitian-symmetric completion)
    return ifft3_centered(padded).real * factor ** 3


def resample_volume(volume: torch.Tensor, matrix, oversample: int = 2, chunk_planes: int = 16
                    ) -> torch.Tensor:
    """``v'(r) = v(A r)`` for a (3, 3) matrix ``A`` (rotation or mirror) about the centre ``L//2``.

    volume     : real (L, L, L) map, (z, y, x); the result has the same shape, dtype and device.
    matrix     : ``A`` acting on (x, y, z) voxel coordinates from the centre.
    oversample : the map is first interpolated band-limitedly onto a grid this many times finer
                 (Fourier zero-padding), then sampled trilinearly with
                 :func:`cryoace.physics.slicing.sample_grid` — trilinear interpolation on the finer grid
                 attenuates high frequencies far less (memory: ``oversample³`` times the map).
                 1 = plain trilinear interpolation. Points that fall outside the box read 0.
    """
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise ValueError(f"volume must be a cubic (L, L, L) map, got {tuple(volume.shape)}")
    oversample = int(oversample)
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    size = volume.shape[-1]
    work = volume.to(torch.float64) if volume.dtype == torch.float64 else volume.to(torch.float32)
    fine = fourier_upsample(work, oversample) if oversample > 1 else work
    a = torch.as_tensor(matrix, dtype=work.dtype, device=work.device)
    offsets = torch.arange(size, device=work.device, dtype=work.dtype) - size // 2
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    out = torch.empty_like(work)
    for start in range(0, size, chunk_planes):
        z = offsets[start:start + chunk_planes]
        pts = torch.stack(torch.broadcast_tensors(x[None], y[None], z[:, None, None]), -1)
        src = pts @ a.T  # (A r) for each output voxel r
        out[start:start + len(z)] = sample_grid(fine, src * oversample + (oversample * size) // 2)
    return out.to(volume.dtype)


def transform_volume(volume: torch.Tensor, rotation, flip_hand: bool, oversample: int = 2) -> torch.Tensor:
    """Carry a predicted map into the truth's frame with the pose alignment: ``v_pred(H G r)``.

    ``rotation`` is :attr:`RotationAlignment.rotation` (``G``) and ``flip_hand`` its hand, so that
    projecting the result with the aligned poses equals projecting ``volume`` with the predicted ones
    (module docstring). See :func:`resample_volume` for ``oversample``.
    """
    g = torch.as_tensor(rotation, dtype=torch.float64)
    a = MIRROR @ g if flip_hand else g
    return resample_volume(volume, a, oversample=oversample)


def mirror_volume(volume: torch.Tensor) -> torch.Tensor:
    """The hand flip of a map on its own grid: ``v(x, y, −z)`` about the centre ``L//2`` (exact, no
    interpolation): plane ``z`` takes plane ``L − z``; plane 0, whose mirror lies outside the box,
    becomes 0."""
    out = torch.zeros_like(volume)
    out[1:] = torch.flip(volume[1:], dims=[0])  # index i ← L − i for i = 1 .. L−1
    return out


def shift_volume(volume: torch.Tensor, shift_px) -> torch.Tensor:
    """Translate a real (L, L, L) map by ``shift_px`` = (sx, sy, sz) voxels: ``v'(r) = v(r − s)``.

    Exact for whole voxels (a circular shift); sub-voxel shifts by the Fourier phase
    ``exp(−2πi k·s)`` (band-limited interpolation, periodic box).
    """
    s = torch.as_tensor(shift_px, dtype=torch.float64).reshape(3)
    work = volume.to(torch.float64)
    freq = freq_grid_3d(volume.shape[-1], device=volume.device, dtype=torch.float64)
    phase = -2 * math.pi * (freq * s.to(volume.device)).sum(-1)
    out = ifft3_centered(fft3_centered(work) * torch.polar(torch.ones_like(phase), phase)).real
    return out.to(volume.dtype)


def estimate_volume_offset(volume: torch.Tensor, reference: torch.Tensor, max_iter: int = 20
                           ) -> torch.Tensor:
    """The translation ``s`` (x, y, z voxels, float64) with ``volume(r) ≈ reference(r − s)``.

    The whole-voxel peak of the FFT cross-correlation ``cc(s) = Σ_r volume(r) reference(r − s)``,
    refined to sub-voxel precision by Newton steps on the band-limited correlation itself,
    ``cc(s) ∝ Σ_k Re[V̂(k) conj(R̂(k)) exp(2πi k·s)]``, whose gradient and Hessian are exact sums over
    the spectrum (a per-axis parabola is biased when the peak is anisotropic and tilted).
    ``shift_volume(volume, -s)`` then overlays the maps. Ab initio maps are defined up to such a
    global translation (their shifts absorb it), so it is removed before an FSC against the truth.
    """
    if volume.shape != reference.shape or volume.ndim != 3:
        raise ValueError(f"maps differ in shape: {tuple(volume.shape)} vs {tuple(reference.shape)}")
    size = volume.shape[-1]
    a, b = volume.to(torch.float64), reference.to(torch.float64).to(volume.device)
    cross = fft3_centered(a) * fft3_centered(b).conj()
    cc = ifft3_centered(cross).real  # lag 0 at index L//2
    flat = int(torch.argmax(cc))
    peak_zyx = [flat // (size * size), (flat // size) % size, flat % size]
    s = torch.tensor(peak_zyx[::-1], dtype=torch.float64, device=a.device) - size // 2
    k = freq_grid_3d(size, device=a.device, dtype=torch.float64).reshape(-1, 3)
    cross = cross.reshape(-1)
    two_pi = 2 * math.pi
    for _ in range(max_iter):
        phase = two_pi * (k @ s)
        q = cross * torch.polar(torch.ones_like(phase), phase)
        grad = -two_pi * (q.imag @ k)
        hess = torch.empty(3, 3, dtype=torch.float64, device=a.device)
        for i in range(3):  # entry by entry: no (L³, 3) temporaries
            for j in range(i, 3):
                hess[i, j] = hess[j, i] = -two_pi ** 2 * (q.real @ (k[:, i] * k[:, j]))
        if not bool((torch.linalg.eigvalsh(hess) < 0).all()):
            break  # not at a maximum's basin (flat or degenerate correlation): keep what we have
        step = -torch.linalg.solve(hess, grad)
        norm = float(step.norm())
        if norm > 0.5:
            step = step * (0.5 / norm)
        s = s + step
        if norm < 1e-8:
            break
    return s.cpu()
