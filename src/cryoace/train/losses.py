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
"""

from __future__ import annotations

import dataclasses

import torch

from ..physics.forward import render_spectra
from ..physics.fourier import freq_grid_2d_half, half_grid_weights, rfft2_centered
from ..types import CTFParams, Pose, map_tensors

__all__ = ["LOSSES", "HalfDiscGrid", "LossOutput", "compute_loss", "rotate_180", "unrotate_pose",
           "ROT_Z_PI"]

#: the loss names of ``--loss``
LOSSES = ("symmetric", "l2")

#: D = Rz(π) = diag(−1, −1, 1): the 3D rotation of an in-plane half turn.
ROT_Z_PI = (-1.0, -1.0, 1.0)


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


class HalfDiscGrid:
    """The frequencies where the loss is measured: the half spectrum inside the Nyquist disc (or a
    smaller disc of ``radius_cyc_px``, for a coarse-to-fine band schedule).

    size      : image box L.
    freq      : (Q, 2) (kx, ky) cycles/px of the kept points, in the flattened rfft2_centered order.
    index     : (Q,) positions of those points in the flattened (L·(L//2+1)) half spectrum.
    weights   : (Q,) half-grid weights (1 or 2) divided by L⁴ (see the module docstring).
    """

    def __init__(self, size: int, device=None, dtype: torch.dtype = torch.float32, radius_cyc_px: float = 0.5):
        self.size = int(size)
        self.radius_cyc_px = float(radius_cyc_px)
        freq = freq_grid_2d_half(self.size, device=device, dtype=torch.float64)
        inside = ((freq * freq).sum(-1) <= min(self.radius_cyc_px, 0.5) ** 2).reshape(-1)
        self.index = torch.nonzero(inside).squeeze(1)
        self.freq = freq.reshape(-1, 2)[self.index].to(dtype)
        columns = half_grid_weights(self.size, device=device, dtype=torch.float64)
        weights = columns.expand(self.size, -1).reshape(-1)[self.index]
        self.weights = (weights / float(self.size) ** 4).to(dtype)

    def to(self, device) -> "HalfDiscGrid":
        out = object.__new__(HalfDiscGrid)
        out.size, out.radius_cyc_px = self.size, self.radius_cyc_px
        out.index, out.freq, out.weights = (t.to(device) for t in (self.index, self.freq, self.weights))
        return out

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The observed spectra (B, Q) of real images (B, L, L) at the grid's points."""
        half = rfft2_centered(images)
        return half.reshape(*half.shape[:-2], -1)[..., self.index]

    def error(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per image (B,) ≈ mean squared real-space pixel error."""
        diff = predicted - target
        return ((diff.real ** 2 + diff.imag ** 2) * self.weights).sum(-1)


@dataclasses.dataclass
class LossOutput:
    """One forward pass.

    loss        : scalar, the mean over the batch of ``error``.
    error       : (B,) the kept (smaller) per-image error.
    pose        : the predicted pose of each image in its original frame (winner of the two paths).
    rotated_won : (B,) bool, True where the 180°-rotated path had the smaller error (all False with l2).
    """

    loss: torch.Tensor
    error: torch.Tensor
    pose: Pose
    rotated_won: torch.Tensor


def _repeat2(obj):
    return map_tensors(obj, lambda t: torch.cat([t, t])) if obj is not None else None


def compute_loss(encoder: torch.nn.Module, decoder, images: torch.Tensor, pixel_size: torch.Tensor,
                 grid: HalfDiscGrid, ctf: CTFParams | None = None, symmetric: bool = True) -> LossOutput:
    """Encode, render and compare one batch (the whole model's forward pass).

    images     : (B, L, L) real images as the encoder and the loss see them (normalized).
    pixel_size : (B,) Å/px of these images (converts the predicted shift in Å and the CTF).
    ctf        : CTF parameters (B,) or None for images without CTF.
    symmetric  : cryoAI's symmetric loss (module docstring); False = plain L2 of the direct path.
    """
    target = grid.target(images)
    batch = images.shape[0]
    if symmetric:
        pose2 = encoder(torch.cat([images, rotate_180(images)]))
        pred = render_spectra(decoder, pose2, torch.cat([pixel_size, pixel_size]), grid.size,
                              _repeat2(ctf), freq_cyc_px=grid.freq)
        # the rotated image's spectrum is exactly conj(Ŷ) at every point of the centred grid
        errors = grid.error(pred, torch.cat([target, target.conj()]))
        err_direct, err_rotated = errors[:batch], errors[batch:]
        rotated_won = err_rotated < err_direct
        error = torch.where(rotated_won, err_rotated, err_direct)
        direct, rotated = pose2[:batch], unrotate_pose(pose2[batch:])
        pose = Pose(rotmat=torch.where(rotated_won[:, None, None], rotated.rotmat, direct.rotmat),
                    shift_angst=torch.where(rotated_won[:, None], rotated.shift_angst, direct.shift_angst))
    else:
        pose = encoder(images)
        pred = render_spectra(decoder, pose, pixel_size, grid.size, ctf, freq_cyc_px=grid.freq)
        error = grid.error(pred, target)
        rotated_won = torch.zeros(batch, dtype=torch.bool, device=images.device)
    return LossOutput(loss=error.mean(), error=error, pose=pose, rotated_won=rotated_won)
