"""Iterative projection-matching refinement: poses from a map, a map from the poses, coarse to fine.

Seeded by a map (e.g. the decoder's volume after amortized training), each round

1. searches every particle's pose against the current map (:mod:`cryoace.reconstruct.pose_search`):
   exhaustively over SO(3) on a grid of ``global_step_deg`` in a low band of ``global_shells`` (robust,
   cheap: the grid's slices are shared by all images), then locally around the best with halving
   angular steps and finer shifts in a wider band — the band grows by ``shells_per_round`` each round
   from ``start_shells`` to Nyquist (frequency marching, as in RELION's and cryoSPARC's refinements);
2. reconstructs the map from the new poses by CTF-weighted direct Fourier inversion
   (:class:`~cryoace.reconstruct.backproject.FourierAccumulator`).

**Two halves.** The particles (alternate positions in ``rows``) form two half sets with a map each;
every image is searched against the *other* half's map. Matching an image against a map that holds
its own noise at its previous pose would pull it back there (with noisy images this locks wrong
poses in); against the other half's map it cannot. The two maps share one frame because each half is
aligned to the other's, and the reported map is the reconstruction from all particles. Their FSC
(``half_map_fsc``) weights each half map's shells by √(2·FSC/(1 + FSC)) (:func:`fsc_weighted`) before
it serves as the next round's reference, so noise-dominated shells hardly steer the search. (It is
not a gold-standard estimate: the halves are aligned to each other, so shared noise can correlate.)

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

from ..evaluate.fsc import FSCResult, fsc
from ..physics.forward import VoxelFourierVolume
from ..physics.fourier import fft3_centered, ifft3_centered, radial_shell_index
from ..physics.rotations import geodesic_angle
from ..types import Pose
from .backproject import FourierAccumulator
from .pose_search import SearchResult, global_search, local_offsets, local_search, search_band, shift_grid, so3_grid

__all__ = ["RefineSettings", "RefineRound", "RefineResult", "RefineState", "refine", "fsc_weighted"]


@dataclasses.dataclass
class RefineSettings:
    """The refinement schedule (angles in degrees, shifts in px, bands in Fourier shells of the box).

    rounds          : search + reconstruction rounds (fewer if ``max_time_s`` runs out first).
    global_step_deg : spacing of the SO(3) grid of the global search.
    global_shells   : band of the global search at round 0; it grows with the band below up to
                      ``global_max_shells`` (the grid's spacing limits what higher frequencies add).
    start_shells, shells_per_round : band of the local search at round r: start + r·step, at most L/2.
    local_steps_deg : angular steps of the successive local searches (3×3×3 rotation-vector cubes).
    shift_range_px, shift_step_px : global shift grid ±range in steps of step (px) around 0;
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
    refinement has converged), the wall time, and the FSC between the two half maps."""

    round: int
    global_shells: int
    local_shells: int
    mean_error: float
    elapsed_s: float
    pose_change_median_deg: float | None = None
    half_map_fsc: FSCResult | None = None


@dataclasses.dataclass
class RefineResult:
    """Final poses (rotmat, shift in Å, per particle row), map (L³, real, the images' units), rounds."""

    pose: Pose
    volume: torch.Tensor
    rounds: list[RefineRound]


@dataclasses.dataclass
class RefineState:
    """Everything the next round needs: the last completed ``round``, the poses found in it, the two
    FSC-weighted half maps (2, L, L, L) that serve as the next round's references and the full map.
    Saved after each round, it lets an interrupted refinement go on where it stopped."""

    round: int
    pose: Pose
    half_references: torch.Tensor
    volume: torch.Tensor


def fsc_weighted(volume: torch.Tensor, fsc_curve) -> torch.Tensor:
    """``volume`` with each Fourier shell scaled by √(2·FSC/(1 + FSC)) (0 where FSC ≤ 0): the
    expected correlation of a half map with the truth (Rosenthal & Henderson 2003), which damps the
    shells that hold mostly noise before they are used as a search reference."""
    size = volume.shape[-1]
    curve = torch.as_tensor(np.asarray(fsc_curve), dtype=torch.float64, device=volume.device).clamp(min=0.0)
    weight = torch.sqrt(2 * curve / (1 + curve))
    shells = radial_shell_index(size, 3, device=volume.device).clamp(max=len(curve) - 1)
    spectrum = fft3_centered(volume.to(torch.float64)) * weight[shells]
    return ifft3_centered(spectrum).real.to(volume.dtype)


def refine(dataset, volume: torch.Tensor, settings: RefineSettings | None = None, rows: np.ndarray | None = None,
           use_ctf: bool = True, device: torch.device | str = "cpu", progress: bool = True,
           on_round: Callable[[RefineRound, Pose, torch.Tensor], None] | None = None,
           resume: RefineState | None = None, on_state: Callable[[RefineState], None] | None = None
           ) -> RefineResult:
    """Refine poses and map of the particles ``rows`` (default all) of ``dataset`` from the map ``volume``
    (L³ real, same box and pixel size as the dataset's images, in the images' units — e.g. a decoder's
    map trained on the same normalized images, or a reconstruction from them).

    ``on_round(round, pose, volume)`` is called after each round (e.g. to save or score it), then
    ``on_state(state)`` with what a later call needs to go on from there (``resume=state``: rounds
    ``state.round + 1`` … ``settings.rounds − 1`` are run, ``volume`` is not used; the result's
    ``rounds`` lists only the rounds of this call).
    """
    from tqdm.auto import tqdm

    settings = settings or RefineSettings()
    device = torch.device(device)
    size = int(dataset.image_size)
    if tuple(volume.shape) != (size, size, size):
        raise ValueError(f"the map is {tuple(volume.shape)}, the images need {size}³")
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    if len(rows) < 2:
        raise ValueError(f"refinement needs at least 2 particles (two half sets), got {len(rows)}")
    use_ctf = bool(use_ctf and dataset.has_ctf)
    rotations = so3_grid(settings.global_step_deg, device=device)
    global_shifts = shift_grid(settings.shift_range_px, settings.shift_step_px, device=device)
    local_shifts = shift_grid(1, settings.local_shift_step_px, device=device)
    offsets = [local_offsets(step, device=device) for step in settings.local_steps_deg]
    finest = local_offsets(min(settings.local_steps_deg, default=1.0) / 2, device=device)
    halves = [np.arange(h, len(rows), 2) for h in (0, 1)]  # positions in ``rows``
    n = len(rows)
    if resume is None:
        first, pose, current = 0, None, volume.to(device=device, dtype=torch.float32)
        references = [VoxelFourierVolume.from_real(current, pad_factor=2)] * 2  # searched by half 1, half 0
    else:
        if resume.pose.rotmat.shape[0] != n or tuple(resume.volume.shape) != (size, size, size):
            raise ValueError(f"the saved refinement state is for {resume.pose.rotmat.shape[0]} particles and a "
                             f"{tuple(resume.volume.shape)} map, not {n} particles of {size}³")
        first = resume.round + 1
        pose = Pose(resume.pose.rotmat.to(device), resume.pose.shift_angst.to(device))
        current = resume.volume.to(device=device, dtype=torch.float32)
        references = [VoxelFourierVolume.from_real(m.to(device=device, dtype=torch.float32), pad_factor=2)
                      for m in resume.half_references]
    start = time.monotonic()
    history: list[RefineRound] = []
    bar = tqdm(total=max(0, settings.rounds - first), unit="round", desc="refining",
               disable=None if progress else True)
    try:
        for r in range(first, settings.rounds):
            local_shells = min(size // 2, settings.start_shells + r * settings.shells_per_round)
            global_shells = min(settings.global_max_shells, settings.global_shells + 2 * r, local_shells)
            gband = search_band(size, global_shells, device=device)
            lband = search_band(size, local_shells, device=device)
            rotmat = torch.empty(n, 3, 3, device=device)
            shift = torch.empty(n, 2, device=device)
            error = torch.empty(n, device=device)
            accumulators = [FourierAccumulator(size, pad_factor=2, device=device) for _ in halves]
            for h, positions in enumerate(halves):
                reference = references[1 - h]  # the other half's map: no image meets its own noise
                for at in range(0, len(positions), settings.batch_size):
                    where = positions[at:at + settings.batch_size]
                    batch = dataset[rows[where]]
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
                        kept = local_search(*search, Pose(pose.rotmat[where], pose.shift_angst[where]), finest,
                                            local_shifts, ctf)
                        better = kept.error < best.error
                        best = SearchResult(
                            Pose(torch.where(better[:, None, None], kept.pose.rotmat, best.pose.rotmat),
                                 torch.where(better[:, None], kept.pose.shift_angst, best.pose.shift_angst)),
                            torch.where(better, kept.error, best.error))
                    rotmat[where], shift[where], error[where] = best.pose.rotmat, best.pose.shift_angst, best.error
                    accumulators[h].insert(images, best.pose.rotmat, best.pose.shift_angst / pixel_size[:, None],
                                           pixel_size, ctf)
            new = Pose(rotmat=rotmat, shift_angst=shift)
            change = None if pose is None else float(torch.rad2deg(geodesic_angle(pose.rotmat, new.rotmat)).median())
            pose = new
            half_maps = [a.volume(settings.wiener_eps) for a in accumulators]
            half_fsc = fsc(half_maps[0], half_maps[1], voxel_size=float(dataset.pixel_size))
            weighted = torch.stack([fsc_weighted(m, half_fsc.curve) for m in half_maps])
            references = [VoxelFourierVolume.from_real(m, pad_factor=2) for m in weighted]
            current = accumulators[0].merged(accumulators[1]).volume(settings.wiener_eps)
            record = RefineRound(round=r, global_shells=global_shells, local_shells=local_shells,
                                 mean_error=float(error.mean()), elapsed_s=time.monotonic() - start,
                                 pose_change_median_deg=change,
                                 half_map_fsc=half_fsc)
            history.append(record)
            bar.update(1)
            if on_round is not None:
                on_round(record, pose, current)
            if on_state is not None:
                on_state(RefineState(round=r, pose=pose, half_references=weighted, volume=current))
            if settings.max_time_s is not None and record.elapsed_s >= settings.max_time_s:
                break
    finally:
        bar.close()
    return RefineResult(pose=pose, volume=current.cpu(), rounds=history)
