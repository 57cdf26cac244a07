"""The training loss: predicted vs observed spectra, plain L2 or cryoAI's symmetric loss.

**Where the error is measured.** In Fourier space, on the half spectrum of :func:`rfft2_centered`
(columns kx = 0 … 0.5, rows ky centred), only at frequencies inside the Nyquist disc |k| ≤ 0.5
cycles/px (:class:`HalfDiscGrid`). The decoder is evaluated only there (half the points of a full
slice, minus the corners), and the squared error of each point is weighted by
:func:`~cryoace.physics.fourier.half_grid_weights` (1 on the self-mirror columns kx = 0 and 0.5, 2
elsewhere), so the sum equals the full-disc sum for real images. The per-image error is divided by
L⁴: with the unnormalized FFT (Parseval: Σ|Ŷ|² = L²·Σ y²) it is then the mean squared real-space
pixel error of the disc-band-limited images, e.g. about 1 for a unit-variance image predicted as 0.

**Symmetric loss (cryoAI eq. 10).** The encoder also sees each image rotated in-plane by 180° about
the box centre L//2 (:func:`rotate_180`: ``rotated[i, j] = image[(L−i) mod L, (L−j) mod L]``, i.e.
``y(−x)`` in centred coordinates — *not* ``flip``, which turns about (L−1)/2). Its centred spectrum
is exactly ``conj(Ŷ)``. Both paths are rendered through :func:`cryoace.physics.forward.render_spectra`
and compared with their own target (Ŷ and conj Ŷ); per image the smaller error is kept.

**The pose of the rotated path in the original frame.** With D = diag(−1, −1, 1) (= Rz(π), a proper
rotation), if the encoder gives (R₂, t₂) for the rotated image then the original image has pose
``R = D·R₂, t = −t₂`` (:func:`unrotate_pose`). Proof: the model's spectrum is
Ŷ(k) = C(k)·e^{2πi k·t}·V̂(Rᵀk); the rotated image has spectrum Ŷ(−k) = C(k)·e^{2πi k·(−t)}·V̂(Rᵀ(−k))
(the CTF is even), and −k = D·k for in-plane k, so Rᵀ(−k) = (D·R)ᵀk: the rotated image is the
particle seen with pose (D·R, −t); D² = 1 inverts the map. So the *winner's* pose, mapped to the
original frame, is the prediction (:attr:`LossOutput.pose`).

**Generalized symmetric loss (ACE-EM, ``gsym``).** The two exact paths above plus ``n_random`` views
of each image turned in-plane by a random angle θ about L//2 (bilinear interpolation) and, with
probability ½, mirrored (x → −x first): the view is ``y'(p) = y(g⁻¹p)`` with ``g = R_θ·F``. Each view
is encoded, rendered and compared with *its own* spectrum; per image the smallest error is kept. A
pure rotation maps back exactly: the view shows the particle with pose ``(Rz(θ)·R, R_θ·t)`` (the
same argument as for D above), so ``R = Rz(θ)ᵀ·R'``, ``t = R_θᵀ·t'``. A mirrored view is the mirror
image of the particle, which no pose of the same map produces; such views compete in the loss (the
map may pick its hand) but the reported pose is that of the best *unmirrored* view.

**Several hypotheses per image (cryoSPIN).** A multi-head encoder gives K rotations per view
(``rotmat`` (B, K, 3, 3), one shift). Every (view, head) pair is rendered and compared; the smallest
error is the loss ("winner takes all": only the best-fitting hypothesis receives the image's
gradient), and the winning pair's pose, mapped to the original frame as above, is the prediction.

**Warm-up labels (ACE-EM).** ``target_lowpass_sigma_px`` multiplies the observed spectra by the
transfer function ``exp(−2π²σ²|k|²)`` of a Gaussian of σ px — the encoder's filter bank, applied
exactly in Fourier space — so the first iterations fit a blurred target; the encoder still sees the
raw images.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..defaults import LOSSES
from ..physics.band import HalfDiscGrid
from ..physics.forward import render_spectra
from ..physics.rotations import axis_angle_to_rotmat
from ..types import CTFParams, Pose, map_tensors

__all__ = ["LOSSES", "HalfDiscGrid", "LossOutput", "compute_loss", "rotate_180", "unrotate_pose",
           "ROT_Z_PI", "rotate_mirror_images", "rotated_view_pose", "rotation_hypotheses"]


#: D = Rz(π) = diag(−1, −1, 1): the 3D rotation of an in-plane half turn.
ROT_Z_PI = (-1.0, -1.0, 1.0)


def rotation_hypotheses(rotmat: torch.Tensor) -> torch.Tensor:
    """An encoder's rotations as (B, K, 3, 3) hypotheses per image: a one-head encoder's (B, 3, 3)
    become K = 1, a multi-head encoder's are already so."""
    return rotmat if rotmat.ndim == 4 else rotmat[:, None]


def rotate_180(images: torch.Tensor) -> torch.Tensor:
    """In-plane rotation by 180° about the box centre L//2 of images (..., L, L) (even L).

    ``out[i, j] = images[(L − i) mod L, (L − j) mod L]``: a pixel at offset x from the centre moves to
    −x; the centre pixel stays put. (A plain ``flip`` would turn about (L−1)/2, a one-pixel error.)
    """
    return torch.roll(torch.flip(images, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


def unrotate_pose(pose: Pose) -> Pose:
    """The pose in the original frame of an image whose 180°-rotated copy has ``pose``: (D·R, −t)."""
    d = torch.tensor(ROT_Z_PI, dtype=pose.rotmat.dtype, device=pose.rotmat.device)
    return Pose(rotmat=pose.rotmat * d[:, None], shift_angst=-pose.shift_angst)


def _inplane(angle: torch.Tensor) -> torch.Tensor:
    """2×2 rotation matrices (B, 2, 2) acting on (x, y) for angles (B,) in radians."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def rotate_mirror_images(images: torch.Tensor, angle: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """Images (B, L, L) turned in-plane by ``angle`` (B,) radians about L//2, after an x → −x mirror
    where ``mirror`` (B,) is True: ``out(p) = images(g⁻¹p)``, ``g = R_θ·F`` (bilinear, zeros outside)."""
    size = images.shape[-1]
    dtype, device = images.dtype, images.device
    offsets = torch.arange(size, dtype=dtype, device=device) - size // 2
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    p = torch.stack([xx, yy], -1).reshape(1, -1, 2)  # (1, L², 2) (x, y) offsets from the centre
    src = p @ _inplane(angle.to(dtype))  # g⁻¹p = Fᵀ R_θᵀ p: first undo the rotation ...
    sign = torch.where(mirror, -1.0, 1.0).to(dtype)
    src = torch.stack([src[..., 0] * sign[:, None], src[..., 1]], -1)  # ... then the mirror
    grid = (2 * (src + size // 2) + 1) / size - 1  # pixel centres, align_corners=False
    out = F.grid_sample(images[:, None], grid.reshape(-1, size, size, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out[:, 0]


def rotated_view_pose(pose: Pose, angle: torch.Tensor) -> Pose:
    """The pose in the original frame of an image whose view turned by ``angle`` (B,) has ``pose``:
    ``(Rz(θ)ᵀ·R', R_θᵀ·t')`` (module docstring)."""
    zeros = torch.zeros_like(angle)
    rz = axis_angle_to_rotmat(torch.stack([zeros, zeros, angle], -1)).to(pose.rotmat.dtype)
    r2 = _inplane(angle).to(pose.shift_angst.dtype)
    return Pose(rotmat=rz.transpose(-1, -2) @ pose.rotmat,
                shift_angst=(r2.transpose(-1, -2) @ pose.shift_angst[..., None])[..., 0])


@dataclasses.dataclass
class LossOutput:
    """One forward pass.

    loss        : scalar, the mean over the batch of ``error``.
    error       : (B,) the kept (smaller) per-image error.
    pose        : the predicted pose of each image in its original frame (winner of the two paths).
    rotated_won : (B,) bool, True where the 180°-rotated path had the smaller error (all False with l2).
    predicted_power, observed_power : (B,) band power (:meth:`HalfDiscGrid.power`) of the kept
                  prediction and of the image (detached): how far the decoder's amplitude is from the data's.
    extra_pose  : the encoder's poses of ``extra_images`` (encoded in the same pass), or None.
    head        : (B,) which of a multi-head encoder's rotation hypotheses gave :attr:`pose` (all 0 with one).
    """

    loss: torch.Tensor
    error: torch.Tensor
    pose: Pose
    rotated_won: torch.Tensor
    predicted_power: torch.Tensor | None = None
    observed_power: torch.Tensor | None = None
    extra_pose: Pose | None = None
    head: torch.Tensor | None = None


def compute_loss(encoder: torch.nn.Module, decoder, images: torch.Tensor, pixel_size: torch.Tensor,
                 grid: HalfDiscGrid, ctf: CTFParams | None = None, loss: str = "symmetric",
                 target_lowpass_sigma_px: float | None = None, n_random: int = 2,
                 extra_images: torch.Tensor | None = None) -> LossOutput:
    """Encode, render and compare one batch (the whole model's forward pass).

    images     : (B, L, L) real images as the encoder and the loss see them (normalized).
    pixel_size : (B,) Å/px of these images (converts the predicted shift in Å and the CTF).
    ctf        : CTF parameters (B,) or None for images without CTF.
    loss       : ``symmetric`` (cryoAI), ``l2`` (direct path only) or ``gsym`` (ACE-EM: the two
                 symmetric paths plus ``n_random`` randomly turned/mirrored views drawn from the
                 global torch RNG); see the module docstring.
    target_lowpass_sigma_px : warm-up labels — Gaussian low-pass of the targets (None = raw).
    extra_images : more images (E, L, L) encoded in the same encoder call (one BatchNorm batch with
                 the real ones, e.g. the PIP images); their poses are :attr:`LossOutput.extra_pose`.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    target = grid.target(images, target_lowpass_sigma_px)
    batch = images.shape[0]
    observed_power = grid.power(target.detach())
    views, targets = [images], [target]
    if loss != "l2":  # the 180° path; conj: the exact spectrum of the rotated image
        views.append(rotate_180(images))
        targets.append(target.conj())
    angles, mirrors = [], []
    for _ in range(n_random if loss == "gsym" else 0):
        angle = torch.rand(batch, device=images.device, dtype=images.dtype) * (2 * math.pi)
        mirror = torch.rand(batch, device=images.device) < 0.5
        view = rotate_mirror_images(images, angle, mirror)
        views.append(view)
        targets.append(grid.target(view, target_lowpass_sigma_px))
        angles.append(angle)
        mirrors.append(mirror)
    n_views = len(views)
    poses, extra_pose = _encode(encoder, views, extra_images)
    # every (view, head) pair is a candidate, laid out (view, head, image): a one-head encoder has
    # rotmat (V·B, 3, 3), a multi-head one (V·B, K, 3, 3) with one shift per image
    rotmat = rotation_hypotheses(poses.rotmat)
    heads = rotmat.shape[1]
    rotmat = rotmat.reshape(n_views, batch, heads, 3, 3).transpose(1, 2).reshape(-1, 3, 3)
    shift = poses.shift_angst.reshape(n_views, 1, batch, 2).expand(n_views, heads, batch, 2).reshape(-1, 2)
    n_candidates = n_views * heads
    pred = render_spectra(decoder, Pose(rotmat=rotmat, shift_angst=shift), pixel_size.repeat(n_candidates),
                          grid.size, _repeat(ctf, n_candidates), freq_cyc_px=grid.freq)
    view_targets = torch.stack(targets)  # (V, B, points)
    candidate_targets = view_targets[:, None].expand(n_views, heads, *view_targets.shape[1:]).flatten(0, 2)
    errors = grid.error(pred, candidate_targets).reshape(n_candidates, batch)
    error, best = errors.min(0)

    # candidate poses in the original frame; mirrored views cannot be mapped back to a pose
    per_view = [Pose(rotmat=rotmat[v * heads * batch:(v + 1) * heads * batch],
                     shift_angst=shift[v * heads * batch:(v + 1) * heads * batch]) for v in range(n_views)]
    candidates = per_view[:1]
    if n_views > 1:
        candidates.append(unrotate_pose(per_view[1]))
    candidates += [rotated_view_pose(per_view[2 + j], angles[j].repeat(heads)) for j in range(len(angles))]
    pose_errors = errors.reshape(n_views, heads, batch).clone()
    for j, mirror in enumerate(mirrors):
        pose_errors[2 + j] = torch.where(mirror, torch.full_like(pose_errors[2 + j], math.inf), pose_errors[2 + j])
    pick = pose_errors.reshape(n_candidates, batch).argmin(0)
    rows = pick * batch + torch.arange(batch, device=images.device)
    rotmat = torch.cat([c.rotmat for c in candidates])[rows]
    shift = torch.cat([c.shift_angst for c in candidates])[rows]
    predicted_power = grid.power(pred.detach())[best * batch + torch.arange(batch, device=images.device)]
    return LossOutput(loss=error.mean(), error=error, pose=Pose(rotmat=rotmat, shift_angst=shift),
                      rotated_won=best // heads != 0, predicted_power=predicted_power, observed_power=observed_power,
                      extra_pose=extra_pose, head=pick % heads)


def _encode(encoder, views: list[torch.Tensor], extra: torch.Tensor | None) -> tuple[Pose, Pose | None]:
    """One encoder call on the concatenated views (and ``extra`` images after them): their poses, and
    those of ``extra`` (None without)."""
    if extra is None:
        return encoder(torch.cat(views)), None
    n = sum(v.shape[0] for v in views)
    poses = encoder(torch.cat([*views, extra.to(views[0].dtype)]))
    head = Pose(rotmat=poses.rotmat[:n], shift_angst=poses.shift_angst[:n])
    return head, Pose(rotmat=poses.rotmat[n:], shift_angst=poses.shift_angst[n:])


def _repeat(obj, times: int):
    return map_tensors(obj, lambda t: torch.cat([t] * times)) if obj is not None else None
