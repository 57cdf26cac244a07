"""Do the particles come from this map? A posterior-predictive check of a refinement's result.

Two independent half maps that agree show that the result is reproducible, not that it is right:
refined from a wrong start (another molecule's map), both halves can assign the particles the same
wrong way and reproduce the same wrong average to high resolution. What gives such a map away is the
particles themselves. Projections of the map the particles came from single out their pose as
sharply as the map's *own* projections do under the same noise; particles that were averaged into
a map they did not come from align to it less sharply.

:func:`predictive_check` scores a sample of each half set's particles against its half's final
reference with the refinement's own global search and pose confidence (the *observed* confidence),
then does the same for synthetic particles made from the reference: its projections at uniformly
random rotations, with the sampled particles' CTFs and shifts, plus Gaussian noise with the
particles' noise power spectrum (measured in the images around the particle, where there is no
signal, so that signal the map fails to explain is not mistaken for noise) — the *expected*
confidence. Both sides go through the same band, grid and candidates, so their ratio is near 1 for a
map that explains its particles whatever the box, band, grid or SNR, and falls when it does not
(``bench/honest_resolution.py``, −10 dB demo: 0.98 for the default run, 0.77 refined from the
spike's map).
"""

from __future__ import annotations

import numpy as np
import torch

from ..evaluate.gold_standard import PredictiveCheck, mask_from_half_maps
from ..physics.forward import FourierVolume, render_images
from ..physics.fourier import freq_grid_2d_half, irfft2_centered, radial_distance, rfft2_centered
from ..physics.rotations import random_rotmat
from ..types import Pose
from .pose_search import global_search, pose_confidence

__all__ = ["predictive_check", "noise_power_spectrum", "particle_radius_px"]


def _shells_half(size: int, device) -> torch.Tensor:
    """Fourier shell index round(|k|·L) of every point of the rfft2_centered half grid (L, L//2 + 1)."""
    freq = freq_grid_2d_half(size, device=device, dtype=torch.float64)
    return torch.round(freq.norm(dim=-1) * size).long().clamp(max=size)


def noise_power_spectrum(images: torch.Tensor, outside_px: float) -> torch.Tensor:
    """Per-shell noise power (L + 1,), as mean |FFT|² of a whole image, of ``images`` (B, L, L) measured
    where the particles are not: the pixels farther than ``outside_px`` from the centre (the power of
    the masked images, scaled by the fraction of pixels kept)."""
    size = images.shape[-1]
    shells = _shells_half(size, images.device).reshape(-1)
    count = torch.zeros(size + 1, dtype=torch.float64, device=images.device).index_add_(
        0, shells, torch.ones_like(shells, dtype=torch.float64))
    outside = (radial_distance(size, 2, device=images.device, dtype=torch.float64) > outside_px).double()
    background = images.double() * outside
    background = background - background.sum((-2, -1), keepdim=True) / outside.sum() * outside  # no mean offset
    power = rfft2_centered(background).abs().pow(2).mean(0).reshape(-1) / outside.mean()
    return torch.zeros_like(count).index_add_(0, shells, power) / count.clamp(min=1)


def _coloured_noise(shape: tuple[int, ...], power: torch.Tensor, generator: torch.Generator,
                    device) -> torch.Tensor:
    """Gaussian noise images (B, L, L) whose mean |FFT|² in shell s is ``power[s]``."""
    size = shape[-1]
    white = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)  # E|FFT|² = L²
    gain = torch.sqrt(power / size ** 2)[_shells_half(size, device)]
    return irfft2_centered(rfft2_centered(white) * gain, size)


def particle_radius_px(half1: torch.Tensor, half2: torch.Tensor) -> float:
    """Radius (px) of the particle in two half maps (L³): the farthest voxel from the centre inside their
    soft mask (:func:`~cryoace.evaluate.gold_standard.mask_from_half_maps`); L/2 when there is none."""
    size = half1.shape[-1]
    try:
        inside = mask_from_half_maps(half1, half2, None) > 0.5
    except ValueError:  # nothing above the mask's threshold
        return size / 2
    distance = radial_distance(size, 3, device=half1.device, dtype=torch.float64)
    return float(distance[inside.to(half1.device)].max()) if bool(inside.any()) else size / 2


def predictive_check(dataset, rows: np.ndarray, halves: tuple[np.ndarray, np.ndarray],
                     references: list[FourierVolume], band, rotations: torch.Tensor, shifts_px: torch.Tensor,
                     candidates: int, radius_deg: float, particle_radius: float,
                     shift_angst: torch.Tensor | None = None, use_ctf: bool = True, sample: int = 256,
                     batch_size: int = 128, seed: int = 0, device: torch.device | str = "cpu") -> PredictiveCheck:
    """The observed and expected mean pose confidence (module docstring) of up to ``sample``
    particles of each half set.

    rows       : the dataset rows refined; ``halves`` their two half sets as positions in ``rows``.
    references : each half's map (a search reference in the images' units).
    band, rotations, shifts_px, candidates, radius_deg : the global search and pose confidence
                 (:func:`~cryoace.reconstruct.pose_search.global_search`).
    shift_angst : the particles' shifts (per position in ``rows``, Å), given to their synthetic
                 counterparts so that both sides meet the shift grid alike (default: the shift the
                 search found, on its grid, which flatters the synthetic side a little).
    particle_radius : the particle's radius (px, :func:`particle_radius_px`): the noise spectrum is
                 measured in the images beyond it and the largest shift (at most 0.45·L, so that a
                 third of the pixels remain; a particle that fills the box leaves signal in the noise
                 estimate, which makes the check lenient, never strict).
    """
    device = torch.device(device)
    size = int(dataset.image_size)
    generator = torch.Generator().manual_seed(int(seed))
    observed, expected = [], []

    def confidence(reference, data, pixel_size, ctf):
        found = global_search(reference, data, pixel_size, band, rotations, ctf, shifts_px=shifts_px,
                              top_k=max(2, candidates), distinct_rotations=True)
        return pose_confidence(found, radius_deg).cpu(), found.pose.shift_angst[:, 0]

    for positions, reference in zip(halves, references, strict=True):
        positions = np.asarray(positions)
        if len(positions) > sample:
            pick = torch.randperm(len(positions), generator=generator)[:sample].numpy()
            positions = np.sort(positions[pick])
        batches = []
        for at in range(0, len(positions), batch_size):
            where = positions[at:at + batch_size]
            batch = dataset[rows[where]]
            images = batch.images.to(device)
            pixel_size = batch.pixel_size.to(device)
            ctf = batch.ctf.to(device=device) if use_ctf else None
            scores, found_shift = confidence(reference, images, pixel_size, ctf)
            observed.append(scores)
            batches.append((images, pixel_size, ctf,
                            found_shift if shift_angst is None else shift_angst[where].to(device, found_shift.dtype)))
        largest_shift = float(max((b[3] / b[1][:, None]).norm(dim=-1).max() for b in batches))
        outside_px = min(particle_radius + largest_shift + 2.0, 0.45 * size)
        noise = noise_power_spectrum(torch.cat([b[0] for b in batches]), outside_px)
        for images, pixel_size, ctf, shift in batches:
            random_pose = Pose(random_rotmat(len(images), generator=generator).to(device), shift)
            synthetic = render_images(reference, random_pose, pixel_size, size, ctf)
            synthetic = (synthetic + _coloured_noise(tuple(images.shape), noise, generator, device)).to(images.dtype)
            expected.append(confidence(reference, synthetic, pixel_size, ctf)[0])
    observed_all, expected_all = torch.cat(observed), torch.cat(expected)
    n = observed_all.numel()
    return PredictiveCheck(observed=float(observed_all.mean()), expected=float(expected_all.mean()),
                           particles=int(n), chance=1.0 / max(2, candidates),
                           observed_se=float(observed_all.std() / n ** 0.5) if n > 1 else 0.0,
                           expected_se=float(expected_all.std() / n ** 0.5) if n > 1 else 0.0)
