"""Ab initio low-resolution map by stochastic expectation–maximization over poses.

Hard projection matching (:mod:`cryoace.reconstruct.refine`) converges in a few rounds from a map
that is right at ~20 Å, but from a wrong start with noisy images (SNR ≲ 0.1) it locks particles
into the wrong map's views and improves only slowly. This stage builds that first map without a
good start, in the spirit of the maximum-likelihood / stochastic ab initio methods of RELION and
cryoSPARC:

* **Small random batches** (``batch_size`` particles per iteration, drawn afresh each time) update
  the map many times per pass over the data, so it changes fast while it is wrong.
* **Soft assignments.** Each image is searched exhaustively over an SO(3) grid × shifts in a low
  band (:func:`~cryoace.reconstruct.pose_search.global_search`, ``top_k`` best candidates) and
  inserted at all of them, weighted by their posterior probability under white Gaussian noise:
  ``p ∝ exp(−ΔE·K / (2·E_min·T))`` with ΔE the candidate's excess error
  (Σ w|Ŷ − P|², the training loss), K the number of Fourier coefficients in the band and E_min/K
  the image's residual power per coefficient (its noise estimate). The temperature T anneals
  geometrically from ``start_temperature`` to 1 (the plain posterior): early iterations average over
  many poses (a smooth map that does not commit to a wrong one), later ones sharpen.
* **Forgetting.** The Fourier sums decay by ``1 − batch_size / memory`` each iteration, so a map
  remembers about ``memory`` recent images and early, wrong assignments fade.
* **Frequency marching.** The band grows linearly from ``start_shells`` to ``end_shells``; only
  frequencies within it are inserted (cheap).

The result seeds the refinement (which splits half sets and goes to full resolution).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from ..physics.forward import VoxelFourierVolume
from ..physics.fourier import radial_distance
from .backproject import FourierAccumulator
from .pose_search import band_coefficients, global_search, pose_posterior, search_band, shift_grid, so3_grid

__all__ = ["AbInitioSettings", "AbInitioIteration", "AbInitioResult", "ab_initio", "mean_search_error",
           "blob_volume"]


@dataclasses.dataclass
class AbInitioSettings:
    """The ab initio schedule (angles in degrees, shifts in px, bands in Fourier shells of the box).

    iterations        : stochastic EM iterations (fewer if ``max_time_s`` runs out first).
    batch_size        : particles drawn at random per iteration.
    top_k             : candidate poses per particle in the expectation.
    step_deg          : spacing of the SO(3) search grid.
    shift_range_px    : shift grid ±range (px) in steps of 1 px.
    start_shells, end_shells : band of the first and of the last iteration.
    start_temperature : posterior temperature of the first iteration (annealed to 1).
    memory            : images the map remembers (Fourier sums decay by 1 − batch_size/memory).
    wiener_eps        : Wiener constant of the map (relative to the mean summed CTF²).
    seed              : of the batch draws.
    max_time_s        : stop after the iteration that passes this wall time (None = all).
    """

    iterations: int = 30
    batch_size: int = 300
    top_k: int = 20
    step_deg: float = 12.0
    shift_range_px: int = 2
    start_shells: int = 5
    end_shells: int = 10
    start_temperature: float = 8.0
    memory: int = 1000
    wiener_eps: float = 1e-2
    seed: int = 0
    max_time_s: float | None = None


@dataclasses.dataclass
class AbInitioIteration:
    """One iteration: its band (shells), temperature, the mean probability of each image's best
    pose (→ 1 as assignments sharpen), the mean best error, and the wall time (s)."""

    iteration: int
    shells: int
    temperature: float
    mean_best_probability: float
    mean_error: float
    elapsed_s: float


@dataclasses.dataclass
class AbInitioResult:
    """The map (L³ real, the images' units) and what each iteration did."""

    volume: torch.Tensor
    iterations: list[AbInitioIteration]


def blob_volume(size: int, device) -> torch.Tensor:
    """A featureless start: a Gaussian of σ = L/8 px at the box centre (the first iteration's poses
    are then nearly uniform, and its map is the data's rotational average)."""
    r = radial_distance(size, 3, device=device, dtype=torch.float32)
    return torch.exp(-0.5 * (r / (size / 8)) ** 2)


def ab_initio(dataset, volume: torch.Tensor | None = None, settings: AbInitioSettings | None = None,
              rows: np.ndarray | None = None, use_ctf: bool = True, device: torch.device | str = "cpu",
              progress: bool = True, on_iteration: Callable[[AbInitioIteration, torch.Tensor], None] | None = None
              ) -> AbInitioResult:
    """A low-resolution map of the particles ``rows`` (default all) of ``dataset`` (see the module
    docstring), started from ``volume`` (L³, the images' units; default a Gaussian blob).

    ``on_iteration(iteration, volume)`` is called after each iteration.
    """
    from tqdm.auto import tqdm

    settings = settings or AbInitioSettings()
    device = torch.device(device)
    size = int(dataset.image_size)
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("ab initio needs at least one particle")
    if volume is not None and tuple(volume.shape) != (size, size, size):
        raise ValueError(f"the start map is {tuple(volume.shape)}, the images need {size}³")
    use_ctf = bool(use_ctf and dataset.has_ctf)
    current = (blob_volume(size, device) if volume is None else volume).to(device=device, dtype=torch.float32)
    rotations = so3_grid(settings.step_deg, device=device)
    shifts = shift_grid(settings.shift_range_px, 1.0, device=device)
    batch_size = min(settings.batch_size, len(rows))
    decay = max(0.0, 1.0 - batch_size / max(settings.memory, batch_size))
    generator = np.random.default_rng(settings.seed)
    accumulator = FourierAccumulator(size, pad_factor=2, device=device)
    history: list[AbInitioIteration] = []
    start = time.monotonic()
    last = max(1, settings.iterations - 1)
    bar = tqdm(total=settings.iterations, unit="it", desc="ab initio", disable=None if progress else True)
    try:
        for i in range(settings.iterations):
            shells = round(settings.start_shells + (settings.end_shells - settings.start_shells) * i / last)
            temperature = float(settings.start_temperature) ** (1 - i / last)
            band = search_band(size, shells, device=device)
            coefficients = band_coefficients(band)
            reference = VoxelFourierVolume.from_real(current, pad_factor=2)
            batch = dataset[np.sort(generator.choice(rows, batch_size, replace=False))]
            images, pixel_size = batch.images.to(device), batch.pixel_size.to(device)
            ctf = batch.ctf.to(device=device) if use_ctf else None
            found = global_search(reference, images, pixel_size, band, rotations, ctf, shifts_px=shifts,
                                  top_k=settings.top_k)
            probability = pose_posterior(found.error.double(), coefficients, temperature).to(images.dtype)
            accumulator.grid *= decay
            accumulator.insert(images, found.pose.rotmat, found.pose.shift_angst / pixel_size[:, None, None],
                               pixel_size, ctf, weight=probability,
                               max_freq_cyc_px=min(0.5, (shells + 2) / size))  # the search band + interpolation margin
            current = accumulator.volume(settings.wiener_eps)
            record = AbInitioIteration(iteration=i, shells=shells, temperature=temperature,
                                       mean_best_probability=float(probability[:, 0].mean()),
                                       mean_error=float(found.error[:, 0].mean()),
                                       elapsed_s=time.monotonic() - start)
            history.append(record)
            bar.update(1)
            if on_iteration is not None:
                on_iteration(record, current)
            if settings.max_time_s is not None and record.elapsed_s >= settings.max_time_s:
                break
    finally:
        bar.close()
    return AbInitioResult(volume=current.cpu(), iterations=history)


def mean_search_error(dataset, volume: torch.Tensor, shells: int, rows: np.ndarray | None = None,
                      step_deg: float = 12.0, sample: int = 500, use_ctf: bool = True,
                      device: torch.device | str = "cpu", seed: int = 0, batch_size: int = 250) -> float:
    """How well a map explains the images: the mean over a seeded sample of up to ``sample`` particles
    of each image's best error (the loss Σ w|Ŷ − P|² in a band of ``shells``) over an SO(3) grid ×
    ±2 px shifts. Lower is better — comparable between maps of the same images and band (e.g. to
    choose the refinement's starting map)."""
    device = torch.device(device)
    size = int(dataset.image_size)
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    picked = np.sort(np.random.default_rng(seed).choice(rows, min(sample, len(rows)), replace=False))
    reference = VoxelFourierVolume.from_real(volume.to(device=device, dtype=torch.float32), pad_factor=2)
    band = search_band(size, shells, device=device)
    rotations = so3_grid(step_deg, device=device)
    shifts = shift_grid(2, 1.0, device=device)
    use_ctf = bool(use_ctf and dataset.has_ctf)
    total = 0.0
    for at in range(0, len(picked), batch_size):
        batch = dataset[picked[at:at + batch_size]]
        images, pixel_size = batch.images.to(device), batch.pixel_size.to(device)
        found = global_search(reference, images, pixel_size, band, rotations,
                              batch.ctf.to(device=device) if use_ctf else None, shifts_px=shifts)
        total += float(found.error.sum())
    return total / len(picked)
