"""ACE-EM's pose → image → pose (PIP) task: self-supervised pose labels for the encoder.

Random poses are drawn from the prior — Haar-uniform rotations, shifts either resampled from the
encoder's current predictions on the batch (the data's shift distribution as the model sees it) or
Gaussian of a configured σ (Å) — rendered through the current decoder and ``physics.forward`` with
the CTFs of randomly drawn particles (the batch's, shuffled), made noisy with white Gaussian noise,
and encoded; the loss is the mean squared Frobenius error of the rotation matrices plus the mean
squared shift error in pixels (ACE-EM eqs. 11–13).

**Noise.** σ is either measured once from the data — the standard deviation of the normalized images
outside a disc of radius 0.45·L, where a centred particle leaves only noise — or set per batch from a
target SNR in dB: σ² = mean clean-image variance / 10^(SNR/10) (the whole-box SNR of docs/conventions.md §1).

**Symmetric-loss ambiguity.** With the symmetric (or generalized symmetric) loss an image and its
180° in-plane rotation about L//2 are both valid encoder inputs, and the rotated one shows the
particle with pose (D·R, −t), D = diag(−1, −1, 1) (see :mod:`cryoace.train.losses`). Half of the PIP
images (drawn at random) are therefore rotated by 180° and get the correspondingly rotated target, so
that PIP teaches the encoder exactly the relation the IPI loss assumes.

**Band limit.** The clean images are rendered only inside the current loss band and the Nyquist
disc (``grid``, the trainer's :class:`~cryoace.physics.band.HalfDiscGrid`) and are zero outside it:
beyond the band the decoder has not been fitted, and its extrapolation there would teach the encoder
features the data do not have. (The added noise stays white, as in the data.)

**One encoder pass.** :func:`pip_render` and :func:`pip_pose_loss` split the task around the encoder
so that a trainer can encode the PIP images in the same pass as the real images (one BatchNorm batch:
the running statistics used at prediction time are not updated by synthetic images alone);
:func:`pip_loss` does all three for one batch.

**Frozen decoder** (the paper's default): the render runs under ``torch.no_grad``, so the PIP loss
cannot change the decoder at all; unfrozen, its gradient flows into the decoder too.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..physics.band import HalfDiscGrid
from ..physics.forward import render_images, render_spectra
from ..physics.rotations import random_rotmat
from ..types import CTFParams, Pose, map_tensors
from .losses import ROT_Z_PI, rotate_180, rotation_hypotheses

__all__ = ["PIPBatch", "PIPOutput", "auto_pip_weight", "background_noise_std", "estimate_snr_db", "pip_loss",
           "pip_pose_loss", "pip_render", "pip_weight", "shuffled_ctf"]


@dataclasses.dataclass
class PIPOutput:
    """One PIP pass: ``loss`` = ``rotation`` + ``shift`` (scalars); ``images`` the noisy inputs."""

    loss: torch.Tensor
    rotation: torch.Tensor  # mean ‖R_pred − R‖²_F
    shift: torch.Tensor     # mean ‖t_pred − t‖² in px²
    images: torch.Tensor


def background_noise_std(images: torch.Tensor, radius_fraction: float = 0.45) -> float:
    """Noise σ of images (B, L, L): the standard deviation of the pixels outside a centred disc of
    ``radius_fraction``·L (the corners, where a centred particle contributes nothing)."""
    size = images.shape[-1]
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    corners = images[..., r2 > (radius_fraction * size) ** 2]
    return float(corners.double().std()) if corners.numel() > 1 else 0.0


#: ACE-EM's PIP weights (§4.1): 0.9 on noise-free (200 dB) data, 0.05–0.09 at −10 dB
PIP_WEIGHT_CLEAN, PIP_WEIGHT_NOISY = 0.9, 0.07
#: the SNRs (dB, whole box) between which :func:`auto_pip_weight` interpolates
PIP_SNR_NOISY_DB, PIP_SNR_CLEAN_DB = -10.0, 10.0


def auto_pip_weight(snr_db: float) -> float:
    """λ of the PIP loss for data of ``snr_db`` (whole-box SNR): ACE-EM's 0.9 at ≥ +10 dB (noise-free
    in practice) and 0.07 at ≤ −10 dB, log-linear in between (where ACE-EM gives no value). Noisier
    data get less PIP because the decoder — and so the PIP images — are less reliable there."""
    frac = (float(snr_db) - PIP_SNR_NOISY_DB) / (PIP_SNR_CLEAN_DB - PIP_SNR_NOISY_DB)
    frac = min(1.0, max(0.0, frac)) if math.isfinite(frac) else (1.0 if snr_db > 0 else 0.0)
    return math.exp(math.log(PIP_WEIGHT_NOISY) + frac * (math.log(PIP_WEIGHT_CLEAN) - math.log(PIP_WEIGHT_NOISY)))


def estimate_snr_db(images: torch.Tensor, radius_fraction: float = 0.45) -> float:
    """Whole-box SNR (dB) of images (B, L, L): (pixel variance − σ²) / σ², σ from the background
    (:func:`background_noise_std`); +inf for noise-free images."""
    sigma2 = background_noise_std(images, radius_fraction) ** 2
    signal = float(images.double().var()) - sigma2
    if sigma2 <= 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-12 * sigma2) / sigma2)


def pip_weight(step: int, weight: float, warmup_steps: int, mode: str) -> float:
    """λ of the PIP loss at ``step``: 0 during the IPI-only warm-up, then ``weight`` every step
    (``joint``) or, with ``alternate``, on odd steps only (even steps are IPI-only, odd PIP-only)."""
    if step < warmup_steps or weight <= 0:
        return 0.0
    if mode == "alternate":
        return weight if (step - warmup_steps) % 2 == 1 else 0.0
    return weight


@dataclasses.dataclass
class PIPBatch:
    """PIP inputs: noisy rendered ``images`` (B, L, L) and the poses they show (the targets)."""

    images: torch.Tensor
    rotmat: torch.Tensor       # (B, 3, 3)
    shift_angst: torch.Tensor  # (B, 2)


def pip_render(decoder, ctf: CTFParams | None, pixel_size: torch.Tensor, size: int,
               noise_std: float | None = None, snr_db: float | None = None, shift_sigma_angst: float | None = None,
               shift_pool_angst: torch.Tensor | None = None, freeze_decoder: bool = True,
               symmetric: bool = True, pose: Pose | None = None, grid: HalfDiscGrid | None = None,
               full_grid: bool = False) -> PIPBatch:
    """B random poses (B = len(pixel_size)) rendered through ``decoder`` inside ``grid``'s band, made
    noisy; arguments as in :func:`pip_loss`. ``full_grid`` renders the whole L×L grid instead (corners
    beyond Nyquist included; the behaviour before issue 14, kept for ablations)."""
    batch = pixel_size.shape[0]
    device = pixel_size.device
    dtype = pixel_size.dtype
    rotmat = random_rotmat(batch, dtype=dtype, device=device)
    if pose is not None:
        rotmat, shift = pose.rotmat.to(dtype), pose.shift_angst.to(dtype)
    elif shift_sigma_angst is not None:
        shift = torch.randn(batch, 2, dtype=dtype, device=device) * float(shift_sigma_angst)
    elif shift_pool_angst is not None and shift_pool_angst.shape[0] > 0:
        pick = torch.randint(shift_pool_angst.shape[0], (batch,), device=device)
        shift = shift_pool_angst.detach().to(device=device, dtype=dtype)[pick]
    else:
        shift = torch.zeros(batch, 2, dtype=dtype, device=device)

    if grid is None:
        grid = HalfDiscGrid(size, device=device, dtype=dtype)  # the Nyquist disc
    with torch.no_grad() if freeze_decoder else torch.enable_grad():
        if full_grid:
            clean = render_images(decoder, Pose(rotmat, shift), pixel_size, size, ctf)
        else:
            spectra = render_spectra(decoder, Pose(rotmat, shift), pixel_size, size, ctf,
                                     freq_cyc_px=grid.freq.to(dtype))
            clean = grid.images(spectra).to(dtype)
    if snr_db is not None:
        signal_var = clean.detach().flatten(1).var(dim=1).mean()
        sigma = torch.sqrt(signal_var / 10.0 ** (float(snr_db) / 10.0))
    else:
        sigma = float(noise_std or 0.0)
    images = clean + sigma * torch.randn_like(clean)

    if symmetric:
        turn = torch.rand(batch, device=device) < 0.5
        images = torch.where(turn[:, None, None], rotate_180(images), images)
        d = torch.tensor(ROT_Z_PI, dtype=dtype, device=device)
        rotmat = torch.where(turn[:, None, None], rotmat * d[:, None], rotmat)
        shift = torch.where(turn[:, None], -shift, shift)
    return PIPBatch(images=images, rotmat=rotmat, shift_angst=shift)


def pip_pose_loss(pred: Pose, target: PIPBatch, pixel_size: torch.Tensor) -> PIPOutput:
    """ACE-EM's PIP loss of the encoder's predictions ``pred`` for ``target.images``: mean squared
    Frobenius error of the rotations plus mean squared shift error in px. With a multi-head encoder
    (``pred.rotmat`` (B, K, 3, 3)) each image's rotation error is that of its closest hypothesis
    (winner takes all, as in the image loss)."""
    dtype = target.rotmat.dtype
    hypotheses = rotation_hypotheses(pred.rotmat).to(dtype)  # (B, K, 3, 3); K = 1 for one head
    rotation = (hypotheses - target.rotmat[:, None]).pow(2).sum((-2, -1)).min(-1).values.mean()
    shift_px = (pred.shift_angst.to(dtype) - target.shift_angst) / pixel_size[:, None]
    shift_err = shift_px.pow(2).sum(-1).mean()
    return PIPOutput(loss=rotation + shift_err, rotation=rotation, shift=shift_err, images=target.images.detach())


def pip_loss(encoder: torch.nn.Module, decoder, ctf: CTFParams | None, pixel_size: torch.Tensor, size: int,
             noise_std: float | None = None, snr_db: float | None = None, shift_sigma_angst: float | None = None,
             shift_pool_angst: torch.Tensor | None = None, freeze_decoder: bool = True,
             symmetric: bool = True, pose: Pose | None = None, grid: HalfDiscGrid | None = None) -> PIPOutput:
    """The PIP loss for one batch of B random poses (B = len(pixel_size)).

    ctf               : CTFs (B,) of randomly drawn particles, or None (no CTF).
    pixel_size        : (B,) Å/px.
    noise_std         : σ of the added white noise in normalized image units (from the background);
    snr_db            : ... or the target SNR in dB (overrides ``noise_std``); neither = noise-free.
    shift_sigma_angst : σ (Å) of Gaussian random shifts; otherwise shifts are resampled (with
                        replacement) from ``shift_pool_angst`` (P, 2) — e.g. the encoder's shifts on
                        the batch — and are zero if neither is given.
    symmetric         : rotate a random half of the inputs by 180° with target (D·R, −t).
    pose              : the poses to render (B) instead of random ones (for tests and replays).
    grid              : the band the images are rendered in (None = the whole Nyquist disc).
    """
    target = pip_render(decoder, ctf, pixel_size, size, noise_std=noise_std, snr_db=snr_db,
                        shift_sigma_angst=shift_sigma_angst, shift_pool_angst=shift_pool_angst,
                        freeze_decoder=freeze_decoder, symmetric=symmetric, pose=pose, grid=grid)
    return pip_pose_loss(encoder(target.images), target, pixel_size)


def shuffled_ctf(ctf: CTFParams | None, device) -> CTFParams | None:
    """The batch's CTFs in a random order: the CTFs of randomly drawn particles of the dataset."""
    if ctf is None:
        return None
    n = ctf.defocus_u.shape[0]
    perm = torch.randperm(n, device=device)
    return map_tensors(ctf, lambda t: t[perm] if t.dim() > 0 and t.shape[0] == n else t)
