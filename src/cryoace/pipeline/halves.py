"""Gold-standard training (``cryoace reconstruct --halves``): two independent models on two half sets.

The particles are split in two (:func:`split_particles`: RELION's ``rlnRandomSubset`` when the file
has it, else a seeded random split) and one :class:`~cryoace.train.trainer.Trainer` trains on each
half, in RUN_DIR/half1 and RUN_DIR/half2 (each an ordinary run directory: config.yaml, checkpoints/,
metrics.jsonl, volume_STEP.mrc, volume.mrc). The two models start from different initialisations
(their run seeds are spawned from the run seed, :func:`half_seeds`) and see disjoint images, so
agreement between their maps measures what the data determine. They train in turn, in chunks of
``eval_every`` steps (default ``volume_every``, else ``checkpoint_every``), in one process, each for
the same number of steps; ``--max-time`` is the total, so each half gets half of it.

After every chunk both maps are exported, half 2 is aligned onto half 1 (rotation, hand and
translation: :func:`cryoace.evaluate.map_align.half_map_fsc`) and their FSC is

* appended to RUN_DIR/metrics.jsonl as ``{"kind": "halves", "step", "elapsed_s", "resolution_angst",
  "freq_cyc_angst", "fsc", ...}`` (``elapsed_s`` = training time of both halves together, s;
  ``freq_cyc_angst`` = shell frequencies in cycles/Å; ``resolution_angst`` = first 0.143 crossing),
* written to RUN_DIR/metrics.json (the latest FSC, its alignment, and the best resolution so far),
* plotted to RUN_DIR/fsc.png and RUN_DIR/resolution.png (resolution against training time),
* logged.

With ``halves_patience`` N the run stops once the resolution has not improved by more than 1 % over
N evaluations (:func:`evaluations_without_gain`). Caveat: early in training the two maps can share
structure that is not in the data (untrained decoders put a peak of either sign at the box centre, the
same in every shell), so the first FSCs can be optimistic; evaluate after a real stretch of training.
At the end RUN_DIR holds volume_half1.mrc, volume_half2.mrc (half 2 in half 1's frame), volume.mrc
(their average) and volume.png, the gold standard of the two half maps as a refinement writes it
(volume_mask.mrc, gold_standard.json, fsc.png, a ``gold_standard`` record:
:func:`cryoace.pipeline.rundir.write_gold_standard`; the resolution is claimed only when the halves
agree clearly beyond ``refine.start_resolution_px`` and each half's particles align to its map as
sharply as the map's own projections do (the posterior-predictive check of
:func:`cryoace.reconstruct.refine.check_half_maps`), else the run says NOT RESOLVED and exits 4),
and poses.star: each particle's pose predicted by the model of its
own half, half 2's carried into half 1's frame (:func:`pose_in_reference_frame`), with
``rlnRandomSubset`` saying which half it was in.

``--resume`` continues both halves from their own checkpoints; the halves state (the steps, the
history of resolutions and so the patience count) is read back from the half directories and
RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import CryoaceInputError
from ..train.config import TrainConfig, load_config, provenance, save_config, spawn_seeds
from ..types import Pose
from .rundir import RunResult, check_run_dir, open_training_dataset, write_gold_standard, write_run_report

if TYPE_CHECKING:
    from ..evaluate.map_align import HalfMapFSC

__all__ = ["HALF_NAMES", "MIN_GAIN", "half_config", "half_seeds", "split_particles", "evaluations_without_gain",
           "pose_in_reference_frame", "run_halves"]

#: the half directories (and the ``rlnRandomSubset`` values 1, 2 in this order)
HALF_NAMES = ("half1", "half2")
#: a half-map resolution counts as an improvement when it is better than the best by more than this
MIN_GAIN = 0.01


def half_seeds(seed: int) -> dict[str, int]:
    """Seeds of a half-set run spawned from the run seed, after (and independent of)
    :func:`~cryoace.train.config.spawn_seeds`'s: ``split`` (the random split) and the run seeds of
    ``half1`` and ``half2`` (so the two models start from different, reproducible initialisations)."""
    children = np.random.SeedSequence(int(seed)).spawn(6)[3:]  # children 0-2 are spawn_seeds'
    names = ("split",) + HALF_NAMES
    return {n: int(c.generate_state(1, dtype=np.uint32)[0]) for n, c in zip(names, children, strict=True)}


def split_particles(table, seed: int, log: Callable[[str], None] | None = None
                    ) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """The two half sets of ``table`` (sorted row indices, disjoint, together every row) and how they
    were chosen: ``"rlnRandomSubset"`` (the file's 1/2 column, as RELION's refinement uses it) or
    ``"random"`` (a split seeded by ``seed``; also when the column leaves a half empty)."""
    from ..reconstruct.backproject import split_half_sets

    rows = np.arange(len(table), dtype=np.int64)
    a, b = split_half_sets(table, rows, seed)
    column = table.extra_column("rlnRandomSubset")
    if column is not None and (len(a) == 0 or len(b) == 0):
        if log is not None:
            log("warning: rlnRandomSubset puts every particle in one half; splitting at random instead")
        a, b = split_half_sets(dataclasses.replace(table, extra=None), rows, seed)  # no column: random
        column = None
    # whether split_half_sets followed the column (it splits at random when it holds other values)
    from_column = column is not None and bool(np.all(column[a] == 1) and np.all(column[b] == 2))
    if len(a) == 0 or len(b) == 0:
        raise CryoaceInputError(f"--halves needs at least two particles, got {len(rows)}", table.source)
    return (a, b), ("rlnRandomSubset" if from_column else "random")


def evaluations_without_gain(resolutions_angst: Sequence[float], min_gain: float = MIN_GAIN) -> int:
    """How many of the latest evaluations in a row did not improve the resolution (Å, lower is better)
    by more than ``min_gain`` (relative) over the best before them. The best is only replaced by a real
    improvement, so a slow creep still counts once it adds up to more than ``min_gain``."""
    best, stale = math.inf, 0
    for res in resolutions_angst:
        if res < best * (1 - min_gain):
            best, stale = res, 0
        else:
            stale += 1
    return stale


def pose_in_reference_frame(pose: Pose, alignment) -> Pose:
    """Poses of the moving map's particles expressed for the aligned map (the reference's frame).

    ``alignment`` (:class:`~cryoace.evaluate.map_align.MapAlignment`, with its voxel size) says
    ``aligned(r) = moving(H G (r − s))``. A pose ``(R, t)`` that renders an image from ``moving``
    renders the same image from ``aligned`` as ``R' = H R H G`` (:func:`cryoace.evaluate.align.
    apply_alignment`) and ``t' = t + (R' s)_xy``: the translation by ``s`` moves the projection by
    ``(R' s)_xy``, which the shift (RELION's origin, image = projection moved by −t) takes up
    (cf. :func:`cryoace.evaluate.pose_metrics.fit_global_offset`). Rotations float64, shifts in Å.
    """
    from ..evaluate.align import apply_alignment

    shift_angst = alignment.shift_angst
    if shift_angst is None:
        raise ValueError("the alignment needs the voxel size to convert its shift to Å")
    rotmat = apply_alignment(pose.rotmat, alignment.rotation, alignment.flip_hand)
    shift = pose.shift_angst.to(torch.float64) + rotmat[:, :2, :] @ shift_angst.to(torch.float64)
    return Pose(rotmat=rotmat, shift_angst=shift)


@dataclasses.dataclass
class _Evaluation:
    """One half-map comparison: both maps (half 1 and half 2 aligned onto it) and the FSC."""

    step: int
    half1: torch.Tensor
    result: HalfMapFSC

    @property
    def half2_aligned(self) -> torch.Tensor:
        return self.result.alignment.aligned


class _HalvesRun:
    """The two trainers, their evaluation and the RUN_DIR outputs of the half-map FSC."""

    def __init__(self, run_dir: Path, trainers: list, log: Callable[[str], None]):
        self.run_dir = run_dir
        self.trainers = trainers
        self.log = log
        self.metrics = run_dir / "metrics.jsonl"
        from ..evaluate.plots import read_metrics

        step = self.step
        # the history survives a resume: only the records of steps both halves have trained
        self.history = [r for r in read_metrics(self.metrics, "halves") if int(r["step"]) <= step]

    @property
    def step(self) -> int:
        """The step both halves have reached (they differ only after an interruption)."""
        return min(t.step for t in self.trainers)

    @property
    def elapsed_s(self) -> float:
        """Training time of both halves together (s): they train one after the other."""
        return sum(t.elapsed_s for t in self.trainers)

    def done(self) -> bool:
        return all(t.budget_reached() for t in self.trainers)

    def stale(self) -> int:
        return evaluations_without_gain([float(r["resolution_angst"]) for r in self.history])

    def evaluate(self, record: bool = True) -> _Evaluation:
        """Export both maps, align half 2 onto half 1, FSC; log, record and plot it (see module doc)."""
        from ..evaluate.map_align import half_map_fsc
        from ..train.export import decoder_volume

        first = self.trainers[0]
        size, voxel_size = first.image_size, first.pixel_size
        half1, half2 = (decoder_volume(t.decoder, size, t.config.volume_chunk) for t in self.trainers)
        result = half_map_fsc(half1, half2, voxel_size)
        evaluation = _Evaluation(step=self.step, half1=half1, result=result)
        res = result.resolution
        prefix = "" if res.crossed else "≤ "
        if record:
            rec = {"kind": "halves", "step": self.step, "elapsed_s": self.elapsed_s,
                   "resolution_angst": float(res.angstrom), "resolution_px": float(res.px),
                   "crossed": bool(res.crossed),
                   "freq_cyc_angst": [float(f) for f in result.fsc.freq_per_angstrom],
                   "fsc": [float(c) for c in result.fsc.curve],
                   "half_steps": [int(t.step) for t in self.trainers],
                   "align_correlation": float(result.alignment.correlation),
                   "flip_hand": bool(result.alignment.flip_hand)}
            with open(self.metrics, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            self.history = [r for r in self.history if int(r["step"]) != self.step] + [rec]
            self._write_outputs(result)
        best = min(float(r["resolution_angst"]) for r in self.history) if self.history else float(res.angstrom)
        self.log(f"step {self.step}: half-map FSC 0.143 resolution {prefix}{res.angstrom:.2f} Å "
                 f"(best {best:.2f} Å; half 2 aligned with correlation {result.alignment.correlation:.3f}"
                 f"{', mirrored' if result.alignment.flip_hand else ''})")
        return evaluation

    def _write_outputs(self, result) -> None:
        """metrics.json, fsc.png and resolution.png from the latest result and the history."""
        from ..evaluate.plots import plot_fsc, plot_resolution_history
        from ..io.atomic import atomic_path

        best = min(self.history, key=lambda r: float(r["resolution_angst"]))
        summary = {"halves": {
            "step": self.step, "half_steps": [int(t.step) for t in self.trainers],
            "elapsed_s": self.elapsed_s, "resolution_angst": float(result.resolution.angstrom),
            "resolution_px": float(result.resolution.px), "crossed": bool(result.resolution.crossed),
            "best_resolution_angst": float(best["resolution_angst"]), "best_step": int(best["step"]),
            "evaluations_without_gain": self.stale(),
            "fsc": result.fsc.to_dict(), "alignment": result.alignment.to_dict()}}
        with atomic_path(self.run_dir / "metrics.json") as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")
        plot_fsc({"half 1 vs half 2 (aligned)": result.fsc}, self.run_dir / "fsc.png", thresholds=(0.143,),
                 title=f"half-map FSC at step {self.step}")
        minutes = [float(r["elapsed_s"]) / 60 for r in self.history]
        plot_resolution_history({"half maps, FSC 0.143": (minutes, [float(r["resolution_angst"])
                                                                    for r in self.history])},
                                self.run_dir / "resolution.png")


def half_config(config: TrainConfig, seed: int) -> TrainConfig:
    """One half model's settings: an ordinary run of its own ``seed`` with no refinement stage (so its
    training is the whole of its budget: :mod:`cryoace.pipeline.budget`), the two sharing ``--max-time``."""
    return dataclasses.replace(config, seed=seed, halves=False, halves_patience=None,
                               refine=dataclasses.replace(config.refine, enabled=False),
                               max_time_s=None if config.max_time_s is None else config.max_time_s / 2)


def _open_trainers(run_dir: Path, config: TrainConfig, dataset, rows, seeds: dict[str, int], resume: bool,
                   device, progress: bool, log: Callable[[str], None]) -> list:
    """One Trainer per half in RUN_DIR/halfK, on its subset, with its own seed (resumed from its own
    checkpoint when there is one); each half directory gets a config.yaml like an ordinary run."""
    from ..io.preload import prepare_dataset
    from ..train.trainer import DataInfo, Trainer, load_checkpoint_file

    trainers = []
    for name, half_rows in zip(HALF_NAMES, rows, strict=True):
        half_dir = run_dir / name
        last = half_dir / "checkpoints" / "last.pt"
        cfg = half_config(config, seeds[name])
        subset = dataset.subset(half_rows)
        data_info = None
        if resume and last.is_file():
            data_info = DataInfo(**load_checkpoint_file(last)["data"])
            if data_info.n_particles != len(subset) or data_info.image_size != subset.image_size:
                raise CryoaceInputError(f"{name} of these particles ({len(subset)} images of {subset.image_size} "
                                        f"px) is not the run's ({data_info.n_particles} of "
                                        f"{data_info.image_size} px)", dataset.table.source)
            subset.norm_mean, subset.norm_std = data_info.norm_mean, data_info.norm_std
        half_log = (lambda prefix: (lambda m: log(f"{prefix}: {m}")))(name)
        subset = prepare_dataset(subset, config.data.preload, device, 1, half_log, progress)
        half_dir.mkdir(parents=True, exist_ok=True)
        # no progress bar: the two halves alternate in chunks (the evaluations are logged instead)
        trainer = Trainer(cfg, subset, half_dir, device=device, data_info=data_info, progress=False, log=half_log)
        save_config(half_dir / "config.yaml", cfg, {"seeds": spawn_seeds(cfg.seed), "data": trainer.data_info.to_dict(),
                                                    "half": {"name": name, "run_dir": str(run_dir.resolve())}})
        if data_info is not None:
            trainer.load_checkpoint(last)
            half_log(f"resuming at step {trainer.step} ({trainer.elapsed_s:.0f} s trained)")
        trainers.append(trainer)
    return trainers


def run_halves(particles: str | os.PathLike, run_dir: str | os.PathLike, config: TrainConfig,
               resume: bool = False, argv: list[str] | None = None, arguments: dict | None = None,
               progress: bool = True, log: Callable[[str], None] | None = None, table=None) -> RunResult:
    """Half-set training of ``particles`` into ``run_dir`` with every output (module docstring).

    The arguments are :func:`~cryoace.pipeline.run.run_reconstruction`'s (which calls this when
    ``config.halves``). One process only (not under torchrun). ``RunResult.steps`` and ``epochs`` are
    each half's, ``train_time_s`` both halves' together, ``resolution_angst`` the final half-map FSC
    0.143 resolution.
    """
    from ..io.mrc import write_mrc
    from ..io.particles import read_particles
    from ..reconstruct.refine import RefineSettings, check_half_maps
    from ..runtime import resolve_device
    from ..train import distributed
    from ..train.export import plot_volume
    from ..train.predict import pose_predictor, write_poses_star

    wall0 = time.monotonic()
    log = log or (lambda m: None)
    run_dir = Path(run_dir)
    config.validate()
    if distributed.env_world_size() > 1:
        raise CryoaceInputError("--halves trains its two models in one process; run it without torchrun")
    check_run_dir(run_dir, resume)
    device = resolve_device(config.device)
    seeds, hseeds = spawn_seeds(config.seed), half_seeds(config.seed)

    if table is None:
        table = read_particles(particles, datadir=config.data.datadir)

    # one normalization for both halves, from the whole set (the same image scale for both maps)
    dataset = open_training_dataset(table, particles, config, seeds["normalization"], resume, log)
    rows, how = split_particles(table, hseeds["split"], log)
    log(f"half sets of {len(rows[0])} and {len(rows[1])} particles ({how})")

    run_dir.mkdir(parents=True, exist_ok=True)
    trainers = _open_trainers(run_dir, config, dataset, rows, hseeds, resume, device, progress, log)
    first = trainers[0]
    prov = provenance(argv)
    if arguments is not None:
        prov["arguments"] = arguments
    data = dataclasses.replace(first.data_info, n_particles=len(dataset)).to_dict()
    extra = {"seeds": seeds, "data": data, "provenance": prov,
             "halves": {"seeds": hseeds, "split": how, "n_particles": [len(r) for r in rows],
                        "directories": list(HALF_NAMES)}}
    if resume and (run_dir / "config.yaml").is_file():
        _, old = load_config(run_dir / "config.yaml")
        extra["provenance"] = old.get("provenance", prov)
        extra["resumed"] = list(old.get("resumed") or []) + [prov]
    save_config(run_dir / "config.yaml", config, extra)
    n_params = sum(p.numel() for p in first.params)
    log(f"{len(dataset)} particles in two halves, box {first.image_size} px at {first.pixel_size:.4g} Å/px, "
        f"CTF {'on' if first.use_ctf else 'off'}, {config.loss} loss, {config.decoder.name} decoder, "
        f"{n_params:,} parameters per half, batch {first.batch_size}, device {device}")

    halves = _HalvesRun(run_dir, trainers, log)
    # chunks of whole log intervals: each ends with a log record, a checkpoint and an evaluation
    chunk = config.eval_every or config.volume_every or config.checkpoint_every
    chunk = -(-int(chunk) // config.log_every) * config.log_every
    last: _Evaluation | None = None
    while True:
        stale = halves.stale()
        if config.halves_patience is not None and halves.history and stale >= config.halves_patience:
            log(f"stopping early: the half-map resolution has not improved by more than "
                f"{MIN_GAIN:.0%} in the last {stale} evaluations")
            break
        if halves.done():
            break
        target = (halves.step // chunk + 1) * chunk
        for trainer in trainers:
            trainer.fit(until_step=target)  # returns at once for a half at its budget
        last = halves.evaluate()
    if last is None or last.step != halves.step:  # nothing trained in this session: compare once more
        recorded = {int(r["step"]) for r in halves.history}
        last = halves.evaluate(record=halves.step not in recorded)

    for trainer in trainers:
        trainer.finalize()  # halfK/volume.mrc, volume.png, loss.png
    voxel_size = first.pixel_size
    volume_path = run_dir / "volume.mrc"
    average = 0.5 * (last.half1 + last.half2_aligned)
    write_mrc(volume_path, average.numpy(), voxel_size)
    plot_volume(average, run_dir / "volume.png", voxel_size,
                title=f"cryoace average of the aligned half maps after {halves.step} steps each "
                      f"({first.image_size}³, {voxel_size:.4g} Å/voxel)")

    # every particle's pose from the model of its own half, half 2's in half 1's frame
    log(f"predicting the poses of {len(dataset)} particles")
    subset = np.zeros(len(table), dtype=np.int8)  # the half each particle was in (rlnRandomSubset 1/2)
    local = np.zeros(len(table), dtype=np.int64)  # its row in that half's dataset
    for k, half_rows in enumerate(rows):
        subset[half_rows] = k + 1
        local[half_rows] = np.arange(len(half_rows))
    predictors = [pose_predictor(trainer.encoder, trainer.decoder, trainer.dataset, symmetric=trainer.symmetric,
                                 use_ctf=trainer.use_ctf, batch_size=config.predict_batch_size, device=device,
                                 radius_cyc_px=trainer.band_shells() / trainer.image_size) for trainer in trainers]

    predicted_shift = torch.zeros(len(table), 2)

    def poses(chunk: np.ndarray) -> Pose:
        """The poses of table rows ``chunk``, each from the model of its half (half 2's in half 1's frame)."""
        rotmat = torch.empty(len(chunk), 3, 3, dtype=torch.float64)
        shift = torch.empty(len(chunk), 2, dtype=torch.float64)
        for k, predict in enumerate(predictors):
            where = np.flatnonzero(subset[chunk] == k + 1)
            if len(where):
                pose = predict(local[chunk[where]])
                if k == 1:
                    pose = pose_in_reference_frame(pose, last.result.alignment)
                index = torch.from_numpy(where)
                rotmat[index], shift[index] = pose.rotmat, pose.shift_angst
        predicted_shift[torch.from_numpy(np.asarray(chunk))] = shift.float()  # for the check below
        return Pose(rotmat=rotmat, shift_angst=shift)

    poses_path = run_dir / "poses.star"
    write_poses_star(poses_path, table, poses, columns={"rlnRandomSubset": subset}, progress=progress)
    # the verdict as the refinement's: no resolution claimed unless the halves agree clearly beyond the
    # floor below which independently initialised networks can agree without the data, and each half's
    # particles align to its map as sharply as the map's own projections (at the predicted shifts) do
    check_settings = RefineSettings(global_step_deg=config.refine.global_step_deg, batch_size=config.refine.batch_size,
                                    seed=config.seed)
    check = check_half_maps(dataset, torch.stack([last.half1, last.half2_aligned]), check_settings, halves=rows,
                            shift_angst=predicted_shift, use_ctf=first.use_ctf, device=device)
    gold = write_gold_standard(run_dir, last.half1, last.half2_aligned, voxel_size, config.refine.start_resolution_px,
                               check=check, title=f"gold-standard FSC of the half maps at step {halves.step}")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        record = {k: v for k, v in gold.to_dict().items() if k != "fsc"}
        fh.write(json.dumps({"kind": "gold_standard", "step": halves.step, "elapsed_s": halves.elapsed_s,
                             **record}, allow_nan=False) + "\n")
    for line in gold.summary():
        log(line)
    write_run_report(run_dir, log)

    finals = [next((r["loss"] for r in reversed(t.history) if r["kind"] == "train"), None) for t in trainers]
    finals = [f for f in finals if f is not None]
    return RunResult(run_dir=run_dir, volume=volume_path, poses=poses_path, config=run_dir / "config.yaml",
                     steps=halves.step, epochs=halves.step / first.steps_per_epoch, train_time_s=halves.elapsed_s,
                     wall_time_s=time.monotonic() - wall0, final_loss=float(np.mean(finals)) if finals else None,
                     voxel_size=voxel_size, image_size=first.image_size, gold_standard=gold,
                     resolution_angst=float(gold.resolution().angstrom) if gold.resolved else None)
