"""Iterative projection-matching refinement: poses from a map, a map from the poses, coarse to fine.

Seeded by a map (e.g. the decoder's volume after amortized training), each round

1. searches every particle's pose against the current map (:mod:`cryoace.reconstruct.pose_search`):
   exhaustively over SO(3) on a grid of ``global_step_deg`` in a low band of ``global_shells`` (robust,
   cheap: the grid's slices are shared by all images), then locally around the best with halving
   angular steps and finer shifts in a wider band — the band grows by ``shells_per_round`` each round
   from ``start_shells`` to Nyquist (frequency marching, as in RELION's and cryoSPARC's refinements);
2. reconstructs the map from the new poses by CTF-weighted direct Fourier inversion
   (:class:`~cryoace.reconstruct.backproject.FourierAccumulator`).

**Gold standard.** The particles form two half sets (``half_sets``: RELION's ``rlnRandomSubset`` in a
run, alternate positions by default), and each half is refined against **its own** half map only,
as RELION's auto-refine does: after the common start, no image of one half ever influences the poses
or the map of the other. The common start is the seed map low-passed to ``start_resolution_px``
(a raised-cosine edge that ends there), so whatever the two halves share lies below that frequency;
beyond it, their agreement can only come from the data. (A start per half, e.g. two maps found
apart that do not agree, can be given instead: then the halves share nothing at all.) Both halves
start from the same map, so they stay in one frame, and their FSC (``half_map_fsc``, computed
between the unweighted half maps written by the run) is a gold-standard resolution estimate. Before
a half map serves as its half's next reference, its shells are weighted by √(2·FSC/(1 + FSC))
(:func:`fsc_weighted`), so noise-dominated shells hardly steer the search. The reported map is the
reconstruction from all particles. A resolution no better than the start's low-pass means nothing
was resolved beyond what the two halves were given (:attr:`RefineResult.resolved_beyond_start`).

**Pose confidence.** The global search keeps each image's ``confidence_candidates`` best rotations;
the fraction of them within two grid steps of the best one is the particle's pose confidence
(:func:`~cryoace.reconstruct.pose_search.pose_confidence`): near 1 when the data single out one
pose, near ``1/confidence_candidates`` when the best rotations are scattered over SO(3) (noise, a
wrong map).

The global search lets particles leave a wrong basin once the map has improved; the growing band is
what lets the map improve round after round from a blurry start. Cost per round is a few GEMMs per
batch for the global search plus ``len(local_steps_deg) + 2`` local searches (27 rotations × 9 shifts
per image each, in the whole band: these dominate once the band is wide) — independent of how many
rounds came before. **Local-only particles.** From round 1 on, a particle whose last global search
singled out its pose (confidence ≥ ``local_confidence``, 0.9) is searched only locally around its last
pose, from the second local step on (``len(local_steps_deg)`` local searches, no global search): about
half the cost of a round for most particles once the poses are found. The others — unresolved or
ambiguous particles — fall back to the global search, and so does every particle in the last round,
which refreshes every pose confidence and lets any particle still leave a wrong basin.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from ..evaluate.fsc import FSCResult, fsc
from ..evaluate.gold_standard import MIN_GAIN_OVER_START, PredictiveCheck
from ..physics.forward import VoxelFourierVolume
from ..physics.fourier import fft3_centered, ifft3_centered, radial_shell_index
from ..physics.rotations import geodesic_angle
from ..types import Pose
from .backproject import FourierAccumulator
from .pose_search import (
    SearchResult,
    global_search,
    local_offsets,
    local_search,
    pose_confidence,
    search_band,
    shift_grid,
    so3_grid,
)
from .predictive_check import particle_radius_px, predictive_check

__all__ = ["RefineSettings", "RefineRound", "RefineResult", "RefineState", "refine", "extend_refinement",
           "refine_particles",
           "check_half_maps",
           "fsc_weighted", "lowpass",
           "scale_shells", "alternate_half_sets"]


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
    max_time_s      : wall-time budget of the rounds (s, from this call's start; None = all rounds):
                      a round after which another one (as long as the longest so far) and
                      ``reserve_s`` would not fit is made the last one — searched at the last
                      round's band, every particle globally — so that a short budget still ends
                      with a full-band round rather than midway through the band schedule.
    reserve_s       : time (s) kept out of ``max_time_s`` for what follows the rounds; a callable
                      gets the longest round's time per particle (s) and returns it (e.g. a final
                      pass over more particles).
    start_resolution_px : the common start map of the two halves is low-passed to this resolution
                      (px per cycle; the cosine edge ends there): the two halves share nothing finer,
                      so their FSC can only claim better resolutions from the data.
    confidence_candidates : best global-search rotations per image for the pose confidence.
    local_confidence : from round 1 on, a particle whose pose confidence in its last global search
                      reached this is searched only locally around its last pose (from the second
                      local step on); the others, round 0 and the last round search globally.
                      None: every particle globally in every round.
    check_particles : particles of each half set sampled for the posterior-predictive check of the
                      final poses (:mod:`cryoace.reconstruct.predictive_check`); 0 skips it.
    seed            : seeds the check's sample, rotations and noise.
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
    reserve_s: float | Callable[[float], float] = 0.0
    start_resolution_px: float = 12.0
    confidence_candidates: int = 10
    local_confidence: float | None = 0.9
    check_particles: int = 256
    seed: int = 0


@dataclasses.dataclass
class RefineRound:
    """What one round did: its bands (shells), the mean per-image error (the loss), the median angle (°)
    by which the particles' rotations moved since the last round (None in round 0; near 0 once the
    refinement has converged), the wall time, the gold-standard FSC between the two half maps, the
    median pose confidence (see the module docstring) and the fraction of particles searched
    globally (the others only locally: ``RefineSettings.local_confidence``)."""

    round: int
    global_shells: int
    local_shells: int
    mean_error: float
    elapsed_s: float
    pose_change_median_deg: float | None = None
    half_map_fsc: FSCResult | None = None
    confidence_median: float | None = None
    global_fraction: float = 1.0
    final: bool = False


@dataclasses.dataclass
class RefineResult:
    """Final poses (rotmat, shift in Å, per particle row), map (L³, real, the images' units, from all
    particles), the two half maps (2, L, L, L; each from its half set alone), the rows of each half
    set, each particle's pose confidence (N,), the start's low-pass (px), the rounds of this call
    and the posterior-predictive check of the final poses (None when skipped)."""

    pose: Pose
    volume: torch.Tensor
    rounds: list[RefineRound]
    half_volumes: torch.Tensor
    half_rows: tuple[np.ndarray, np.ndarray]
    confidence: torch.Tensor
    start_resolution_px: float
    half_map_fsc: FSCResult
    check: PredictiveCheck | None = None
    rows: np.ndarray | None = None  # the dataset rows of ``pose`` and ``confidence``, in their order

    @property
    def resolved_beyond_start(self) -> bool:
        """Whether the halves agree (FSC 0.143) clearly beyond the start's low-pass — 25 % further
        in frequency (:data:`~cryoace.evaluate.gold_standard.MIN_GAIN_OVER_START`). When they do not,
        the run has resolved nothing the start did not already hold."""
        return self.half_map_fsc.resolution(0.143).px * MIN_GAIN_OVER_START <= self.start_resolution_px

    def star_columns(self) -> dict[str, np.ndarray]:
        """The per-particle columns for poses.star, in the order of ``rows``: each particle's half set
        (``rlnRandomSubset``: 1 or 2) and pose confidence (``cryoacePoseConfidence``)."""
        rows = np.asarray(self.rows)
        order = np.argsort(rows)
        subset = np.zeros(len(rows), dtype=np.int64)
        for h, half in enumerate(self.half_rows):
            subset[order[np.searchsorted(rows, half, sorter=order)]] = h + 1
        return {"rlnRandomSubset": subset, "cryoacePoseConfidence": self.confidence.double().numpy()}


@dataclasses.dataclass
class RefineState:
    """Everything the next round needs: the last completed ``round``, the poses found in it, the two
    FSC-weighted half maps (2, L, L, L) that serve as each half's next reference, the full map, the
    two unweighted half maps, the pose confidences, whether that round was a final one (the
    schedule's last, or brought forward by the budget) and the longest round's wall time (s). Saved
    after each round, it lets an interrupted refinement go on where it stopped."""

    round: int
    pose: Pose
    half_references: torch.Tensor
    volume: torch.Tensor
    half_volumes: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    final: bool = False
    longest_round_s: float = 0.0


def scale_shells(volume: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``volume`` (L³ real) with Fourier shell s scaled by ``weight[s]`` (shells beyond the last
    weight take the last one)."""
    size = volume.shape[-1]
    weight = torch.as_tensor(weight, dtype=torch.float64, device=volume.device)
    shells = radial_shell_index(size, 3, device=volume.device).clamp(max=len(weight) - 1)
    spectrum = fft3_centered(volume.to(torch.float64)) * weight[shells]
    return ifft3_centered(spectrum).real.to(volume.dtype)


def fsc_weighted(volume: torch.Tensor, fsc_curve) -> torch.Tensor:
    """``volume`` with each Fourier shell scaled by √(2·FSC/(1 + FSC)) (0 where FSC ≤ 0): the
    expected correlation of a half map with the truth (Rosenthal & Henderson 2003), which damps the
    shells that hold mostly noise before they are used as a search reference."""
    curve = torch.as_tensor(np.asarray(fsc_curve), dtype=torch.float64, device=volume.device).clamp(min=0.0)
    return scale_shells(volume, torch.sqrt(2 * curve / (1 + curve)))


def lowpass(volume: torch.Tensor, resolution_px: float, edge_shells: float = 2.0) -> torch.Tensor:
    """``volume`` (L³) low-passed to ``resolution_px`` (px per cycle): shells up to
    ``L/resolution_px − edge_shells`` kept, a raised-cosine fall to 0 at ``L/resolution_px``, nothing
    beyond (shell index = round(|k|·L), as :func:`~cryoace.physics.fourier.radial_shell_index`)."""
    size = volume.shape[-1]
    cutoff = size / float(resolution_px)
    shell = torch.arange(size, dtype=torch.float64, device=volume.device)
    ramp = ((cutoff - shell) / max(edge_shells, 1e-9)).clamp(0.0, 1.0)
    return scale_shells(volume, 0.5 - 0.5 * torch.cos(torch.pi * ramp))


def alternate_half_sets(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0, 2, 4, … and 1, 3, 5, … of ``n`` particles: the default half sets."""
    return np.arange(0, n, 2), np.arange(1, n, 2)


def refine(dataset, volume: torch.Tensor, settings: RefineSettings | None = None, rows: np.ndarray | None = None,
           use_ctf: bool = True, device: torch.device | str = "cpu", progress: bool = True,
           on_round: Callable[[RefineRound, Pose, torch.Tensor], None] | None = None,
           resume: RefineState | None = None, on_state: Callable[[RefineState], None] | None = None,
           half_sets: tuple[np.ndarray, np.ndarray] | None = None) -> RefineResult:
    """Refine poses and map of the particles ``rows`` (default all) of ``dataset`` from the map ``volume``
    (L³ real, same box and pixel size as the dataset's images, in the images' units — e.g. a decoder's
    map trained on the same normalized images, or a reconstruction from them), or from one start map
    per half set (2, L, L, L; in one frame — e.g. the half sets' own ab initio maps where they do
    not agree: then the halves share nothing at all).

    ``half_sets``: the two half sets as positions in ``rows`` (disjoint, together every position;
    default :func:`alternate_half_sets`). Each half is refined against its own half map only, from
    its start low-passed to ``settings.start_resolution_px`` (module docstring).

    ``on_round(round, pose, volume)`` is called after each round (e.g. to save or score it), then
    ``on_state(state)`` with what a later call needs to go on from there (``resume=state``: rounds
    ``state.round + 1`` … ``settings.rounds − 1`` are run, ``volume`` is not used; the result's
    ``rounds`` lists only the rounds of this call).
    """
    from tqdm.auto import tqdm

    settings = settings or RefineSettings()
    device = torch.device(device)
    size = int(dataset.image_size)
    if tuple(volume.shape) not in ((size,) * 3, (2,) + (size,) * 3):
        raise ValueError(f"the map is {tuple(volume.shape)}, the images need {size}³ (or 2 × {size}³, one per half)")
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    n = len(rows)
    halves = _checked_half_sets(alternate_half_sets(n) if half_sets is None else half_sets, n)
    use_ctf = bool(use_ctf and dataset.has_ctf)
    grids = _SearchGrids.of(settings, device)
    if resume is None:
        first, pose = 0, None
        # one common start (low-passed and padded once, shared by both halves), or one per half
        maps = volume.to(device=device, dtype=torch.float32).reshape(-1, size, size, size)
        maps = torch.stack([lowpass(m, settings.start_resolution_px) for m in maps])
        references = [VoxelFourierVolume.from_real(m, pad_factor=2) for m in maps]
        references = references * 2 if len(references) == 1 else references
        starts = maps.expand(2, size, size, size)
        current = starts.mean(0)
        half_maps = starts.cpu()
        confidence = torch.zeros(n)
    else:
        if resume.pose.rotmat.shape[0] != n or tuple(resume.volume.shape) != (size, size, size):
            raise ValueError(f"the saved refinement state is for {resume.pose.rotmat.shape[0]} particles and a "
                             f"{tuple(resume.volume.shape)} map, not {n} particles of {size}³")
        first = resume.round + 1
        pose = Pose(resume.pose.rotmat.to(device), resume.pose.shift_angst.to(device))
        current = resume.volume.to(device=device, dtype=torch.float32)
        references = [VoxelFourierVolume.from_real(m.to(device=device, dtype=torch.float32), pad_factor=2)
                      for m in resume.half_references]
        half_maps = resume.half_references if resume.half_volumes is None else resume.half_volumes
        confidence = torch.zeros(n) if resume.confidence is None else resume.confidence
    clock0 = time.monotonic()
    history: list[RefineRound] = []
    longest_s = 0.0 if resume is None else resume.longest_round_s
    bar = tqdm(total=max(0, settings.rounds - first), unit="round", desc="refining",
               disable=None if progress else True)
    try:
        for r in range(first, settings.rounds):
            round_start = time.monotonic()
            if r == first and resume is not None and resume.final and not _fits(settings, 0.0, 1, longest_s, n):
                break  # it ended with a final round: more rounds only with time for one
            # the last round is the schedule's, or the one after which another would not fit
            final = r == settings.rounds - 1 or (longest_s > 0 and not _fits(settings, round_start - clock0, 2,
                                                                               longest_s, n))
            # a final round brought forward by the budget searches at the last round's band
            global_shells, local_shells = _round_shells(settings, size, settings.rounds - 1 if final else r)
            gband = search_band(size, global_shells, device=device)
            lband = search_band(size, local_shells, device=device)
            rotmat = torch.empty(n, 3, 3, device=device)
            shift = torch.empty(n, 2, device=device)
            error = torch.empty(n, device=device)
            previous_confidence = confidence.to(device)
            confidence = previous_confidence.clone()
            # from round 1 on, particles whose pose the last global search singled out are only searched
            # locally around it (every particle is searched globally in round 0 and in the last round)
            local_only = (torch.zeros(n, dtype=torch.bool, device=device)
                          if pose is None or settings.local_confidence is None or final
                          else previous_confidence >= settings.local_confidence)
            accumulators = [FourierAccumulator(size, pad_factor=2, device=device) for _ in halves]
            for h, positions in enumerate(halves):
                reference = references[h]  # its own half map: the halves never meet (gold standard)
                # the global searches in batches of their own: each batch computes every grid rotation's slice
                is_local = local_only[torch.as_tensor(positions, device=device)].cpu().numpy()
                for part, local in ((positions[~is_local], False), (positions[is_local], True)):
                    for at in range(0, len(part), settings.batch_size):
                        where = part[at:at + settings.batch_size]
                        batch = dataset[rows[where]]
                        images = batch.images.to(device)
                        pixel_size = batch.pixel_size.to(device)
                        ctf = batch.ctf.to(device=device) if use_ctf else None
                        best, found_confidence = _search_particles(
                            reference, images, pixel_size, ctf,
                            None if pose is None else Pose(pose.rotmat[where], pose.shift_angst[where]), local,
                            settings, gband, lband, grids)
                        if found_confidence is not None:
                            confidence[where] = found_confidence.to(device)
                        rotmat[where], shift[where], error[where] = best.pose.rotmat, best.pose.shift_angst, best.error
                        accumulators[h].insert(images, best.pose.rotmat, best.pose.shift_angst / pixel_size[:, None],
                                               pixel_size, ctf)
            new = Pose(rotmat=rotmat, shift_angst=shift)
            change = None if pose is None else float(torch.rad2deg(geodesic_angle(pose.rotmat, new.rotmat)).median())
            pose = new
            unweighted = [a.volume(settings.wiener_eps) for a in accumulators]
            half_fsc = fsc(unweighted[0], unweighted[1], voxel_size=float(dataset.pixel_size))
            weighted = torch.stack([fsc_weighted(m, half_fsc.curve) for m in unweighted])
            references = [VoxelFourierVolume.from_real(m, pad_factor=2) for m in weighted]
            half_maps = torch.stack(unweighted).cpu()
            current = accumulators[0].merged(accumulators[1]).volume(settings.wiener_eps)
            record = RefineRound(round=r, global_shells=global_shells, local_shells=local_shells,
                                 mean_error=float(error.mean()), elapsed_s=time.monotonic() - clock0,
                                 pose_change_median_deg=change, half_map_fsc=half_fsc,
                                 confidence_median=float(confidence.median()),
                                 global_fraction=1.0 - float(local_only.float().mean()), final=final)
            longest_s = max(longest_s, time.monotonic() - round_start)
            history.append(record)
            bar.update(1)
            if on_round is not None:
                on_round(record, pose, current)
            if on_state is not None:
                on_state(RefineState(round=r, pose=pose, half_references=weighted, volume=current,
                                     half_volumes=half_maps, confidence=confidence.cpu(), final=final,
                                     longest_round_s=longest_s))
            if final:
                break
    finally:
        bar.close()
    check = None
    if pose is not None and settings.check_particles > 0:
        # the band of the last round (of a resumed, finished run: the one before this call)
        last = (_band_round(settings, history[-1]) if history
                else settings.rounds - 1 if resume is not None and resume.final else first - 1)
        check = check_half_maps(dataset, half_maps, settings, rows, halves, references, last, pose.shift_angst,
                                use_ctf, device)
    return RefineResult(pose=pose, volume=current.cpu(), rounds=history, half_volumes=half_maps,
                        half_rows=(rows[halves[0]], rows[halves[1]]), confidence=confidence.cpu(),
                        start_resolution_px=float(settings.start_resolution_px),
                        half_map_fsc=history[-1].half_map_fsc if history else  # (a resumed, finished run)
                        fsc(half_maps[0], half_maps[1], voxel_size=float(dataset.pixel_size)), check=check,
                        rows=rows)


@dataclasses.dataclass
class _SearchGrids:
    """The searches' grids of a :class:`RefineSettings`: SO(3) rotations and shifts of the global search,
    the local shifts, the successive local rotation cubes and the finest one, and the pose
    confidence's radius (°)."""

    rotations: torch.Tensor
    global_shifts: torch.Tensor
    local_shifts: torch.Tensor
    offsets: list[torch.Tensor]
    finest: torch.Tensor
    confidence_radius_deg: float
    #: the cascade that carries a start from elsewhere (an encoder's prediction, off by some 10-20°):
    #: a cube of twice the widest local step first, then the local steps and the finest
    initial: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, settings: RefineSettings, device) -> _SearchGrids:
        offsets = [local_offsets(step, device=device) for step in settings.local_steps_deg]
        finest = local_offsets(min(settings.local_steps_deg, default=1.0) / 2, device=device)
        widest = 2 * max(settings.local_steps_deg, default=4.0)
        return cls(rotations=so3_grid(settings.global_step_deg, device=device),
                   global_shifts=shift_grid(settings.shift_range_px, settings.shift_step_px, device=device),
                   local_shifts=shift_grid(1, settings.local_shift_step_px, device=device),
                   offsets=offsets, finest=finest, confidence_radius_deg=2 * settings.global_step_deg,
                   initial=[local_offsets(widest, device=device), *offsets, finest])


def _checked_half_sets(half_sets, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The two half sets (positions among ``n`` particles) as int64 arrays, or ValueError unless both
    are non-empty, disjoint and hold every position."""
    halves = tuple(np.asarray(h, dtype=np.int64) for h in half_sets)
    if len(halves) != 2 or min(len(h) for h in halves) == 0:
        raise ValueError(f"refinement needs two non-empty half sets, got sizes {[len(h) for h in halves]}")
    if not np.array_equal(np.sort(np.concatenate(halves)), np.arange(n)):
        raise ValueError("the half sets must be disjoint and hold every particle position once")
    return halves


def _search_particles(reference, images, pixel_size, ctf, last: Pose | None, local_only: bool,
                      settings: RefineSettings, gband, lband, grids: _SearchGrids, last_from_elsewhere: bool = False
                      ) -> tuple[SearchResult, torch.Tensor | None]:
    """One round's search of a batch against its half's ``reference``: the best pose and the pose
    confidence (None when not measured). Globally over SO(3) (the confidence from its best
    rotations), then locally with halving steps, and the last round's pose ``last`` touched up where it
    still explains the image better (``last_from_elsewhere``: a start not from this search, e.g. an
    encoder's, carried by the wider ``grids.initial`` cascade instead); or, with ``local_only``,
    locally around ``last`` only, from the second local step on."""
    search = (reference, images, pixel_size, lband)
    if local_only:
        found = last
        for offset in grids.offsets[1:]:
            found = local_search(*search, found, offset, grids.local_shifts, ctf).pose
        return local_search(*search, found, grids.finest, grids.local_shifts, ctf), None
    candidates = global_search(reference, images, pixel_size, gband, grids.rotations, ctf,
                               shifts_px=grids.global_shifts, top_k=max(2, settings.confidence_candidates),
                               distinct_rotations=True)
    confidence = pose_confidence(candidates, grids.confidence_radius_deg)
    found = Pose(candidates.pose.rotmat[:, 0], candidates.pose.shift_angst[:, 0])
    for offset in grids.offsets:
        found = local_search(*search, found, offset, grids.local_shifts, ctf).pose
    best = local_search(*search, found, grids.finest, grids.local_shifts, ctf)
    if last is None:
        return best, confidence
    kept = SearchResult(last, None)
    for offset in grids.initial if last_from_elsewhere else [grids.finest]:  # last round's pose, touched up
        kept = local_search(*search, kept.pose, offset, grids.local_shifts, ctf)
    better = kept.error < best.error
    return SearchResult(Pose(torch.where(better[:, None, None], kept.pose.rotmat, best.pose.rotmat),
                             torch.where(better[:, None], kept.pose.shift_angst, best.pose.shift_angst)),
                        torch.where(better, kept.error, best.error)), confidence


def extend_refinement(dataset, refined: RefineResult, rows: np.ndarray, half_sets: tuple[np.ndarray, np.ndarray],
                      settings: RefineSettings | None = None, use_ctf: bool = True,
                      device: torch.device | str = "cpu", progress: bool = True,
                      initial: Pose | None = None, ranks: tuple[int, int] | None = None) -> RefineResult:
    """Carry a refinement of a subset of particles over to all of them, each half apart.

    The rounds of a refinement need a good map, not every particle: run on a bounded subset, they
    cost the same whatever N. Then each particle of ``rows`` that the subset did not hold is searched
    once — globally over SO(3), then locally, in the last round's bands, exactly as in that round —
    against the final map of **its own** half set (``half_sets``: positions in ``rows``; every
    subset particle must be in the same half as in ``refined``), and the half maps are rebuilt from
    all particles (the subset's at their refined poses). The halves still never meet, so their FSC
    stays a gold standard. Cost: ``subset × rounds + N`` particle searches instead of ``N × rounds``.
    Returns the result for ``rows`` (poses, confidences, maps, FSC and the posterior-predictive check
    of the final half maps); its ``rounds`` are the subset's. ``initial``: poses (per position in
    ``rows``) from elsewhere — an encoder's — each carried by a local search from 2× the widest local
    step down and kept where it explains its image better than the global search's (a rank needs
    only its own particles' starts).

    ``ranks`` = (rank, world size) of an initialized ``torch.distributed`` process group (torchrun)
    that shares the work: rank r searches and inserts the particles at positions p ≡ r (mod world
    size) of ``rows``; the Fourier sums, poses and confidences are then summed over the ranks, so every
    rank returns the whole result, equal to one process's up to the order of the float sums."""
    from tqdm.auto import tqdm

    settings = settings or RefineSettings()
    device = torch.device(device)
    size = int(dataset.image_size)
    rows = np.asarray(rows)
    n = len(rows)
    halves = _checked_half_sets(half_sets, n)
    if refined.rows is None:
        raise ValueError("the refined result does not say which rows its poses belong to")
    # where each refined particle sits in ``rows``, and in which half it was refined (no loop over particles)
    size_rows = int(max(rows.max(initial=-1), refined.rows.max(initial=-1))) + 1
    position = np.full(size_rows, -1, np.int64)
    position[rows] = np.arange(n)
    refined_half = np.full(size_rows, -1, np.int64)
    refined_half[refined.half_rows[0]], refined_half[refined.half_rows[1]] = 0, 1
    half_of = np.empty(n, np.int64)
    for h, positions in enumerate(halves):
        half_of[positions] = h
    subset_positions = position[refined.rows]
    if (subset_positions < 0).any():
        raise ValueError(f"particle row {refined.rows[subset_positions < 0][0]} of the refined subset is not "
                         "among the rows to extend to")
    moved = half_of[subset_positions] != refined_half[refined.rows]
    if moved.any():
        row = refined.rows[moved][0]
        raise ValueError(f"particle row {row} is in half set {refined_half[row] + 1} of the refined subset but "
                         "not here")
    known = np.full(n, -1, np.int64)  # index in the refined result, -1 for particles to search
    known[subset_positions] = np.arange(len(refined.rows))
    use_ctf = bool(use_ctf and dataset.has_ctf)
    last_round = _band_round(settings, refined.rounds[-1]) if refined.rounds else settings.rounds - 1
    global_shells, local_shells = _round_shells(settings, size, last_round)
    gband, lband = search_band(size, global_shells, device=device), search_band(size, local_shells, device=device)
    grids = _SearchGrids.of(settings, device)
    # each half's final reference, FSC-weighted as the rounds weighted theirs
    references = [VoxelFourierVolume.from_real(fsc_weighted(m.to(device=device, dtype=torch.float32),
                                                            refined.half_map_fsc.curve), pad_factor=2)
                  for m in refined.half_volumes]
    rank, world = (0, 1) if ranks is None else ranks
    # zeros, not empty: with several ranks each fills its own particles and the sums make the whole
    rotmat = torch.zeros(n, 3, 3, dtype=torch.float64)
    shift = torch.zeros(n, 2, dtype=torch.float64)
    confidence = torch.zeros(n)
    accumulators = [FourierAccumulator(size, pad_factor=2, device=device) for _ in halves]
    mine = [positions[positions % world == rank] for positions in halves]
    bar = tqdm(total=sum(len(p) for p in mine), unit="particle", desc="all particles",
               disable=None if progress else True)
    try:
        for h, positions in enumerate(mine):
            for part, search in ((positions[known[positions] < 0], True), (positions[known[positions] >= 0], False)):
                for at in range(0, len(part), settings.batch_size):
                    where = part[at:at + settings.batch_size]
                    batch = dataset[rows[where]]
                    images, pixel_size = batch.images.to(device), batch.pixel_size.to(device)
                    ctf = batch.ctf.to(device=device) if use_ctf else None
                    if search:
                        start = None if initial is None else Pose(
                            initial.rotmat[where].to(device=device, dtype=torch.float32),
                            initial.shift_angst[where].to(device=device, dtype=torch.float32))
                        best, found_confidence = _search_particles(
                            references[h], images, pixel_size, ctf, start, False, settings, gband, lband, grids,
                            last_from_elsewhere=True)
                        pose = best.pose
                        confidence[where] = found_confidence.float().cpu()
                    else:
                        index = torch.as_tensor(known[where])
                        pose = Pose(refined.pose.rotmat[index].to(device=device, dtype=torch.float32),
                                    refined.pose.shift_angst[index].to(device=device, dtype=torch.float32))
                        confidence[where] = refined.confidence[index].float()
                    rotmat[where], shift[where] = pose.rotmat.double().cpu(), pose.shift_angst.double().cpu()
                    accumulators[h].insert(images, pose.rotmat, pose.shift_angst / pixel_size[:, None], pixel_size,
                                           ctf)
                    bar.update(len(where))
    finally:
        bar.close()
    if world > 1:
        _sum_over_ranks([rotmat, shift, confidence, *(a.grid for a in accumulators)], device)
    half_maps = torch.stack([a.volume(settings.wiener_eps) for a in accumulators])
    half_fsc = fsc(half_maps[0], half_maps[1], voxel_size=float(dataset.pixel_size))
    volume = accumulators[0].merged(accumulators[1]).volume(settings.wiener_eps)
    check = None
    if settings.check_particles > 0:  # the same seeded sample on every rank: the same check
        check = check_half_maps(dataset, half_maps, settings, rows, halves, None, last_round, shift.float(),
                                use_ctf, device)
    return RefineResult(pose=Pose(rotmat=rotmat, shift_angst=shift), volume=volume.cpu(), rounds=refined.rounds,
                        half_volumes=half_maps.cpu(), half_rows=(rows[halves[0]], rows[halves[1]]),
                        confidence=confidence, start_resolution_px=refined.start_resolution_px,
                        half_map_fsc=half_fsc, check=check, rows=rows)


def refine_particles(dataset, half_maps: torch.Tensor, half_sets: tuple[np.ndarray, np.ndarray],
                     settings: RefineSettings | None = None, initial: Pose | None = None,
                     start_resolution_px: float | None = None, use_ctf: bool = True,
                     device: torch.device | str = "cpu", progress: bool = True,
                     ranks: tuple[int, int] | None = None) -> RefineResult:
    """Pose every particle of ``dataset`` against the half maps of an earlier refinement (2, L, L, L,
    in the images' units) and rebuild half maps from these particles alone: each half set
    (``half_sets``, row positions) is searched against its own half map — globally, then locally, at
    the final round's bands of ``settings``, and from ``initial`` (e.g. an encoder's poses) where
    that explains an image better — so the new half maps stay a gold standard, as independent as the
    old ones (``start_resolution_px``: what those shared, default ``settings.start_resolution_px``).
    :func:`extend_refinement` with no particle refined before (``ranks``: the work split over a
    torchrun process group, as there)."""
    settings = settings or RefineSettings()
    if tuple(half_maps.shape) != (2,) + (int(dataset.image_size),) * 3:
        raise ValueError(f"the half maps are {tuple(half_maps.shape)}, the images need 2 × {dataset.image_size}³")
    half_fsc = fsc(half_maps[0], half_maps[1], voxel_size=float(dataset.pixel_size))
    nothing = np.zeros(0, np.int64)
    empty = RefineResult(pose=Pose(torch.zeros(0, 3, 3), torch.zeros(0, 2)), volume=half_maps.mean(0), rounds=[],
                         half_volumes=half_maps, half_rows=(nothing, nothing), confidence=torch.zeros(0),
                         start_resolution_px=float(settings.start_resolution_px if start_resolution_px is None
                                                   else start_resolution_px),
                         half_map_fsc=half_fsc, rows=nothing)
    return extend_refinement(dataset, empty, np.arange(len(dataset)), half_sets, settings, use_ctf=use_ctf,
                             device=device, progress=progress, initial=initial, ranks=ranks)


def _sum_over_ranks(tensors: list[torch.Tensor], device) -> None:
    """Sum each tensor in place over the ranks of the process group (one flat all-reduce, on
    ``device``: NCCL reduces GPU tensors, gloo CPU ones)."""
    import torch.distributed as dist

    flat = torch.cat([t.to(device=device, dtype=torch.float64).reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    at = 0
    for t in tensors:
        t.copy_(flat[at:at + t.numel()].reshape(t.shape).to(t.dtype))
        at += t.numel()


def check_half_maps(dataset, half_maps: torch.Tensor, settings: RefineSettings | None = None,
                    rows: np.ndarray | None = None, halves: tuple[np.ndarray, np.ndarray] | None = None,
                    references: list | None = None, round_index: int | None = None,
                    shift_angst: torch.Tensor | None = None, use_ctf: bool = True,
                    device: torch.device | str = "cpu") -> PredictiveCheck:
    """The posterior-predictive check (:mod:`cryoace.reconstruct.predictive_check`) of two half maps
    (2, L, L, L; real, the images' units) against their half sets, with the global search of
    ``settings`` at round ``round_index`` (default: its final band) and the particle radius of the
    half maps. ``rows``, ``halves``: as :func:`refine`'s; ``references``: the half maps as search
    references if already built (default: from ``half_maps``); ``shift_angst``: the particles' shifts
    (per position in ``rows``, Å) if known."""
    settings = settings or RefineSettings()
    size = int(dataset.image_size)
    rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
    halves = alternate_half_sets(len(rows)) if halves is None else halves
    if references is None:
        references = [VoxelFourierVolume.from_real(m.to(device=device, dtype=torch.float32), pad_factor=2)
                      for m in half_maps]
    round_index = settings.rounds if round_index is None else round_index
    grids = _SearchGrids.of(settings, device)
    return predictive_check(
        dataset, rows, halves, references,
        search_band(size, _round_shells(settings, size, round_index)[0], device=device),
        grids.rotations, grids.global_shifts, settings.confidence_candidates, grids.confidence_radius_deg,
        particle_radius_px(half_maps[0], half_maps[1]),
        shift_angst=shift_angst, use_ctf=bool(use_ctf and dataset.has_ctf), sample=settings.check_particles,
        batch_size=settings.batch_size, seed=settings.seed, device=device)


def _fits(settings: RefineSettings, elapsed_s: float, rounds: int, longest_s: float, n: int) -> bool:
    """Whether ``rounds`` more rounds, each as long as the longest so far (``longest_s``, over ``n``
    particles), and the reserve fit in the rounds' budget after ``elapsed_s`` of it."""
    if settings.max_time_s is None:
        return True
    reserve = settings.reserve_s(longest_s / n) if callable(settings.reserve_s) else settings.reserve_s
    return elapsed_s + rounds * longest_s + reserve <= settings.max_time_s


def _band_round(settings: RefineSettings, record: RefineRound) -> int:
    """The round of the schedule whose bands ``record``'s round searched (a final round brought
    forward by the budget searched at the last round's)."""
    return settings.rounds - 1 if record.final else record.round


def _round_shells(settings: RefineSettings, size: int, r: int) -> tuple[int, int]:
    """The global and local search bands (shells) of round ``r``."""
    local_shells = min(size // 2, settings.start_shells + r * settings.shells_per_round)
    return min(settings.global_max_shells, settings.global_shells + 2 * r, local_shells), local_shells
