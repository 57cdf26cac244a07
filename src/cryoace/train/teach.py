"""Teach a pose encoder from a known map: poses in one forward pass, learned without any search.

Once a map is right (the refinement's), the pose of any particle of that molecule is what makes the
map's projection match it, and the map can render as many labelled examples as training needs. This is
ACE-EM's pose → image → pose task with the map as a frozen decoder: random poses (Haar-uniform
rotations, shifts drawn from the particles' own) → the map's projections with the CTFs of randomly
drawn particles, band-limited → white noise of the data's background level → the encoder → the mean
squared Frobenius error of the rotations plus the squared shift error (:mod:`cryoace.train.pip`).
The labels are exact, so unlike the self-supervised image loss there is nothing to collapse onto.

**cryoAI's image loss on the particles themselves.** The renders are the map's, not the data's: the
particles add what the map lacks (its errors, the data's own shifts and noise). With ``image_weight``
> 0 each step also encodes ``image_batch_size`` real particles (drawn from ``rows``: every particle by
default), renders the map at the poses the encoder gives them, with their CTFs, and scores the fit by
the normalized cross-correlation inside the encoder's band (``1 − ρ``: scale-free, so neither the
map's amplitude nor the noise level sets its weight). Its gradient reaches the encoder through the
render (cryoAI's path, with the decoder frozen). Real and synthetic images go through the encoder in
one pass, so its BatchNorm statistics — used at prediction time — are those of both.

For speed the images (synthetic and real alike) are Fourier-cropped to ``image_size`` (32 px by
default) before the encoder: poses good enough to start a local search are a low-resolution matter,
and a 32-px encoder costs a fraction of a 64-px one. Training has a fixed budget (steps, or wall
time), not a number of passes over the particles: its cost does not grow with N. The encoder then
predicts in the map's own frame, so its poses compare directly with those of the refinement that
made the map (:func:`pose_agreement`).

Measured on the −10 dB demo (2000 particles, 2-core CPU shared with other jobs, the refinement's
map; bench/teach_encoder.py): a median error of 20.7° on held-out particles after 10 minutes and
16.2° after 20, still falling.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..models.encoder import PoseEncoder
from ..physics.band import HalfDiscGrid
from ..physics.forward import VoxelFourierVolume, render_spectra
from ..physics.fourier import fourier_crop
from ..physics.rotations import geodesic_angle
from ..types import Pose
from .pip import background_noise_std, pip_pose_loss, pip_render

__all__ = ["TeachSettings", "TeachRecord", "TaughtEncoder", "teach_encoder", "pose_agreement",
           "load_taught_encoder", "image_misfit"]


@dataclasses.dataclass
class TeachSettings:
    """The teaching schedule.

    steps          : optimizer steps (fewer if ``max_time_s`` runs out first).
    max_time_s     : wall-time budget (s; None = all steps). The learning rate decays over whichever
                     budget is shorter.
    batch_size     : synthetic images per step.
    learning_rate  : Adam's, decayed by a cosine to ``final_lr_fraction`` of it.
    image_size     : the encoder's input (px): images are Fourier-cropped to it (at most the box).
    width          : channels of the encoder's first block (then 2×, 4×, 4×).
    check_every    : steps between measurements of :func:`pose_agreement` on the check particles.
    seed           : of the poses, noise and particle draws.
    image_weight   : weight of the image loss on real particles (module docstring; 0 = PIP only).
    image_batch_size : real particles per step for the image loss.
    """

    steps: int = 6000
    max_time_s: float | None = None
    batch_size: int = 64
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05
    image_size: int = 32
    width: int = 32
    check_every: int = 250
    seed: int = 0
    image_weight: float = 0.0
    image_batch_size: int = 32


@dataclasses.dataclass
class TeachRecord:
    """One measurement: the step, the mean training losses since the last one (‖ΔR‖²_F, px² and the
    image loss 1 − ρ, None when off), the wall time (s), and the median angle (°) and fraction within
    15° of the check particles' predicted poses from their reference poses (None without check particles)."""

    step: int
    rotation_loss: float
    shift_loss_px2: float
    elapsed_s: float
    median_deg: float | None = None
    within_15deg: float | None = None
    image_loss: float | None = None


class TaughtEncoder:
    """A pose encoder taught from a map: :meth:`predict` on images of the full box (B, L, L)."""

    def __init__(self, source_size: int, pixel_size: float, image_size: int = 32, width: int = 32):
        if not 8 <= image_size <= source_size or image_size % 2:
            raise ValueError(f"image_size must be even, at least 8 and at most the box ({source_size}), "
                             f"got {image_size}")
        self.source_size, self.pixel_size = int(source_size), float(pixel_size)
        self.image_size, self.width = int(image_size), int(width)
        # a shallower trunk than the networks' encoder: the input is small and the labels exact; channels
        # last: the same numbers, ~1.3× faster training steps on the CPU (oneDNN's preferred layout)
        self.encoder = PoseEncoder(self.image_size, self.pixel_size * self.source_size / self.image_size,
                                   channels=(width, 2 * width, 4 * width, 4 * width), convs_per_block=(1, 2, 2, 2),
                                   channels_last=True).to(memory_format=torch.channels_last)
        self.history: list[TeachRecord] = []

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """Full-box images → the encoder's input size (Fourier crop)."""
        return fourier_crop(images, self.image_size) if self.image_size < images.shape[-1] else images

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> Pose:
        """Poses (float64) of full-box images (B, L, L) in the frame of the map it was taught from."""
        was = self.encoder.training
        self.encoder.eval()
        try:
            poses = [self.encoder(self.crop(images[at:at + batch_size])) for at in range(0, len(images), batch_size)]
        finally:
            self.encoder.train(was)
        return Pose(rotmat=torch.cat([p.rotmat for p in poses]).double(),
                    shift_angst=torch.cat([p.shift_angst for p in poses]).double())

    def predict_particles(self, dataset, batch_size: int = 256, device: torch.device | str = "cpu") -> Pose:
        """Poses (float64, CPU) of every particle of ``dataset`` (its box must be the map's), in table order."""
        if int(dataset.image_size) != self.source_size:
            raise ValueError(f"the encoder was taught on {self.source_size}-px images, these are "
                             f"{dataset.image_size} px")
        self.encoder.to(device)
        rotmat = torch.empty(len(dataset), 3, 3, dtype=torch.float64)
        shift = torch.empty(len(dataset), 2, dtype=torch.float64)
        for batch in dataset.batches(batch_size):
            pose = self.predict(batch.images.to(device), batch_size)
            rotmat[batch.index], shift[batch.index] = pose.rotmat.cpu(), pose.shift_angst.cpu()
        return Pose(rotmat=rotmat, shift_angst=shift)

    def state(self) -> dict[str, Any]:
        """A checkpoint: the constructor's arguments, the weights and the history."""
        return {"kind": "taught_encoder", "source_size": self.source_size, "pixel_size": self.pixel_size,
                "image_size": self.image_size, "width": self.width, "encoder": self.encoder.state_dict(),
                "history": [dataclasses.asdict(r) for r in self.history]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TaughtEncoder:
        """Inverse of :meth:`state` (KeyError / ValueError / RuntimeError on a malformed one)."""
        if state.get("kind") != "taught_encoder":
            raise ValueError("not a taught-encoder checkpoint")
        taught = cls(state["source_size"], state["pixel_size"], state["image_size"], state["width"])
        taught.encoder.load_state_dict(state["encoder"])
        taught.history = [TeachRecord(**r) for r in state.get("history", [])]
        return taught


def load_taught_encoder(path, device: torch.device | str = "cpu") -> TaughtEncoder:
    """The :meth:`TaughtEncoder.state` checkpoint at ``path`` (CryoaceInputError naming it when it is
    missing or not one)."""
    from ..errors import CryoaceInputError

    try:
        state = torch.load(path, map_location=device, weights_only=True)
        taught = TaughtEncoder.from_state(state)
    except FileNotFoundError:
        raise CryoaceInputError("no taught encoder (run 'cryoace reconstruct' with --teach-encoder T)", path) from None
    except (OSError, EOFError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CryoaceInputError(f"not a readable taught-encoder checkpoint ({type(exc).__name__}: {exc})",
                                path) from None
    taught.encoder.to(device).eval()
    return taught


def pose_agreement(predicted: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(median angle in degrees, fraction within 15°) between two (N, 3, 3) rotation stacks of one frame."""
    angle = torch.rad2deg(geodesic_angle(predicted.double(), reference.double()))
    return float(angle.median()), float((angle <= 15.0).double().mean())


def teach_encoder(volume: torch.Tensor, dataset, settings: TeachSettings | None = None,
                  rows: np.ndarray | None = None, shifts_angst: torch.Tensor | None = None,
                  check: tuple[np.ndarray, torch.Tensor] | None = None, use_ctf: bool = True,
                  device: torch.device | str = "cpu", progress: bool = True,
                  on_record: Callable[[TeachRecord], None] | None = None) -> TaughtEncoder:
    """An encoder taught from ``volume`` (L³, the images' units: e.g. the refinement's map) to give the
    poses of the particles of ``dataset`` (module docstring).

    rows         : the particles whose CTFs the synthetic images borrow (default all).
    shifts_angst : (P, 2) shifts the synthetic images draw from (e.g. the refinement's); default none.
    check        : (dataset rows, their (n, 3, 3) reference rotations in the map's frame): every
                   ``check_every`` steps the encoder's median error on them is recorded.
    ``on_record(record)`` after each measurement. Seeds torch's global generator (the random poses
    and noise are drawn from it) with ``settings.seed``.
    """
    from tqdm.auto import tqdm

    settings = settings or TeachSettings()
    device = torch.device(device)
    size = int(dataset.image_size)
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("teaching the encoder needs at least one particle")
    if tuple(volume.shape) != (size, size, size):
        raise ValueError(f"the map is {tuple(volume.shape)}, the images need {size}³")
    torch.manual_seed(settings.seed)
    generator = np.random.default_rng(settings.seed)
    taught = TaughtEncoder(size, float(dataset.pixel_size), min(settings.image_size, size), settings.width)
    encoder = taught.encoder.to(device).train()
    reference = VoxelFourierVolume.from_real(volume.to(device=device, dtype=torch.float32), pad_factor=2)
    # rendered only inside what the encoder sees: the cropped box's Nyquist disc
    grid = HalfDiscGrid(size, device=device, radius_cyc_px=0.5 * taught.image_size / size)
    use_ctf = bool(use_ctf and dataset.has_ctf)
    noise_std = background_noise_std(dataset[np.sort(generator.choice(rows, min(500, len(rows)), replace=False))]
                                     .images)
    pool = None if shifts_angst is None else torch.as_tensor(shifts_angst, dtype=torch.float32, device=device)
    check_images = None if check is None else dataset[np.asarray(check[0])].images.to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=settings.learning_rate)
    batch_size = min(settings.batch_size, len(rows))
    real_size = min(settings.image_batch_size, len(rows)) if settings.image_weight > 0 else 0
    start = time.monotonic()
    # the losses are summed on the device and read only at a measurement: no host sync per step
    sums, count, step = torch.zeros(3, device=device), 0, 0
    bar = tqdm(total=settings.steps if settings.max_time_s is None else None, unit="step",
               desc="teaching the encoder", disable=None if progress else True)
    try:
        while step < settings.steps:
            elapsed = time.monotonic() - start
            if settings.max_time_s is not None and elapsed >= settings.max_time_s:
                break
            done = max(step / settings.steps,
                       0.0 if settings.max_time_s is None else elapsed / settings.max_time_s)
            scale = settings.final_lr_fraction + (1 - settings.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * done))
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * scale
            batch = dataset[np.sort(generator.choice(rows, batch_size, replace=False))]
            pixel_size = batch.pixel_size.to(device)
            target = pip_render(reference, batch.ctf.to(device=device) if use_ctf else None, pixel_size, size,
                                noise_std=noise_std, shift_pool_angst=pool, symmetric=False, grid=grid)
            images = target.images
            if real_size:  # one encoder pass over synthetic and real images: shared BatchNorm statistics
                real = dataset[np.sort(generator.choice(rows, real_size, replace=False))].to(device)
                images = torch.cat([images, real.images.to(images.dtype)])
            pose = encoder(taught.crop(images))
            out = pip_pose_loss(pose[:batch_size], target, pixel_size)
            loss, misfit = out.loss, torch.zeros((), device=device)
            if real_size:
                misfit = image_misfit(reference, pose[batch_size:], real, grid, use_ctf)
                loss = loss + settings.image_weight * misfit
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            sums += torch.stack([out.rotation.detach(), out.shift.detach(), misfit.detach()]).to(sums.dtype)
            count += 1
            if step % settings.check_every == 0 or step == settings.steps:
                taught.history.append(_record(taught, step, sums, count, start, check, check_images, real_size > 0))
                sums, count = torch.zeros(3, device=device), 0
                if on_record is not None:
                    on_record(taught.history[-1])
    finally:
        bar.close()
    if count:
        taught.history.append(_record(taught, step, sums, count, start, check, check_images, real_size > 0))
        if on_record is not None:
            on_record(taught.history[-1])
    encoder.eval()
    return taught


def image_misfit(reference, pose: Pose, batch, grid: HalfDiscGrid, use_ctf: bool = True) -> torch.Tensor:
    """cryoAI's image loss with a frozen map, scale-free: the mean over the particles of ``batch`` of
    1 − ρ, ρ the normalized cross-correlation inside ``grid``'s disc between each image and the map's
    projection at its ``pose`` (times its CTF). Differentiable in ``pose`` (rotation and shift)."""
    size = int(batch.images.shape[-1])
    pixel_size = batch.pixel_size.to(pose.rotmat.device)
    ctf = batch.ctf if use_ctf and batch.ctf is not None else None
    predicted = render_spectra(reference, Pose(pose.rotmat.float(), pose.shift_angst.float()), pixel_size, size,
                               ctf, freq_cyc_px=grid.freq)
    observed = grid.target(batch.images.float())
    weights = grid.weights
    cross = ((predicted.conj() * observed).real * weights).sum(-1)
    norm = torch.sqrt(grid.power(predicted) * grid.power(observed)).clamp_min(torch.finfo(cross.dtype).tiny)
    return (1.0 - cross / norm).mean()


def _record(taught: TaughtEncoder, step: int, sums: torch.Tensor, count: int, start: float,
            check: tuple[np.ndarray, torch.Tensor] | None, check_images: torch.Tensor | None,
            fitted: bool = False) -> TeachRecord:
    rotation, shift, misfit = (v / max(count, 1) for v in sums.tolist())
    median = within = None
    if check is not None and check_images is not None:
        predicted = taught.predict(check_images).rotmat
        median, within = pose_agreement(predicted, torch.as_tensor(check[1]).to(predicted.device))
    return TeachRecord(step=step, rotation_loss=rotation, shift_loss_px2=shift, elapsed_s=time.monotonic() - start,
                       median_deg=median, within_15deg=within, image_loss=misfit if fitted else None)
