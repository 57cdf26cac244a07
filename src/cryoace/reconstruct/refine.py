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
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from ..evaluate.fsc import FSCResult, fsc
from ..evaluate.gold_standard import MIN_GAIN_OVER_START, PredictiveCheck
from ..physics.forward import VoxelFourierVolume
from ..physics.fourier import fft3_centered, ifft3_centered, radial_shell_index
from ..physics.rotations import geodesic_angle, random_rotmat
from ..types import Pose
from .backproject import FourierAccumulator
from .pose_search import (
    SearchResult,
    centred_shift_grid,
    global_search,
    local_offsets,
    local_search,
    pose_confidence,
    pose_score,
    search_band,
    shift_grid,
    so3_grid,
)
from .predictive_check import particle_radius_px, predictive_check

__all__ = ["RefineSettings", "RefineRound", "RefineResult", "RefineState", "LocalFirst", "refine", "extend_refinement",
           "coarse_steps", "score_threshold", "MIN_REACHABLE", "SCORE_MARGIN", "FINAL_ROUND_COST", "final_round_due",
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
    shift_range_px, shift_step_px : global shift grid ±range in steps of step (px) around each particle's
                      centring shift, and around 0;
    centring_radius : the centring shift of a global search (:func:`~cryoace.reconstruct.pose_search.
                      centring_shifts`, a coarse search in its band) is looked for within this fraction
                      of the box around the centre (0: the shift grid is around 0 only — it then misses
                      most particles shifted more than ~3 px: noise-free demo particles 3–4 px off-centre
                      were 6.5 % beyond 20° of their pose, 5–6 px off 59 %);
    local_shift_step_px : local shift grid ±1 step; the finest local search (half the smallest angular
                      step) halves it too, so shifts end on a grid of half this step at no extra cost
                      (ending on the 0.5 px grid cost the −10 dB demo's map 0.014 px of FSC-0.5).
    wiener_eps      : Wiener constant of the reconstruction (relative to the mean summed CTF²).
    batch_size      : images per search batch.
    max_time_s      : wall-time budget of the rounds (s, from this call's start; None = all rounds):
                      a round after which the final one (``FINAL_ROUND_COST`` times the longest
                      so far) and ``reserve_s`` would not fit is made the last one — searched at the last
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
    local_first     : where :func:`extend_refinement` is given poses from elsewhere (an encoder's), search
                      each particle only locally from its pose and fall back to the global search where
                      the local result's pose score stays below a threshold calibrated on a sample
                      (:class:`LocalFirst`); False: every such particle is searched globally as well.
    calibration_particles : the sample, searched both ways (or taken from the refined subset), that sets
                      the local search's reach (the encoder's error) and the score threshold.
    max_false_accept : at most this fraction of the sample's local results that the threshold accepts
                      may explain their image worse than the reference pose (:class:`LocalFirst`). On
                      3000 new −10 dB demo particles, 0.05 → 0.01 cut the wrong poses (beyond 15°) from
                      7.2 % to 2.3 % for 5 % more search time; 0 to 0.1 % for 1.7× the time
                      (bench/results/refine_new_particles_false_accept*_m10_cpu.json).
    max_carry_radius_deg : beyond this encoder error (80th percentile on the sample) local searches are
                      not tried: every particle is searched globally.
    score_rotations : random rotations (seeded, shared) that a pose score compares each pose with
                      (:func:`~cryoace.reconstruct.pose_search.pose_score`).
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
    centring_radius: float = 0.15
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
    local_first: bool = True
    calibration_particles: int = 256
    max_false_accept: float = 0.01
    max_carry_radius_deg: float = 32.0
    score_rotations: int = 64


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
    #: each particle's pose score (:func:`~cryoace.reconstruct.pose_search.pose_score`; None if not measured)
    score: torch.Tensor | None = None
    #: how a final pass used poses from elsewhere (None: it had none)
    local_first: LocalFirst | None = None

    @property
    def resolved_beyond_start(self) -> bool:
        """Whether the halves agree (FSC 0.143) clearly beyond the start's low-pass — 25 % further
        in frequency (:data:`~cryoace.evaluate.gold_standard.MIN_GAIN_OVER_START`). When they do not,
        the run has resolved nothing the start did not already hold."""
        return self.half_map_fsc.resolution(0.143).px * MIN_GAIN_OVER_START <= self.start_resolution_px

    def star_columns(self) -> dict[str, np.ndarray]:
        """The per-particle columns for poses.star, in the order of ``rows``: each particle's half set
        (``rlnRandomSubset``: 1 or 2), pose confidence (``cryoacePoseConfidence``; NaN where no global
        search measured it: a pose kept from a local search) and pose score (``cryoacePoseScore``, when
        measured)."""
        rows = np.asarray(self.rows)
        order = np.argsort(rows)
        subset = np.zeros(len(rows), dtype=np.int64)
        for h, half in enumerate(self.half_rows):
            subset[order[np.searchsorted(rows, half, sorter=order)]] = h + 1
        columns = {"rlnRandomSubset": subset, "cryoacePoseConfidence": self.confidence.double().numpy()}
        if self.score is not None:
            columns["cryoacePoseScore"] = self.score.double().numpy()
        return columns


#: a local result whose pose score is this much below its reference pose's explains its image worse
SCORE_MARGIN = 1.0
#: below this fraction of given poses within a local search's reach, a final pass searches every particle
#: globally without them (carrying them would cost more than it saves)
MIN_REACHABLE = 0.2
#: what the final round costs, in rounds as long as the longest so far: it searches every particle
#: globally at the schedule's last band and scores every pose (measured 1.2–1.8× on the panel's spike
#: and S2 at SNR 0.05 — 132 s after rounds of at most 72 s; budgeted as one round, jobs ended up to 38 s late)
FINAL_ROUND_COST = 2.0


@dataclasses.dataclass
class LocalFirst:
    """How a final pass (:func:`extend_refinement`) used poses from elsewhere — an encoder's — instead
    of a global search for every particle, calibrated on a sample of ``sample`` particles with
    reference poses (the refined subset's, or a global search's):

    encoder_median_deg : the given poses' median angle to the references';
    reachable, radius_deg : the fraction of them within ``max_carry_radius_deg``, and those's
                      80th-percentile angle (it sets the coarse cubes that carry them, ``coarse_steps_deg``);
    threshold       : the pose score from which a particle's local result is kept (inf: none is; every
                      particle is searched globally, without its given pose — fewer than
                      :data:`MIN_REACHABLE` were near enough — or with it — the score could not tell
                      right from wrong);
    sample_accepted, sample_false_accept : the fraction of the sample whose local result the threshold
                      keeps, and the fraction of those whose pose explains its image worse than the
                      reference pose (a pose score :data:`SCORE_MARGIN` lower), at most
                      ``max_false_accept`` (the setting);
    particles, fell_back : particles searched from their given pose, and those of them searched
                      globally after all (score below the threshold)."""

    sample: int
    encoder_median_deg: float
    radius_deg: float
    coarse_steps_deg: list[float]
    threshold: float
    sample_accepted: float
    sample_false_accept: float
    reachable: float = 1.0
    particles: int = 0
    fell_back: int = 0
    max_false_accept: float = 0.01

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.threshold)

    def to_dict(self) -> dict:
        """For JSON: the fields, with None for an infinite threshold or radius."""
        return {key: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for key, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        """One line for the log."""
        head = (f"the given poses were {self.encoder_median_deg:.1f}° from the reference poses of {self.sample} "
                f"particles (median; {100 * self.reachable:.0f} % within reach of a local search)")
        if not self.enabled:
            return head + ": every particle searched globally"
        return (head + f"; local search first (cubes from {self.coarse_steps_deg[0]:g}°), kept where the pose score "
                f"≥ {self.threshold:.2f} ({100 * self.sample_accepted:.0f} % of the sample, "
                f"{100 * self.sample_false_accept:.1f} % of those off their reference): "
                f"{self.particles - self.fell_back} of {self.particles} particles kept, {self.fell_back} searched "
                "globally")


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
    score = torch.full((n,), math.nan)
    longest_s = 0.0 if resume is None else resume.longest_round_s
    bar = tqdm(total=max(0, settings.rounds - first), unit="round", desc="refining",
               disable=None if progress else True)
    try:
        for r in range(first, settings.rounds):
            round_start = time.monotonic()
            if r == first and resume is not None and resume.final and not _fits(
                    settings, 0.0, FINAL_ROUND_COST, longest_s, n):
                break  # it ended with a final round: more rounds only with time for one
            final = final_round_due(settings, r, round_start - clock0, longest_s, n)
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
                        images, pixel_size, ctf = _load_batch(dataset, rows[where], use_ctf, device)
                        best, found_confidence = _search_particles(
                            reference, images, pixel_size, ctf,
                            None if pose is None else Pose(pose.rotmat[where], pose.shift_angst[where]), local,
                            settings, gband, lband, grids)
                        if found_confidence is not None:
                            confidence[where] = found_confidence.to(device)
                        rotmat[where], shift[where], error[where] = best.pose.rotmat, best.pose.shift_angst, best.error
                        if final:  # the final poses' scores (poses.star) against the references they were found in
                            score[where] = pose_score(reference, images, pixel_size, lband, best.pose,
                                                      grids.score_rotations, ctf).cpu()
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
                        rows=rows, score=score if history and history[-1].final else None)


@dataclasses.dataclass
class _SearchGrids:
    """The searches' grids of a :class:`RefineSettings`: SO(3) rotations and shifts of the global search,
    the local shifts, the successive local rotation cubes and the finest one with its finer shifts, the
    pose confidence's radius (°) and the pose score's random rotations."""

    rotations: torch.Tensor
    global_shifts: torch.Tensor
    local_shifts: torch.Tensor
    offsets: list[torch.Tensor]
    finest: torch.Tensor
    finest_shifts: torch.Tensor
    confidence_radius_deg: float
    score_rotations: torch.Tensor
    #: the wider cubes (searched in the global band) that carry a start from elsewhere (an encoder's
    #: prediction, some 10-20° off) before the local steps: by default one of twice the widest local step
    coarse: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, settings: RefineSettings, device) -> _SearchGrids:
        offsets = [local_offsets(step, device=device) for step in settings.local_steps_deg]
        finest = local_offsets(min(settings.local_steps_deg, default=1.0) / 2, device=device)
        generator = torch.Generator().manual_seed(settings.seed + 101)
        return cls(rotations=so3_grid(settings.global_step_deg, device=device),
                   global_shifts=shift_grid(settings.shift_range_px, settings.shift_step_px, device=device),
                   local_shifts=shift_grid(1, settings.local_shift_step_px, device=device),
                   offsets=offsets, finest=finest,
                   finest_shifts=shift_grid(1, settings.local_shift_step_px / 2, device=device),
                   confidence_radius_deg=2 * settings.global_step_deg,
                   score_rotations=random_rotmat(settings.score_rotations, generator=generator).to(device),
                   coarse=[local_offsets(step, device=device) for step in coarse_steps(settings, 0.0)])


def coarse_steps(settings: RefineSettings, radius_deg: float) -> list[float]:
    """The steps (°, widest first) of the cubes that carry a start whose error is about ``radius_deg``
    before the local steps: twice the widest local step, doubled until 2.5 steps reach the radius
    (a cube's search moves a pose by up to ~1.5 steps, and the finer ones add as much again)."""
    widest = max(settings.local_steps_deg, default=4.0)
    steps = [2 * widest]
    while 2.5 * steps[0] < radius_deg:
        steps.insert(0, 2 * steps[0])
    return steps


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
    encoder's, carried by :func:`_carry` instead); or, with ``local_only``, locally around ``last``
    only, from the second local step on."""
    search = (reference, images, pixel_size, lband)
    if local_only:
        found = last
        for offset in grids.offsets[1:]:
            found = local_search(*search, found, offset, grids.local_shifts, ctf).pose
        return local_search(*search, found, grids.finest, grids.finest_shifts, ctf), None
    candidates = global_search(reference, images, pixel_size, gband, grids.rotations, ctf,
                               shifts_px=_global_shifts(reference, images, pixel_size, ctf, gband, grids, settings),
                               top_k=max(2, settings.confidence_candidates), distinct_rotations=True)
    confidence = pose_confidence(candidates, grids.confidence_radius_deg)
    found = Pose(candidates.pose.rotmat[:, 0], candidates.pose.shift_angst[:, 0])
    for offset in grids.offsets:
        found = local_search(*search, found, offset, grids.local_shifts, ctf).pose
    best = local_search(*search, found, grids.finest, grids.finest_shifts, ctf)
    if last is None:
        return best, confidence
    kept = (_carry(reference, images, pixel_size, ctf, last, grids, gband, lband) if last_from_elsewhere
            else local_search(*search, last, grids.finest, grids.finest_shifts, ctf))  # last round's, touched up
    return _better(kept, best), confidence


def _global_shifts(reference, images, pixel_size, ctf, gband, grids: _SearchGrids,
                   settings: RefineSettings) -> torch.Tensor:
    """The global search's shifts: the grid around each image's centring shift and around 0 (B, 2J, 2) px
    (:func:`~cryoace.reconstruct.pose_search.centred_shift_grid`), or around 0 only (J, 2) without centring."""
    if settings.centring_radius <= 0:
        return grids.global_shifts
    return centred_shift_grid(reference, images, pixel_size, gband, settings.centring_radius * images.shape[-1],
                              grids.global_shifts, ctf)


def _carry(reference, images, pixel_size, ctf, start: Pose, grids: _SearchGrids, gband, lband) -> SearchResult:
    """A start from elsewhere (an encoder's pose) carried to the nearest optimum: the coarse cubes in the
    global band (their steps need no finer detail, and it is cheap), then the local steps and the
    finest in the local band."""
    found = start
    for offset in grids.coarse:
        found = local_search(reference, images, pixel_size, gband, found, offset, grids.global_shifts, ctf).pose
    for offset in grids.offsets:
        found = local_search(reference, images, pixel_size, lband, found, offset, grids.local_shifts, ctf).pose
    return local_search(reference, images, pixel_size, lband, found, grids.finest, grids.finest_shifts, ctf)


def _better(a: SearchResult, b: SearchResult) -> SearchResult:
    """Per image, whichever of two search results has the lower error."""
    pick = a.error < b.error
    return SearchResult(Pose(torch.where(pick[:, None, None], a.pose.rotmat, b.pose.rotmat),
                             torch.where(pick[:, None], a.pose.shift_angst, b.pose.shift_angst)),
                        torch.where(pick, a.error, b.error))


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
    Returns the result for ``rows`` (poses, confidences, pose scores, maps, FSC and the
    posterior-predictive check of the final half maps); its ``rounds`` are the subset's.

    ``initial``: poses (per position in ``rows``) from elsewhere — an encoder's. With
    ``settings.local_first`` each particle is then searched **locally** from its pose (coarse cubes as
    wide as the poses' error needs, then the local steps) and kept where its pose score
    (:func:`~cryoace.reconstruct.pose_search.pose_score`) reaches a threshold; only the others fall
    back to the global search (keeping the local result where it explains the image better). The
    reach and the threshold are calibrated on ``settings.calibration_particles`` particles with
    reference poses — refined subset particles, or else particles searched globally as well — so that
    at most ``settings.max_false_accept`` of the kept local results explain their image worse than
    the reference pose (:class:`LocalFirst`, the result's ``local_first``): good poses save the global search, poor
    ones (a wrong frame, noisy images) cost one local search more. Without ``local_first`` every
    particle is searched globally and the given pose, carried locally, kept where it explains its
    image better.

    ``ranks`` = (rank, world size) of an initialized ``torch.distributed`` process group (torchrun)
    that shares the work: rank r searches and inserts the particles at positions p ≡ r (mod world
    size) of ``rows`` (and needs only their ``initial`` poses); the Fourier sums, poses, confidences,
    scores and the calibration are summed over the ranks, so every rank returns the whole result,
    equal to one process's up to the order of the float sums."""
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
    ctx = _PassContext(dataset, rows, references, settings, grids, gband, lband, use_ctf, device, world)

    def refined_pose(where: np.ndarray) -> Pose:
        return refined.pose[torch.as_tensor(known[where])].to(device=device, dtype=torch.float32)

    def given_pose(where: np.ndarray) -> Pose:
        return initial[torch.as_tensor(where)].to(device=device, dtype=torch.float32)

    plan, searched = None, []
    if initial is not None and settings.local_first and (known < 0).any():
        plan, searched = _calibrate_local_first(ctx, half_of, known, refined_pose, given_pose, rank)
        if plan.reachable < MIN_REACHABLE:  # e.g. an encoder in another frame: its poses would only cost time
            initial = None
    done = np.zeros(n, dtype=bool)  # sample particles the calibration already searched globally
    for _, where, _, _ in searched:
        done[where] = True
    # zeros, not empty: with several ranks each fills its own particles and the sums make the whole
    rotmat = torch.zeros(n, 3, 3, dtype=torch.float64)
    shift = torch.zeros(n, 2, dtype=torch.float64)
    confidence = torch.zeros(n)
    score = torch.zeros(n)
    accumulators = [FourierAccumulator(size, pad_factor=2, device=device) for _ in halves]
    mine = [positions[positions % world == rank] for positions in halves]
    bar = tqdm(total=sum(len(p) for p in mine), unit="particle", desc="all particles",
               disable=None if progress else True)
    fell_back = sum(len(where) for _, where, _, _ in searched)  # the calibration searched these globally
    carried_grids = None if plan is None else _plan_grids(grids, plan)

    def keep(h: int, where: np.ndarray, batch, pose: Pose, found_confidence: torch.Tensor | None,
             found_score: torch.Tensor | None = None) -> None:
        images, pixel_size, ctf = batch
        rotmat[where], shift[where] = pose.rotmat.double().cpu(), pose.shift_angst.double().cpu()
        confidence[where] = math.nan if found_confidence is None else found_confidence.float().cpu()
        if found_score is None:
            found_score = pose_score(references[h], images, pixel_size, lband, pose, grids.score_rotations, ctf)
        score[where] = found_score.float().cpu()
        accumulators[h].insert(images, pose.rotmat, pose.shift_angst / pixel_size[:, None], pixel_size, ctf)
        bar.update(len(where))

    try:
        for h, where, pose, found_confidence in searched:  # the calibration's global searches
            keep(h, where, ctx.load(where), pose, found_confidence)
        for h, positions in enumerate(mine):
            for where in ctx.batches(positions[known[positions] >= 0]):  # the subset: at their refined poses
                keep(h, where, ctx.load(where), refined_pose(where), refined.confidence[torch.as_tensor(known[where])])
            to_search = positions[(known[positions] < 0) & ~done[positions]]
            if plan is not None and plan.enabled:  # locally from the given poses; the global search as fallback
                global_part = []
                for where in ctx.batches(to_search):
                    batch = ctx.load(where)
                    carried = _carry(references[h], *batch, given_pose(where), carried_grids, gband, lband)
                    images, pixel_size, ctf = batch
                    carried_score = pose_score(references[h], images, pixel_size, lband, carried.pose,
                                               grids.score_rotations, ctf)
                    good = (carried_score >= plan.threshold).cpu().numpy()
                    mask = torch.as_tensor(good, device=device)
                    if good.any():
                        keep(h, where[good], tuple(None if x is None else x[mask] for x in batch), carried.pose[mask],
                             None, carried_score[mask])
                    rotmat[where[~good]] = carried.pose.rotmat[~mask].double().cpu()
                    shift[where[~good]] = carried.pose.shift_angst[~mask].double().cpu()
                    global_part.append(where[~good])
                global_part = np.concatenate(global_part) if global_part else to_search[:0]
                fell_back += len(global_part)
                for where in ctx.batches(global_part):  # in full batches: a global search's cost is per batch
                    batch = ctx.load(where)
                    carried = Pose(rotmat[where], shift[where]).to(device=device, dtype=torch.float32)
                    best, found_confidence = _search_particles(references[h], *batch, carried, False, settings,
                                                               gband, lband, grids)
                    keep(h, where, batch, best.pose, found_confidence)
            else:
                for where in ctx.batches(to_search):
                    batch = ctx.load(where)
                    best, found_confidence = _search_particles(
                        references[h], *batch, None if initial is None else given_pose(where), False, settings,
                        gband, lband, grids, last_from_elsewhere=True)
                    keep(h, where, batch, best.pose, found_confidence)
    finally:
        bar.close()
    if world > 1:
        counts = torch.tensor([float(fell_back)])
        _sum_over_ranks([rotmat, shift, confidence, score, counts, *(a.grid for a in accumulators)], device)
        fell_back = int(counts.item())
    if plan is not None:
        plan = dataclasses.replace(plan, particles=int((known < 0).sum()) if plan.enabled else 0,
                                   fell_back=fell_back if plan.enabled else 0)
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
                        half_map_fsc=half_fsc, check=check, rows=rows, score=score, local_first=plan)


@dataclasses.dataclass
class _PassContext:
    """What a final pass's batches share: the dataset and its rows, each half's reference, the
    settings, grids and bands."""

    dataset: object
    rows: np.ndarray
    references: list
    settings: RefineSettings
    grids: _SearchGrids
    gband: object
    lband: object
    use_ctf: bool
    device: torch.device
    world: int

    def batches(self, positions: np.ndarray):
        for at in range(0, len(positions), self.settings.batch_size):
            yield positions[at:at + self.settings.batch_size]

    def load(self, where: np.ndarray) -> tuple:
        """(images, pixel sizes, CTF or None) of the particles at positions ``where``, on the device."""
        return _load_batch(self.dataset, self.rows[where], self.use_ctf, self.device)


def _load_batch(dataset, rows: np.ndarray, use_ctf: bool, device) -> tuple:
    """(images, pixel sizes, CTF or None) of the dataset's ``rows``, on ``device``."""
    batch = dataset[rows]
    return batch.images.to(device), batch.pixel_size.to(device), batch.ctf.to(device=device) if use_ctf else None


def _plan_grids(grids: _SearchGrids, plan: LocalFirst) -> _SearchGrids:
    """The grids with the coarse cubes of a calibrated local-first plan."""
    device = grids.finest.device
    return dataclasses.replace(grids, coarse=[local_offsets(step, device=device) for step in plan.coarse_steps_deg])


def _calibrate_local_first(ctx: _PassContext, half_of: np.ndarray, known: np.ndarray, refined_pose, given_pose,
                           rank: int) -> tuple[LocalFirst, list[tuple[int, np.ndarray, Pose, torch.Tensor]]]:
    """The local-first plan of a final pass (:class:`LocalFirst`), from a seeded sample: refined subset
    particles when there are any (their refined poses are the references), else particles to search
    (a global search gives theirs). Each rank measures the sample particles it owns; the sums over the
    ranks make every rank's plan the same. Also returns the sample particles this rank searched
    globally — (half, positions, pose, confidence) per batch, each pose the better of the global
    search's and the carried start's — which need no second search."""
    settings, grids, device = ctx.settings, ctx.grids, ctx.device
    pool = np.flatnonzero(known >= 0)
    from_subset = len(pool) > 0
    pool = pool if from_subset else np.flatnonzero(known < 0)
    generator = np.random.default_rng(settings.seed + 13)
    sample = np.sort(generator.choice(pool, min(settings.calibration_particles, len(pool)), replace=False))
    count = len(sample)
    reference = torch.zeros(count, 3, 3, dtype=torch.float64)
    reference_score = torch.zeros(count, dtype=torch.float64)
    given = torch.zeros(count, 3, 3, dtype=torch.float64)
    given_shift = torch.zeros(count, 2, dtype=torch.float64)
    index_of = {int(p): i for i, p in enumerate(sample)}
    owned = [sample[(sample % ctx.world == rank) & (half_of[sample] == h)] for h in range(2)]
    searched = []  # (half, positions, SearchResult, confidence) of the sample's global searches
    for h in range(2):
        for where in ctx.batches(owned[h]):
            at = torch.as_tensor([index_of[int(p)] for p in where])
            start = given_pose(where)
            given[at], given_shift[at] = start.rotmat.double().cpu(), start.shift_angst.double().cpu()
            images, pixel_size, ctf = batch = ctx.load(where)
            if from_subset:
                found = refined_pose(where)
            else:
                best, confidence = _search_particles(ctx.references[h], *batch, None, False, settings, ctx.gband,
                                                     ctx.lband, grids)
                searched.append((h, where, best, confidence))
                found = best.pose
            reference[at] = found.rotmat.double().cpu()
            reference_score[at] = pose_score(ctx.references[h], images, pixel_size, ctx.lband, found,
                                             grids.score_rotations, ctf).double().cpu()
    if ctx.world > 1:
        _sum_over_ranks([reference, reference_score, given, given_shift], device)
    error = torch.rad2deg(geodesic_angle(given, reference))
    reachable = error <= settings.max_carry_radius_deg
    # the reach the near starts need (the far ones are left to the score and the global search)
    radius = float(torch.quantile(error[reachable], 0.8)) if reachable.any() else math.inf
    plan = LocalFirst(sample=count, encoder_median_deg=float(error.median()), radius_deg=radius,
                      coarse_steps_deg=coarse_steps(settings, min(radius, settings.max_carry_radius_deg)),
                      threshold=math.inf, sample_accepted=0.0, sample_false_accept=0.0,
                      reachable=float(reachable.double().mean()), max_false_accept=settings.max_false_accept)
    if plan.reachable < MIN_REACHABLE:
        return plan, [(h, where, best.pose, confidence) for h, where, best, confidence in searched]
    carried_grids = _plan_grids(grids, plan)
    sample_score = torch.zeros(count, dtype=torch.float64)
    kept = []
    for h in range(2):
        for where in ctx.batches(owned[h]):
            at = torch.as_tensor([index_of[int(p)] for p in where])
            batch = ctx.load(where)
            start = Pose(given[at], given_shift[at]).to(device=device, dtype=torch.float32)
            carried = _carry(ctx.references[h], *batch, start, carried_grids, ctx.gband, ctx.lband)
            if searched:  # (the same batches, in the same order)
                _, _, best, confidence = searched[len(kept)]
                kept.append((h, where, _better(carried, best).pose, confidence))
            images, pixel_size, ctf = batch
            sample_score[at] = pose_score(ctx.references[h], images, pixel_size, ctx.lband, carried.pose,
                                          grids.score_rotations, ctf).double().cpu()
    if ctx.world > 1:
        _sum_over_ranks([sample_score], device)
    # a local result is off where it explains its image clearly worse than the reference pose does (by
    # fit, not by angle: a pose at a (pseudo)symmetry mate of the reference is as good)
    off = (sample_score < reference_score - SCORE_MARGIN).double()
    threshold, accepted, false_accept = score_threshold(sample_score, off, settings.max_false_accept)
    return dataclasses.replace(plan, threshold=threshold, sample_accepted=accepted,
                               sample_false_accept=false_accept), kept


def score_threshold(score: torch.Tensor, off: torch.Tensor, max_false_accept: float) -> tuple[float, float, float]:
    """The lowest score threshold whose kept sample (score ≥ it) has at most ``max_false_accept`` of its
    members off their reference (``off``: 1/0); with the kept fraction and its false-accept rate.
    (inf, 0, 0) when no threshold keeps the rate."""
    order = torch.argsort(score, descending=True)
    wrong = torch.cumsum(off[order], 0) / torch.arange(1, len(order) + 1, dtype=torch.float64)
    fine = torch.nonzero(wrong <= max_false_accept).flatten()
    if len(fine) == 0:
        return math.inf, 0.0, 0.0
    k = int(fine[-1]) + 1
    return float(score[order[k - 1]]), k / len(order), float(wrong[k - 1])


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


def final_round_due(settings: RefineSettings, round_index: int, elapsed_s: float, longest_round_s: float,
                    particles: int) -> bool:
    """Whether round ``round_index``, starting ``elapsed_s`` into the rounds' budget, must be the final
    one: it is the schedule's last, or after it the final round (``FINAL_ROUND_COST`` rounds as long
    as the longest so far, ``longest_round_s`` over ``particles``) and the reserve would not fit."""
    if round_index == settings.rounds - 1:
        return True
    return longest_round_s > 0 and not _fits(settings, elapsed_s, 1 + FINAL_ROUND_COST, longest_round_s, particles)


def _fits(settings: RefineSettings, elapsed_s: float, rounds: float, longest_s: float, n: int) -> bool:
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
