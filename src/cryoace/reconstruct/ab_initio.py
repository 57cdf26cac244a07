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

**Several runs** (:func:`ab_initio_starts`). At low SNR a run now and then falls into a wrong map
(the demo molecule at SNR 0.1: about one run in five), and a run whose schedule is cut short far more
often; so the run keeps several, each with its whole schedule (under a time budget, as many as fit),
keeps the one whose map explains the images best (:func:`mean_search_error`, all scored on the same
particles) and asks whether another run found that map too (:func:`start_consensus`): runs that
found the right map agree after alignment near the band's limit, a map that one run fell into agrees
with none. The gold standard withholds the resolution when none does (the refinement from a wrong
map otherwise reproduces it in both half sets and its FSC looks fine).

**Independent half sets** (:func:`ab_initio_half_sets`). A wrong ab initio map is the one thing the
refinement's gold standard cannot see: both halves start from it, both reproduce it, and their FSC
looks fine. So the run builds the start twice, from the two half sets apart (a few starts each),
keeps in each the map that explains its own particles best (lowest search error), carries the second
into the frame of the first by map alignment (rotation, shift, hand:
:func:`~cryoace.evaluate.map_align.half_map_fsc`) and measures how far they agree (FSC 0.5, at the ab
initio's own resolution). Right maps found from disjoint particles agree near the band's limit; a
wrong one does not agree with a right one, nor, in general, with another wrong one (measured on ADK
and the S2 protomer at SNR 0.1: pairs of right maps 5.6–6.4 px, pairs with a wrong map 7.5–9.7 px in
a 64-px box). Agreement confirms, it does not choose: featureless maps (the particles' rotational
average) agree with each other as well as right maps do; the search error tells them apart. How far
the kept pair agrees is reported with the gold standard, which withholds the resolution when the
two halves never found the same structure (:mod:`cryoace.evaluate.gold_standard`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from ..evaluate.fsc import FSCResult
from ..physics.forward import VoxelFourierVolume
from ..physics.fourier import radial_distance
from .backproject import FourierAccumulator
from .pose_search import (
    band_coefficients,
    centred_shift_grid,
    global_search,
    pose_posterior,
    search_band,
    shift_grid,
    so3_grid,
)

__all__ = ["AbInitioSettings", "AbInitioIteration", "AbInitioResult", "ab_initio", "mean_search_error",
           "blob_volume", "ab_initio_starts", "HalfSetsAbInitio", "ab_initio_half_sets",
           "start_consensus"]


@dataclasses.dataclass
class AbInitioSettings:
    """The ab initio schedule (angles in degrees, shifts in px, bands in Fourier shells of the box).

    iterations        : stochastic EM iterations (fewer if ``max_time_s`` runs out first).
    batch_size        : particles drawn at random per iteration (at most half of them, so that the
                        runs of different seeds differ even on a few hundred particles).
    top_k             : candidate poses per particle in the expectation.
    step_deg          : spacing of the SO(3) search grid.
    shift_range_px    : shift grid ±range (px) in steps of 1 px around 0 (and around each image's
                        centring shift, with ``centring_radius``).
    centring_radius   : > 0: each image's centring shift (:func:`~cryoace.reconstruct.pose_search.
                        centring_shifts` against the current map) is looked for within this fraction of
                        the box, and the grid is searched around it as well as around 0. Off by default:
                        unlike the refinement's, it did not measurably help — with ±1 px grids, the S2
                        protomer at SNR 0.05 (2000 particles, 180 s) reached 5.71/6.04 px against the
                        truth instead of 6.32/7.41 (two seeds), but the −10 dB demo 6.26/5.70 instead of
                        5.25/5.76, and 600 demo particles (16 iterations) 9.98/9.81 instead of 5.50/12.97:
                        within the spread between seeds, which the several starts are there for.
    start_shells, end_shells : band of the first and of the last iteration.
    start_temperature : posterior temperature of the first iteration (annealed to 1).
    memory            : images the map remembers (Fourier sums decay by 1 − batch_size/memory).
    wiener_eps        : Wiener constant of the map (relative to the mean summed CTF²).
    seed              : of the batch draws.
    max_time_s        : wall-time budget (None = all iterations): the band and the temperature follow
                        whichever is further along, the iterations or the time, and the iteration
                        after which another one would not fit is made the last (final band,
                        temperature 1), so a run cut short by its budget still ends annealed.
    """

    iterations: int = 30
    batch_size: int = 300
    top_k: int = 20
    step_deg: float = 12.0
    shift_range_px: int = 2
    centring_radius: float = 0.0
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
    # At most half the particles per batch: with the whole set in every batch, a run would be
    # deterministic and runs with different seeds identical (their agreement would check nothing).
    batch_size = min(settings.batch_size, max(1, (len(rows) + 1) // 2))
    decay = max(0.0, 1.0 - batch_size / max(settings.memory, batch_size))
    generator = np.random.default_rng(settings.seed)
    accumulator = FourierAccumulator(size, pad_factor=2, device=device)
    history: list[AbInitioIteration] = []
    start = time.monotonic()
    last = max(1, settings.iterations - 1)
    bar = tqdm(total=settings.iterations, unit="it", desc="ab initio", disable=None if progress else True)
    try:
        took = 0.0  # the last iteration's wall time
        for i in range(settings.iterations):
            began = time.monotonic() - start
            along, final = i / last, i == settings.iterations - 1
            if settings.max_time_s is not None and i > 0:  # a budget that ends first brings the schedule forward
                final = final or began + 2 * took > settings.max_time_s
                along = 1.0 if final else max(along, min(1.0, (began + took) / settings.max_time_s))
            shells = round(settings.start_shells + (settings.end_shells - settings.start_shells) * along)
            temperature = float(settings.start_temperature) ** (1 - along)
            band = search_band(size, shells, device=device)
            coefficients = band_coefficients(band)
            reference = VoxelFourierVolume.from_real(current, pad_factor=2)
            batch = dataset[np.sort(generator.choice(rows, batch_size, replace=False))]
            images, pixel_size = batch.images.to(device), batch.pixel_size.to(device)
            ctf = batch.ctf.to(device=device) if use_ctf else None
            tried = shifts if settings.centring_radius <= 0 else centred_shift_grid(
                reference, images, pixel_size, band, settings.centring_radius * size, shifts, ctf)
            found = global_search(reference, images, pixel_size, band, rotations, ctf, shifts_px=tried,
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
            took = record.elapsed_s - began
            if final:
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


@dataclasses.dataclass
class HalfSetsAbInitio:
    """The independent ab initio maps of two half sets (see the module docstring).

    half_volumes  : (2, L, L, L) the kept map of each half, the second carried into the first's frame.
    volume        : their average: the common start of the refinement (L³).
    starts        : the kept start of each half.
    search_errors : per half, per start, :func:`mean_search_error` on that half's particles.
    agreement     : the FSC between the kept pair after alignment (:class:`~cryoace.evaluate.fsc.FSCResult`).
    band_px       : the ab initio's own resolution limit, L / end_shells (px per cycle).
    """

    half_volumes: torch.Tensor
    volume: torch.Tensor
    starts: tuple[int, int]
    search_errors: list[list[float]]
    agreement: FSCResult
    band_px: float

    @property
    def start_agreement_px(self) -> float:
        """How far the kept pair agrees: the FSC-0.5 resolution between them (px)."""
        return self.agreement.resolution(0.5).px


def ab_initio_starts(dataset, starts: list[AbInitioSettings], rows: np.ndarray | None = None, use_ctf: bool = True,
                     device: torch.device | str = "cpu", progress: bool = True,
                     on_iteration: Callable[[int, AbInitioIteration, torch.Tensor], None] | None = None,
                     on_start: Callable[[int, float], None] | None = None, budget_s: float | None = None,
                     more: list[AbInitioSettings] | None = None,
                     enough: Callable[[list[torch.Tensor], list[float]], bool] | None = None,
                     min_runs: int = 1, on_beyond_budget: Callable[[int], None] | None = None,
                     ) -> tuple[list[torch.Tensor], list[float]]:
    """One ab initio map of the particles ``rows`` (default all) per settings of ``starts`` (other
    seeds: other random batches — at low SNR some runs fall into a wrong map), and each map's
    :func:`mean_search_error` on those particles (lower explains them better).

    ``budget_s`` (s; None = every run, each under its own ``max_time_s``): the runs share this wall
    time. Each runs its whole schedule, and a further run starts only while the longest one so far
    (with its search error) still fits in what is left, so a busy machine gets fewer runs, not
    shorter ones: a schedule cut short falls into a wrong map far more often (the demo molecule at
    SNR 0.1, 2000 particles, five runs each: 10 iterations all five 13–15 px from the truth, 15
    iterations one of five, 20 none, 30 one of five — the whole schedule still fails now and then,
    hence the several runs). Only the first run is cut short (its
    schedule brought forward, :class:`AbInitioSettings` ``max_time_s``) when it alone does not fit.
    ``min_runs``: that many runs are made even beyond the budget, each like the first (its whole
    schedule, or cut short as far as the first was): a start that must be found again by another run
    (:func:`start_consensus`) is otherwise left unchecked on a busy machine, not withheld.
    ``on_beyond_budget(start)`` is called as such a run begins (so a log can say the budget is exceeded).

    ``more``: further runs, made one at a time after those of ``starts`` (and within the budget) until
    ``enough(maps, errors)`` says the runs so far suffice — e.g. once another run has found the best
    map (:func:`start_consensus`). ``on_iteration(start, iteration, volume)`` after each iteration,
    ``on_start(start, search_error)`` after each run."""
    if not starts:
        raise ValueError("ab initio needs at least one start")
    maps, errors = [], []
    began, longest, first_cut_short = time.monotonic(), 0.0, False
    for k, settings in enumerate([*starts, *(more or [])]):
        if k >= len(starts) and (enough is None or enough(maps, errors)):
            break
        run_began = time.monotonic()
        if budget_s is not None:
            left = budget_s - (run_began - began)
            if k > 0 and longest > left:
                if k >= min_runs:
                    break
                left = budget_s if first_cut_short else None  # beyond the budget: like the first run
                if on_beyond_budget is not None:
                    on_beyond_budget(k)
            settings = dataclasses.replace(settings, max_time_s=left)

        def forward(record: AbInitioIteration, volume: torch.Tensor, k=k) -> None:
            if on_iteration is not None:
                on_iteration(k, record, volume)

        built = ab_initio(dataset, None, settings, rows=rows, use_ctf=use_ctf, device=device, progress=progress,
                          on_iteration=forward)
        first_cut_short = first_cut_short or (k == 0 and len(built.iterations) < settings.iterations)
        maps.append(built.volume)
        # every run's map scored on the same particles (the first run's sample): comparable errors
        errors.append(mean_search_error(dataset, built.volume, settings.end_shells, rows=rows,
                                        step_deg=settings.step_deg, use_ctf=use_ctf, device=device,
                                        seed=starts[0].seed))
        longest = max(longest, time.monotonic() - run_began)
        if on_start is not None:
            on_start(k, errors[-1])
    return maps, errors


def start_consensus(maps: list[torch.Tensor], kept: int, pixel_size: float,
                    known: dict[tuple[int, int], float] | None = None) -> float | None:
    """How far the kept run's map (``maps[kept]``) agrees with the closest of the other runs' maps of
    the same particles: the best FSC-0.5 resolution (px) after aligning each onto it (rotation, shift,
    hand); None with a single run. Runs that found the right map agree near the band's limit (the
    demo molecule at SNR 0.1, L / 10 shells = 6.4 px: 5.3 px), a wrong map agrees with none (11–13
    px): a wrong map that one run fell into is not confirmed by another. ``known``: the pairs' results
    of earlier calls with the same maps, by (kept, other), updated (each alignment takes seconds)."""
    from ..evaluate.map_align import half_map_fsc

    known = {} if known is None else known
    for k, volume in enumerate(maps):
        if k != kept and (kept, k) not in known:
            known[kept, k] = half_map_fsc(maps[kept], volume, pixel_size).fsc.resolution(0.5).px
    others = [known[kept, k] for k in range(len(maps)) if k != kept]
    return min(others) if others else None


def ab_initio_half_sets(dataset, half_sets: tuple[np.ndarray, np.ndarray], starts: list[AbInitioSettings],
                        use_ctf: bool = True, device: torch.device | str = "cpu", progress: bool = True,
                        on_iteration: Callable[[int, int, AbInitioIteration, torch.Tensor], None] | None = None,
                        on_start: Callable[[int, int, float], None] | None = None,
                        budget_s: float | None = None) -> HalfSetsAbInitio:
    """Ab initio maps of the two half sets (row positions of ``dataset``) apart, one per settings of
    ``starts`` each (:func:`ab_initio_starts`, each half with half of ``budget_s``; the seeds are
    offset per half so that no two runs draw the same batches); of each half the map with the lowest
    search error on its particles is kept, and how far the two agree is measured (module docstring).
    ``on_iteration(half, start, iteration, volume)`` after each iteration, ``on_start(half, start,
    search_error)`` after each run."""
    from ..evaluate.map_align import half_map_fsc

    maps, errors = [], []
    for h, rows in enumerate(half_sets):
        built = ab_initio_starts(
            dataset, [dataclasses.replace(settings, seed=settings.seed + 1000 * h) for settings in starts], rows,
            use_ctf=use_ctf, device=device, progress=progress,
            on_iteration=None if on_iteration is None else lambda k, record, volume, h=h: on_iteration(
                h, k, record, volume),
            on_start=None if on_start is None else lambda k, error, h=h: on_start(h, k, error),
            budget_s=None if budget_s is None else budget_s / 2)
        maps.append(built[0])
        errors.append(built[1])
    # each half's map with the lowest search error on its own particles; agreement then confirms (or
    # not) — it does not choose: featureless maps (the rotational average) agree with each other too
    a, b = (int(np.argmin(e)) for e in errors)
    pair = half_map_fsc(maps[0][a], maps[1][b], float(dataset.pixel_size))
    halves = torch.stack([maps[0][a].float(), pair.alignment.aligned.float()])
    return HalfSetsAbInitio(half_volumes=halves, volume=halves.mean(0), starts=(a, b), search_errors=errors,
                            agreement=pair.fsc,
                            band_px=int(dataset.image_size) / max(s.end_shells for s in starts))
