"""The refinement stage of a run: projection matching seeded by the trained decoder's map or an ab
initio map.

After the amortized training (``TrainConfig.refine.enabled``), :func:`refine_run` takes the
decoder's map (written as ``volume_decoder.mrc``: ``volume.mrc`` is written only when the stage
ends, so an interrupted run has no map that looks final). With ``refine.ab_initio`` it also builds a
map from a featureless blob by stochastic EM, the best of ``refine.ab_initio_starts`` runs
(:func:`cryoace.reconstruct.ab_initio.ab_initio_starts`; ``volume_abinitio.mrc``, an ``ab_initio``
record per iteration in metrics.jsonl; how far the closest other run's map agrees with it,
:func:`~cryoace.reconstruct.ab_initio.start_consensus`, which the gold standard judges: a wrong map
that one run fell into is found by no other) — or, with ``refine.ab_initio_halves``, from each half set on
its own (:func:`cryoace.reconstruct.ab_initio.ab_initio_half_sets`: ``volume_abinitio_half1.mrc``,
``volume_abinitio_half2.mrc`` in one frame, their average ``volume_abinitio.mrc``, and how far the
two agree, which the gold standard judges; where they do not agree, each half set is refined from
its own map, so that the halves share nothing) — and starts the refinement from whichever of that
and the decoder's map explains the images better
(:func:`~cryoace.reconstruct.ab_initio.mean_search_error`, logged and recorded as ``refine_seed``):
when the networks have not found the structure — noisy images, a short CPU budget — their map is a
wrong attractor that projection matching does not leave. It then runs
:func:`cryoace.reconstruct.refine.refine` on the same normalized images, so the map's units match.
Each round writes ``volume_refine_RR.mrc``, a ``refine`` record in metrics.jsonl (bands, mean error,
median pose change since the last round, the half maps' FSC-0.143 resolution, wall time counted on
from the training time, coverage and — when the particle file has poses — the errors against them
with the aligning rotation, as the training's ``poses`` records) and redraws ``refine.png`` (pose
change and error per round). At the end the refined map becomes ``volume.mrc`` (and ``volume.png``);
the caller writes the refined poses to ``poses.star`` (the encoder's own predictions go to
``poses_encoder.star``).

**Gold standard.** The refinement keeps two half sets apart (RELION's ``rlnRandomSubset`` when the
particle file has it, else a seeded random split; :func:`~cryoace.reconstruct.backproject.split_half_sets`):
each half is refined against its own half map from the seed map low-passed to
``refine.start_resolution_px``. At the end the stage writes ``volume_half1.mrc``,
``volume_half2.mrc`` (each from its half set alone), ``volume_mask.mrc`` (the soft mask of their
average), ``gold_standard.json`` (:class:`~cryoace.evaluate.gold_standard.GoldStandard`: the unmasked
FSC, whose 0.143 crossing is the resolution claimed, the masked, phase-randomization corrected one and
the verdict), ``fsc.png``, and a ``gold_standard`` record in metrics.jsonl; ``cryoace fsc
volume_half1.mrc volume_half2.mrc [--mask volume_mask.mrc]`` gives the same numbers. Each particle's
half set (``rlnRandomSubset``) and pose confidence (``cryoacePoseConfidence``: the fraction of its best
rotations near the best one) go to ``poses.star``.
When the verdict is "not resolved" the run prints no resolution and says why.

**Subset, budget, processes.** The rounds run on at most ``refine.subset`` particles
(:func:`rounds_subset`, a seeded draw from each half set); every other particle is then searched once
against its own half's final map (:func:`~cryoace.reconstruct.refine.extend_refinement`, a
``refine_all`` record). The ab initio runs and the rounds get their shares of the job's
``--max-time`` (:mod:`cryoace.pipeline.budget`): the rounds keep time for that final pass and end
with a full-band round; each part leaves a ``stage`` record. Under torchrun the ab initio and the
rounds run on rank 0 while the other ranks wait in :func:`follow_final_pass`; the final pass is
shared by all ranks.

After each round the stage saves its state to ``checkpoints/refine.pt`` (atomically): a resumed run
whose training is over goes on from the last completed round (ab initio and earlier rounds are not
repeated); a checkpoint from another training step (the training went on) is ignored.

With ``refine.teach_time_s`` (``--teach-encoder T``) a pose encoder is taught from a refined map for
that wall time (:mod:`cryoace.train.teach`): ``checkpoints/encoder_taught.pt``, ``teach`` records in
metrics.jsonl (its median disagreement with the refined poses of 400 particles as it learns), and
``cryoace predict-poses`` / ``cryoace refine`` use it. When the rounds ran on a subset it is taught
from the rounds' map **before** the final pass, and the final pass is amortized: every particle's
pose comes from one encoder pass, each is searched locally from it, and only those whose pose score
stays below a threshold calibrated on the subset fall back to the global search
(:func:`~cryoace.reconstruct.refine.extend_refinement`; the ``refine_all`` record's ``local_first``,
``cryoacePoseScore`` in poses.star). Otherwise it is taught from the final map at the end. An
interrupted teaching starts again on resume.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from ..evaluate.gold_standard import MAX_START_DISAGREEMENT, MIN_GAIN_OVER_START, GoldStandard, StartAgreement
from ..io.atomic import atomic_path
from ..io.mrc import read_volume, write_mrc
from ..reconstruct.ab_initio import (
    AbInitioIteration,
    AbInitioSettings,
    ab_initio_half_sets,
    ab_initio_starts,
    mean_search_error,
    start_consensus,
)
from ..reconstruct.backproject import split_half_sets
from ..reconstruct.refine import RefineResult, RefineRound, RefineSettings, RefineState, extend_refinement, refine
from ..train.monitor import PoseMonitor
from ..types import Pose
from .budget import JobBudget, stage_record
from .rundir import write_gold_standard

__all__ = ["refine_run", "RefineOutcome", "DECODER_MAP", "half_sets_of", "follow_final_pass", "stage_settings",
           "rounds_subset", "encoder_starts"]

#: the decoder's map in a run with a refinement stage (whose map alone is ``volume.mrc``)
DECODER_MAP = "volume_decoder.mrc"


@dataclasses.dataclass
class RefineOutcome:
    """What the stage gives the run: the poses for poses.star, the per-particle columns to write with
    them (``rlnRandomSubset``, ``cryoacePoseConfidence``; empty when nothing was refined) and
    the gold standard (None when nothing was refined)."""

    pose: Pose
    columns: dict[str, np.ndarray]
    gold: GoldStandard | None = None


def refine_run(trainer, dataset, predicted: Callable[[], Pose], log: Callable[[str], None], progress: bool = True,
               table=None, after_training_s: float = 0.0, ranks: tuple[int, int] | None = None) -> RefineOutcome:
    """Refine the poses and map of ``trainer``'s run (see the module docstring); the outcome holds the
    refined poses (``predicted()``, the encoder's, where there is nothing to refine). ``table`` (the
    run's ParticleTable) gives RELION's half sets when it has ``rlnRandomSubset``.
    ``after_training_s``: the run's wall time between the training and this stage (the encoder's pass),
    counted in the run's clock, which the whole job's budget (:mod:`cryoace.pipeline.budget`) is held to.
    ``ranks`` = (0, world size) under torchrun: the other ranks wait in :func:`follow_final_pass` and
    share the final pass over the particles not in the rounds (one broadcast of the rounds' result)."""
    from ..evaluate.plots import plot_refinement, read_metrics
    from ..train.export import plot_volume

    cfg = trainer.config.refine

    def skipped(why: str) -> RefineOutcome:  # the decoder's map and the encoder's poses are the result
        _share_rounds(None, ranks)
        log(f"refinement skipped: {why}")
        os.replace(trainer.run_dir / DECODER_MAP, trainer.run_dir / "volume.mrc")
        return RefineOutcome(predicted(), {})

    if len(dataset) < 4:
        return skipped("it needs at least 4 particles (two half sets)")
    run_dir = trainer.run_dir
    pixel_size = trainer.pixel_size
    decoder_map = torch.as_tensor(read_volume(run_dir / DECODER_MAP).data.copy())  # Trainer.finalize wrote it
    settings = stage_settings(trainer.config)
    n = len(dataset)
    half_sets = half_sets_of(table, n, trainer.config.seed)
    if min(len(h) for h in half_sets) < 2:
        return skipped("a half set has fewer than 2 particles")
    # the rounds run on a bounded subset (every particle when there are few), the others once at the end
    rounds_rows, rounds_halves = rounds_subset(half_sets, cfg.subset, trainer.config.seed)
    monitor = PoseMonitor(n, "cpu", trainer.truth_rotmat_of())

    def on_round(record: RefineRound, pose: Pose, volume) -> None:
        write_mrc(run_dir / f"volume_refine_{record.round:02d}.mrc", volume.float().cpu().numpy(), pixel_size)
        gold = record.half_map_fsc.resolution(0.143)
        half_map = {"half_fsc0143_px": gold.px, "half_fsc0143_angst": gold.angstrom,
                    "confidence_median": record.confidence_median}
        monitor.update(rounds_rows, pose.rotmat.cpu())
        summary = monitor.summary()
        trainer.write_record({"kind": "refine", "step": trainer.step, "round": record.round,
                              "elapsed_s": clock(), "global_fraction": record.global_fraction,
                              "global_shells": record.global_shells,
                              "local_shells": record.local_shells, "mean_error": record.mean_error,
                              "pose_change_median_deg": record.pose_change_median_deg, **half_map, **summary})
        errors = (f", median error {summary['rot_median_deg']:.1f}° vs the file's poses"
                  if "rot_median_deg" in summary else "")
        moved = ("" if record.pose_change_median_deg is None
                 else f", poses moved {record.pose_change_median_deg:.2f}° (median)")
        within = ("" if gold.px * MIN_GAIN_OVER_START <= settings.start_resolution_px else
                  f" (not beyond the start's {settings.start_resolution_px:g}-px low-pass: no resolution yet)")
        log(f"refinement round {record.round + 1}: band {record.local_shells} shells, mean error "
            f"{record.mean_error:.4g}{moved}, gold-standard half maps FSC-0.143 {gold.angstrom:.2f} Å{within}, "
            f"median pose confidence {record.confidence_median:.2f}, {100 * record.global_fraction:.0f} % of the "
            f"particles searched globally{errors} "
            f"({record.elapsed_s:.0f} s)")
        plot_refinement(read_metrics(run_dir / "metrics.jsonl", kind="refine"), run_dir / "refine.png")

    checkpoint = run_dir / "checkpoints" / "refine.pt"
    resume, stage_elapsed, saved_start_agreement = _load_state(checkpoint, trainer.step, len(rounds_rows), log)
    stage_start = time.monotonic() - stage_elapsed

    def clock() -> float:  # the run's wall time: the training's, then what came after it
        return trainer.elapsed_s + after_training_s + (time.monotonic() - stage_start)

    def on_state(state: RefineState) -> None:
        with atomic_path(checkpoint) as tmp, open(tmp, "wb") as fh:
            torch.save({"step": trainer.step, "round": state.round, "rotmat": state.pose.rotmat.cpu(),
                        "shift_angst": state.pose.shift_angst.cpu(), "half_references": state.half_references.cpu(),
                        "volume": state.volume.cpu(), "half_volumes": state.half_volumes.cpu(),
                        "confidence": state.confidence.cpu(), "stage_elapsed_s": time.monotonic() - stage_start,
                        "final": state.final, "longest_round_s": state.longest_round_s,
                        "start_agreement": None if start_agreement is None else start_agreement.to_tensor()}, fh)

    budget = JobBudget.of(trainer.config)
    if resume is None:
        seed_map, start_agreement = ((decoder_map, None) if not cfg.ab_initio else
                                     _ab_initio_seed(trainer, dataset, decoder_map, half_sets, clock, log, progress))
        log(f"refining poses and map by projection matching ({cfg.rounds} rounds, SO(3) grid {cfg.global_step_deg:g}°"
            + (")" if len(rounds_rows) == n else f", on {len(rounds_rows)} of the {n} particles; the others are "
               "searched once at the end)"))
    else:
        seed_map = decoder_map  # not used: the saved state holds the references
        start_agreement = saved_start_agreement
        log(f"resuming the refinement after round {resume.round + 1} of {cfg.rounds}")
    extended = len(rounds_rows) < n
    # the predictive check judges the final half maps: of all particles when the rounds ran on a subset
    rounds_settings = dataclasses.replace(settings, check_particles=0) if extended else settings
    rounds_settings = _rounds_budget(rounds_settings, budget, clock(), n - len(rounds_rows), cfg.teach_time_s, log)
    rounds_start = clock()
    result = refine(dataset, seed_map, rounds_settings, rows=rounds_rows, use_ctf=trainer.use_ctf,
                    device=trainer.device, progress=progress, on_round=on_round, resume=resume, on_state=on_state,
                    half_sets=rounds_halves)
    rounds_done = result.rounds[-1].round + 1 if result.rounds else resume.round + 1
    trainer.write_record(stage_record("refine_rounds", trainer.step, rounds_start, clock(), rounds_settings.max_time_s,
                                      rounds=len(result.rounds), particles=len(rounds_rows),
                                      final_brought_forward=bool(result.rounds and result.rounds[-1].final
                                                                 and result.rounds[-1].round < cfg.rounds - 1)))
    taught = None
    if extended and cfg.teach_time_s is not None:
        # amortized: an encoder taught from the rounds' map poses every particle in one pass, and the final
        # pass searches locally from its poses (the global search only where their fit stays poor)
        taught = _teach_encoder(trainer, dataset, result.volume.float(), rounds_rows, result.pose, clock, log,
                                progress)
    _share_rounds(result if extended else None, ranks, taught)
    if extended:
        started = clock()
        initial = None if taught is None else encoder_starts(_taught_poses(taught, dataset, trainer.device), n, ranks)
        result = extend_refinement(dataset, result, np.arange(n), half_sets, settings, use_ctf=trainer.use_ctf,
                                   device=trainer.device, progress=progress, ranks=ranks, initial=initial)
        gold_fsc = result.half_map_fsc.resolution(0.143)
        plan = result.local_first
        trainer.write_record({"kind": "refine_all", "step": trainer.step, "elapsed_s": clock(),
                              "particles": n, "searched": n - len(rounds_rows), "half_fsc0143_px": gold_fsc.px,
                              "confidence_median": float(result.confidence.nanmedian()),
                              **({} if plan is None else {"local_first": plan.to_dict()})})
        trainer.write_record(stage_record("final_pass", trainer.step, started, clock(), None,
                                          particles=n - len(rounds_rows),
                                          searched_globally=(n - len(rounds_rows) if plan is None or not plan.enabled
                                                             else plan.fell_back)))
        if plan is not None:
            log(f"final pass: {plan.describe()}")
        log(f"the other {n - len(rounds_rows)} particles searched once against their half's map "
            f"({clock() - started:.0f} s" + ("" if ranks is None else f", shared by {ranks[1]} processes")
            + f"): half maps of all {n} particles FSC-0.143 {gold_fsc.angstrom:.2f} Å")
    volume = result.volume.float()
    gold = _write_gold_standard(trainer, result, start_agreement, clock, log)
    # volume.mrc appears only now: an interrupted stage leaves volume_decoder.mrc, never a final-looking map
    write_mrc(run_dir / "volume.mrc", volume.numpy(), pixel_size)
    plot_volume(volume, run_dir / "volume.png", pixel_size,
                title=f"cryoace map after {rounds_done} refinement rounds "
                      f"({trainer.image_size}³, {pixel_size:.4g} Å/voxel)")
    if cfg.teach_time_s is not None and taught is None:  # (every particle was in the rounds)
        _teach_encoder(trainer, dataset, volume, np.arange(n), result.pose, clock, log, progress)
    return RefineOutcome(result.pose, result.star_columns(), gold)


def encoder_starts(predict: Callable[[np.ndarray], Pose], n: int, ranks: tuple[int, int] | None) -> Pose:
    """An encoder's poses (``predict(rows)``) of this rank's share of ``n`` particles (positions
    p ≡ rank mod world size; every particle in one process), zeros elsewhere: the starts of a final
    pass (:func:`~cryoace.reconstruct.refine.extend_refinement`) split over the ranks."""
    rank, world = (0, 1) if ranks is None else ranks
    mine = np.arange(rank, n, world)
    predicted = predict(mine)
    starts = Pose(torch.zeros(n, 3, 3, dtype=torch.float64), torch.zeros(n, 2, dtype=torch.float64))
    starts.rotmat[mine] = predicted.rotmat.double().cpu()
    starts.shift_angst[mine] = predicted.shift_angst.double().cpu()
    return starts


def _taught_poses(taught, dataset, device) -> Callable[[np.ndarray], Pose]:
    """rows → the taught encoder's poses of those particles."""
    return lambda rows: taught.predict_particles(dataset.subset(rows), device=device)


#: the taught encoder's checkpoint in the run directory (read by ``cryoace predict-poses``)
TAUGHT_ENCODER = "checkpoints/encoder_taught.pt"
#: particles on which the taught encoder's poses are compared with the refined ones
TEACH_CHECK_PARTICLES = 400


def _teach_encoder(trainer, dataset, volume: torch.Tensor, refined_rows: np.ndarray, refined: Pose,
                   clock: Callable[[], float], log: Callable[[str], None], progress: bool):
    """Teach a pose encoder from a refined map (:mod:`cryoace.train.teach`) for ``refine.teach_time_s``,
    measure it against the refined poses (of the particles ``refined_rows``) of a sample of them, save
    it (atomically) and return it."""
    from ..train.teach import TeachSettings, teach_encoder

    picked = np.sort(np.random.default_rng(trainer.config.seed).choice(
        len(refined_rows), min(TEACH_CHECK_PARTICLES, len(refined_rows)), replace=False))
    rows = np.asarray(refined_rows)[picked]
    budget = float(trainer.config.refine.teach_time_s)
    of = "" if len(refined_rows) == len(dataset) else f"the rounds' {len(refined_rows)} particles' "
    log(f"teaching a pose encoder from {of}map for {budget / 60:g} min (its poses of {len(rows)} particles are "
        "compared with the refined ones as it learns)")

    def on_record(record) -> None:
        trainer.write_record({"kind": "teach", "step": trainer.step, "iteration": record.step,
                              "elapsed_s": clock(), "rotation_loss": record.rotation_loss,
                              "shift_loss_px2": record.shift_loss_px2, "median_deg": record.median_deg,
                              "within_15deg": record.within_15deg})

    settings = TeachSettings(steps=10 ** 9, max_time_s=budget, seed=trainer.config.seed)
    started = clock()
    taught = teach_encoder(volume, dataset, settings, shifts_angst=refined.shift_angst,
                           check=(rows, refined.rotmat[torch.as_tensor(picked)]), use_ctf=trainer.use_ctf,
                           device=trainer.device, progress=progress, on_record=on_record)
    trainer.write_record(stage_record("teach", trainer.step, started, clock(), budget))
    path = trainer.run_dir / TAUGHT_ENCODER
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(taught.state(), fh)
    last = taught.history[-1]
    log(f"the encoder taught from the map ({last.step} steps) predicts the refined poses of {len(rows)} particles "
        f"within {last.median_deg:.1f}° (median; {100 * last.within_15deg:.0f} % within 15°): {path}; "
        "'cryoace predict-poses RUN PARTICLES' uses it")
    return taught


def stage_settings(config) -> RefineSettings:
    """The refinement's settings of a run's :class:`~cryoace.train.config.TrainConfig`."""
    cfg = config.refine
    return RefineSettings(rounds=cfg.rounds, max_time_s=cfg.max_time_s, global_step_deg=cfg.global_step_deg,
                          centring_radius=cfg.centring_radius, max_false_accept=cfg.false_accept,
                          batch_size=cfg.batch_size,
                          start_resolution_px=cfg.start_resolution_px, seed=config.seed)


def _share_rounds(result: RefineResult | None, ranks: tuple[int, int] | None, taught=None) -> None:
    """Rank 0: send the other ranks the rounds' result for the final pass (None: there is none) and the
    encoder taught from its map, if any (each rank predicts its own particles' starts)."""
    if ranks is not None:
        import torch.distributed as dist

        if result is not None:  # on the CPU: a pickled GPU tensor would land on rank 0's device
            result = dataclasses.replace(result, pose=Pose(result.pose.rotmat.cpu(), result.pose.shift_angst.cpu()))
        state = None
        if taught is not None:  # (predict_particles moves it back to the device)
            taught.encoder.cpu()
            state = taught.state()
        dist.broadcast_object_list([result, state], src=0)


def follow_final_pass(trainer, dataset, table, ranks: tuple[int, int]) -> None:
    """A rank other than 0 under torchrun: wait for rank 0's refinement rounds (:func:`refine_run`), then
    search its share of the other particles and add it to the half maps' sums (rank 0 writes the result)."""
    import torch.distributed as dist

    from ..train.teach import TaughtEncoder

    received: list = [None, None]
    dist.broadcast_object_list(received, src=0)
    rounds, state = received
    if rounds is None:  # nothing to share: the refinement was skipped, or ran on every particle
        return
    initial = None
    if state is not None:
        initial = encoder_starts(_taught_poses(TaughtEncoder.from_state(state), dataset, trainer.device),
                                 len(dataset), ranks)
    half_sets = half_sets_of(table, len(dataset), trainer.config.seed)
    extend_refinement(dataset, rounds, np.arange(len(dataset)), half_sets, stage_settings(trainer.config),
                      use_ctf=trainer.use_ctf, device=trainer.device, progress=False, ranks=ranks, initial=initial)


def _rounds_budget(settings: RefineSettings, budget: JobBudget, elapsed_s: float, tail_particles: int,
                   teach_s: float | None, log: Callable[[str], None]) -> RefineSettings:
    """The rounds' settings under the whole job's budget (:mod:`cryoace.pipeline.budget`): their time is
    what is left of it (or ``--refine-max-time`` when that is shorter), less what follows them — the
    final pass over the ``tail_particles`` not in the rounds (estimated per particle from the longest
    round) and the teaching of an encoder (``teach_s``)."""
    left = budget.left_s(elapsed_s)
    limits = [t for t in (settings.max_time_s, left) if t is not None]
    if not limits:
        return settings
    max_time_s = max(0.0, min(limits))
    follows = ([f"the search of the other {tail_particles} particles"] if tail_particles else []) + (
        [f"{teach_s / 60:.3g} min of teaching"] if teach_s else [])
    by_budget = left is not None and (settings.max_time_s is None or left <= settings.max_time_s)
    log(f"refinement rounds: {max_time_s / 60:.1f} min"
        + (f" of the {budget.total_s / 60:.3g}-min budget left" if by_budget else "")
        + (f", less {' and '.join(follows)}" if follows else "")
        + "; the last round that fits searches at the full band, every particle globally")
    return dataclasses.replace(settings, max_time_s=max_time_s,
                               reserve_s=lambda per_particle_s: per_particle_s * tail_particles + (teach_s or 0.0))


def rounds_subset(half_sets: tuple[np.ndarray, np.ndarray], subset: int | None, seed: int
                   ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The particle rows the refinement rounds run on — at most ``subset``, drawn at random (seeded)
    from each half set in proportion; all when ``subset`` is None or not smaller — and each half's
    positions among them."""
    n = sum(len(h) for h in half_sets)
    if subset is None or subset >= n:
        return np.arange(n), half_sets
    generator = np.random.default_rng(seed + 7)
    picked = [np.sort(generator.choice(h, max(2, round(subset * len(h) / n)), replace=False)) for h in half_sets]
    rows = np.sort(np.concatenate(picked))
    return rows, (np.searchsorted(rows, picked[0]), np.searchsorted(rows, picked[1]))


def half_sets_of(table, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The refinement's two half sets (row positions): the table's ``rlnRandomSubset`` when it has one
    that splits the particles, else a seeded random split."""
    rows = np.arange(n, dtype=np.int64)
    a, b = (rows[:0], rows[:0]) if table is None else split_half_sets(table, rows, seed)
    if len(a) == 0 or len(b) == 0:  # no table, or rlnRandomSubset puts everything in one half
        perm = np.random.default_rng(seed).permutation(n)
        a, b = np.sort(perm[: (n + 1) // 2]), np.sort(perm[(n + 1) // 2:])
    return a, b


def _write_gold_standard(trainer, result: RefineResult, start_agreement: StartAgreement | None,
                         clock: Callable[[], float], log: Callable[[str], None]) -> GoldStandard:
    """Write the half maps, their mask, gold_standard.json and fsc.png; record and log the verdict."""
    gold = write_gold_standard(trainer.run_dir, result.half_volumes[0], result.half_volumes[1], trainer.pixel_size,
                               result.start_resolution_px, result.confidence, result.check, start_agreement)
    record = {k: v for k, v in gold.to_dict().items() if k != "fsc"}
    trainer.write_record({"kind": "gold_standard", "step": trainer.step, "elapsed_s": clock(), **record})
    for line in gold.summary():
        log(line)
    return gold


def _ab_initio_seed(trainer, dataset, decoder_map: torch.Tensor, half_sets: tuple[np.ndarray, np.ndarray],
                    clock: Callable[[], float], log: Callable[[str], None], progress: bool
                    ) -> tuple[torch.Tensor, StartAgreement | None]:
    """The refinement's start (see the module doc) — the ab initio map with the lowest search error of
    ``refine.ab_initio_starts`` runs on all particles, or with ``refine.ab_initio_halves`` the average
    of the two half sets' own ab initio maps where they agree and each half's own map (2, L, L, L)
    where they do not; or the decoder's map where its search error on all particles is lower — and
    how far independently built ab initio maps agree with the limit they must reach: the half sets'
    maps, or the kept run's map and the closest other run's (None for the decoder's map or a single
    run). ``clock()`` is the run's wall time for the records."""
    cfg = trainer.config.refine
    started = clock()
    # the runs share the ab initio's part of the job's budget: whole schedules, as many as fit
    budget_s = JobBudget.of(trainer.config).ab_initio_s()
    # the planned runs, then (on all particles) as many again while none confirms the best map: at SNR
    # 0.1 a run falls into a wrong map about one time in four, so a right map may lack a partner
    runs_settings = [AbInitioSettings(iterations=cfg.ab_initio_iterations, seed=trainer.config.seed + k)
                     for k in range(2 * cfg.ab_initio_starts)]
    starts, more = runs_settings[:cfg.ab_initio_starts], runs_settings[cfg.ab_initio_starts:]
    first = starts[0]
    log(f"ab initio: {cfg.ab_initio_starts} start(s) "
        + ("on each half set apart " if cfg.ab_initio_halves else "")
        + f"of {first.iterations} iterations of stochastic EM over poses from a blob (band {first.start_shells}→"
        f"{first.end_shells} shells, SO(3) grid {first.step_deg:g}°); the map that explains the images best is kept"
        + (" in each half, and the two must agree" if cfg.ab_initio_halves else ""))

    def on_iteration(half: int | None, start: int, record: AbInitioIteration, volume) -> None:
        trainer.write_record({"kind": "ab_initio", "step": trainer.step, **({} if half is None else {"half": half + 1}),
                              "start": start, "iteration": record.iteration, "elapsed_s": clock(),
                              **{key: v for key, v in dataclasses.asdict(record).items()
                                 if key not in ("iteration", "elapsed_s")}})

    def on_start(half: int | None, start: int, error: float) -> None:
        where = "" if half is None else f"half set {half + 1}, "
        log(f"ab initio {where}run {start + 1}: mean search error {error:.5g}")

    def search_error(volume: torch.Tensor) -> float:
        return mean_search_error(dataset, volume, first.end_shells, step_deg=first.step_deg, use_ctf=trainer.use_ctf,
                                 device=trainer.device, seed=trainer.config.seed)

    options = dict(use_ctf=trainer.use_ctf, device=trainer.device, progress=progress, budget_s=budget_s)
    if cfg.ab_initio_halves:
        built = ab_initio_half_sets(dataset, half_sets, starts, on_iteration=on_iteration, on_start=on_start, **options)
        ab_initio_map, kept, errors = built.volume, list(built.starts), built.search_errors
        for name, volume in (("volume_abinitio_half1.mrc", built.half_volumes[0]),
                             ("volume_abinitio_half2.mrc", built.half_volumes[1])):
            write_mrc(trainer.run_dir / name, volume.float().numpy(), trainer.pixel_size)
        agreement = StartAgreement(built.start_agreement_px, MAX_START_DISAGREEMENT * built.band_px, "half sets")
        log(f"ab initio: the half sets' maps (starts {kept[0] + 1} and {kept[1] + 1}) agree to "
            f"{agreement.describe(trainer.pixel_size)}")
        ab_initio_error = search_error(ab_initio_map)
    else:
        limit_px = MAX_START_DISAGREEMENT * int(dataset.image_size) / first.end_shells
        pairs: dict[tuple[int, int], float] = {}

        def agreement_of(maps: list[torch.Tensor], errors: list[float]) -> StartAgreement | None:
            # a second opinion on the best map: did another run (other batches) find it too?
            closest = start_consensus(maps, int(np.argmin(errors)), trainer.pixel_size, known=pairs)
            return None if closest is None else StartAgreement(closest, limit_px, "runs")

        def confirmed(maps: list[torch.Tensor], errors: list[float]) -> bool:
            found = agreement_of(maps, errors)
            if found is None or not found.confirmed:
                log(f"ab initio: the best map of {len(maps)} run(s) is not yet found by another run"
                    + ("" if found is None else f" (the closest agrees to {found.px:.2f} px, at most {limit_px:.2f} "
                       "needed)") + "; one more run if it fits")
                return False
            return True

        def beyond_budget(start: int) -> None:
            log(f"ab initio: run {start + 1} goes beyond the {budget_s / 60:.3g}-min share of the budget (the kept "
                "map must be found by another run; a larger --max-time gives more runs)")

        # two runs at least, even beyond the budget: a start no other run was asked to find is unchecked
        maps, errors = ab_initio_starts(dataset, starts, on_iteration=lambda k, r, v: on_iteration(None, k, r, v),
                                        on_start=lambda k, e: on_start(None, k, e), more=more, enough=confirmed,
                                        min_runs=min(2, len(starts)), on_beyond_budget=beyond_budget, **options)
        kept = int(np.argmin(errors))
        ab_initio_map, ab_initio_error = maps[kept], errors[kept]
        agreement = agreement_of(maps, errors)
        log(f"ab initio: start {kept + 1} explains the images best; " + (
            "no other run to confirm its map" if agreement is None else
            f"the closest other run's map agrees with it to {agreement.describe(trainer.pixel_size)}"))
    runs = sum(len(e) for e in errors) if cfg.ab_initio_halves else len(errors)
    planned = cfg.ab_initio_starts * (2 if cfg.ab_initio_halves else 1)
    if runs < planned:
        log(f"ab initio: {runs} of {planned} runs made in its {budget_s / 60:.3g}-min share of the budget "
            "(each run keeps its whole schedule; a larger --max-time gives more)")
    write_mrc(trainer.run_dir / "volume_abinitio.mrc", ab_initio_map.float().numpy(), trainer.pixel_size)
    decoder_error = search_error(decoder_map)
    trainer.write_record(stage_record("ab_initio", trainer.step, started, clock(), budget_s, runs=runs,
                                      planned_runs=planned))
    chosen = "ab_initio" if ab_initio_error <= decoder_error else "decoder"
    apart = chosen == "ab_initio" and cfg.ab_initio_halves and not agreement.confirmed
    trainer.write_record({"kind": "refine_seed", "step": trainer.step, "elapsed_s": clock(), "chosen": chosen,
                          "search_error_decoder": decoder_error, "search_error_ab_initio": ab_initio_error,
                          "ab_initio_start": kept, "search_error_ab_initio_starts": errors,
                          **({} if agreement is None else {"start_agreement_px": agreement.px,
                                                           "start_agreement_limit_px": agreement.limit_px,
                                                           "start_agreement_between": agreement.between,
                                                           "halves_start_apart": apart})})
    if chosen == "decoder":
        log(f"refinement starts from the decoder's map (mean search error {decoder_error:.5g} vs {ab_initio_error:.5g} "
            f"for the ab initio map, band {first.end_shells} shells)")
        return decoder_map, None
    if apart:  # the halves share nothing, so their FSC shows the disagreement instead of a common start's echo
        log("the half sets' ab initio maps disagree: each half set is refined from its own map")
        return built.half_volumes, agreement
    log(f"refinement starts from the ab initio map (mean search error {ab_initio_error:.5g} vs {decoder_error:.5g} "
        f"for the decoder's map, band {first.end_shells} shells)")
    return ab_initio_map, agreement


def _load_state(path, step: int, n: int, log: Callable[[str], None]
                ) -> tuple[RefineState | None, float, StartAgreement | None]:
    """The refinement state saved by an interrupted stage of this run (same training step and
    particles), the stage's wall time until then and the start's agreement (:class:`StartAgreement`);
    (None, 0, None) when there is none to go on from."""
    nothing = None, 0.0, None
    if not path.is_file():
        return nothing
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = RefineState(round=int(saved["round"]), pose=Pose(saved["rotmat"], saved["shift_angst"]),
                            half_references=saved["half_references"], volume=saved["volume"],
                            half_volumes=saved.get("half_volumes"), confidence=saved.get("confidence"),
                            final=bool(saved.get("final", False)),
                            longest_round_s=float(saved.get("longest_round_s", 0.0)))
        agreement = saved.get("start_agreement")
        agreement = None if agreement is None else StartAgreement.from_tensor(agreement)
    except Exception as exc:  # a damaged file: start the stage afresh rather than fail the run
        log(f"ignoring the refinement checkpoint {path} ({type(exc).__name__}: {exc})")
        return nothing
    if int(saved["step"]) != step or state.pose.rotmat.shape[0] != n:
        log(f"ignoring the refinement checkpoint {path}: it is from training step {int(saved['step'])} with "
            f"{state.pose.rotmat.shape[0]} particles, this run is at step {step} with {n}")
        return nothing
    return state, float(saved["stage_elapsed_s"]), agreement
