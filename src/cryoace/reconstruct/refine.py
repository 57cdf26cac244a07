"""Iterative projection-matching refinement: poses from a map, a map from the poses, coarse to fine.

Seeded by a map (e.g. the decoder's volume after amortized training), each round

1. searches every particle's pose against the current map (:mod:`cryoace.reconstruct.pose_search`):
   exhaustively over SO(3) on a grid of ``global_step_deg`` in a low band of ``global_shells`` (robust,
   cheap: the grid's slices are shared by all images), then locally around the best with halving
   angular steps and finer shifts in a wider band — the band grows by ``shells_per_round`` each round
   from ``start_shells`` to Nyquist (frequency marching, as in RELION's and cryoSPARC's refinements);
2. reconstructs the map from the new poses by CTF-weighted direct Fourier inversion
   (:class:`~cryoace.reconstruct.backproject.FourierAccumulator`).

Starting every round with the global search lets particles leave a wrong basin once the map has
improved; the growing band is what lets the map improve round after round from a blurry start.
Cost per round is a few GEMMs per batch for the global search plus ``len(local_steps_deg) + 2`` local
searches (27 rotations × 9 shifts per image each) — independent of how many rounds came before.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch

from ..physics.forward import VoxelFourierVolume
from ..types import Pose
from .backproject import FourierAccumulator
from .pose_search import SearchResult, global_search, local_offsets, local_search, search_band, shift_grid, so3_grid

__all__ = ["RefineSettings", "RefineRound", "RefineResult", "refine"]


@dataclasses.dataclass
class RefineSettings:
    """The refinement schedule (angles in degrees, shifts in px, bands in Fourier shells of the box).

    rounds          : search + reconstruction rounds (fewer if ``max_time_s`` runs out first).
    global_step_deg : spacing of the SO(3) grid of the global search.
    global_shells   : band of the global search at round 0; it grows with the band below up to
                      ``global_max_shells`` (the grid's spacing limits what higher frequencies add).
    start_shells, shells_per_round : band of the local search at round r: start + r·step, at most L/2.
    local_steps_deg : angular steps of the successive local searches (3×3×3 rotation-vector cubes).
    shift_range_px, shift_step_px : global shift grid ±range in steps (around 0 or the given shifts);
    local_shift_step_px : local shift grid ±1 step.
    wiener_eps      : Wiener constant of the reconstruction (relative to the mean summed CTF²).
    batch_size      : images per search batch.
    max_time_s      : stop after the round that passes this wall time (None = all rounds).
    """

    rounds: int = 10
    global_step_deg: float = 8.0
    global_shells: int = 6
    global_max_shells: int = 12
    start_shells: int = 8
    shells_per_round: int = 3
    local_steps_deg: tuple[float, ...] = (4.0, 2.0, 1.0)
    shift_range_px: int = 1
    shift_step_px: float = 1.0
    local_shift_step_px: float = 0.5
    wiener_eps: float = 1e-2
    batch_size: int = 128
    max_time_s: float | None = None


@dataclasses.dataclass
class RefineRound:
    """What one round did: its bands (shells), the mean per-image error (the loss), the median angle (°)
    by which the particles' rotations moved since the last round (None in round 0; near 0 once the
    refinement has converged) and the wall time."""

    round: int
    global_shells: int
    local_shells: int
    mean_error: float
    elapsed_s: float
    pose_change_median_deg: float | None = None


@dataclasses.dataclass
class RefineResult:
    """Final poses (rotmat, shift in Å, per particle row), map (L³, real, the images' units), rounds."""

    pose: Pose
    volume: torch.Tensor
    rounds: list[RefineRound]


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angles (°) of the rotations aᵀb (N,)."""
    cos = ((a.double().transpose(-1, -2) @ b.double()).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))


def refine(dataset, volume: torch.Tensor, settings: RefineSettings | None = None, rows: np.ndarray | None = None,
           use_ctf: bool = True, device: torch.device | str = "cpu", progress: bool = True,
           on_round: Callable[[RefineRound, Pose, torch.Tensor], None] | None = None) -> RefineResult:
    """Refine poses and map of the particles ``rows`` (default all) of ``dataset`` from the map ``volume``
    (L³ real, same box and pixel size as the dataset's images, in the images' units — e.g. a decoder's
    map trained on the same normalized images, or a reconstruction from them).

    ``on_round(round, pose, volume)`` is called after each round (e.g. to save or score it).
    """
    from tqdm.auto import tqdm

    settings = settings or RefineSettings()
    device = torch.device(device)
    size = int(dataset.image_size)
    if tuple(volume.shape) != (size, size, size):
        raise ValueError(f"the map is {tuple(volume.shape)}, the images need {size}³")
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    use_ctf = bool(use_ctf and dataset.has_ctf)
    rotations = so3_grid(settings.global_step_deg, device=device)
    global_shifts = shift_grid(settings.shift_range_px, settings.shift_step_px, device=device)
    local_shifts = shift_grid(1, settings.local_shift_step_px, device=device)
    offsets = [local_offsets(step, device=device) for step in settings.local_steps_deg]
    finest = local_offsets(min(settings.local_steps_deg, default=1.0) / 2, device=device)
    current = volume.to(device=device, dtype=torch.float32)
    start = time.monotonic()
    history: list[RefineRound] = []
    pose = None
    bar = tqdm(total=settings.rounds, unit="round", desc="refining", disable=None if progress else True)
    try:
        for r in range(settings.rounds):
            local_shells = min(size // 2, settings.start_shells + r * settings.shells_per_round)
            global_shells = min(settings.global_max_shells, settings.global_shells + 2 * r, local_shells)
            gband = search_band(size, global_shells, device=device)
            lband = search_band(size, local_shells, device=device)
            reference = VoxelFourierVolume.from_real(current, pad_factor=2)
            accumulator = FourierAccumulator(size, pad_factor=2, device=device)
            rotmats, shifts, total_error, done = [], [], 0.0, 0
            for batch in dataset.batches(settings.batch_size, indices=rows):
                images = batch.images.to(device)
                pixel_size = batch.pixel_size.to(device)
                ctf = batch.ctf.to(device=device) if use_ctf else None
                search = (reference, images, pixel_size, lband)
                found = global_search(reference, images, pixel_size, gband, rotations, ctf,
                                      shifts_px=global_shifts).pose
                for offset in offsets:
                    found = local_search(*search, found, offset, local_shifts, ctf).pose
                best = local_search(*search, found, finest, local_shifts, ctf)
                if pose is not None:  # last round's pose, touched up, where it still explains the image better
                    n = images.shape[0]
                    previous = Pose(pose.rotmat[done:done + n], pose.shift_angst[done:done + n])
                    kept = local_search(*search, previous, finest, local_shifts, ctf)
                    better = kept.error < best.error
                    best = SearchResult(Pose(torch.where(better[:, None, None], kept.pose.rotmat, best.pose.rotmat),
                                             torch.where(better[:, None], kept.pose.shift_angst, best.pose.shift_angst)),
                                        torch.where(better, kept.error, best.error))
                found = best.pose
                done += images.shape[0]
                total_error += float(best.error.sum())
                accumulator.insert(images, found.rotmat, found.shift_angst / pixel_size[:, None], pixel_size, ctf)
                rotmats.append(found.rotmat)
                shifts.append(found.shift_angst)
            new = Pose(rotmat=torch.cat(rotmats), shift_angst=torch.cat(shifts))
            change = None if pose is None else float(_angle_deg(pose.rotmat, new.rotmat).median())
            pose = new
            current = accumulator.volume(settings.wiener_eps)
            record = RefineRound(round=r, global_shells=global_shells, local_shells=local_shells,
                                 mean_error=total_error / len(rows), elapsed_s=time.monotonic() - start,
                                 pose_change_median_deg=change)
            history.append(record)
            bar.update(1)
            if on_round is not None:
                on_round(record, pose, current)
            if settings.max_time_s is not None and record.elapsed_s >= settings.max_time_s:
                break
    finally:
        bar.close()
    return RefineResult(pose=pose, volume=current.cpu(), rounds=history)
