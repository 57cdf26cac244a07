"""The refinement stage of a run: projection matching seeded by the trained decoder's map or an ab
initio map.

After the amortized training (``TrainConfig.refine.enabled``), :func:`refine_run` takes the decoder's
map (already written as ``volume.mrc``; renamed ``volume_decoder.mrc`` when the stage ends). With
``refine.ab_initio`` it also builds a map from a featureless blob by stochastic EM
(:func:`cryoace.reconstruct.ab_initio.ab_initio`; ``volume_abinitio.mrc``, an ``ab_initio`` record
per iteration in metrics.jsonl) and starts the refinement from whichever of the two explains the
images better (:func:`~cryoace.reconstruct.ab_initio.mean_search_error`, logged and recorded as
``refine_seed``): when the networks have not found the structure — noisy images, a short CPU
budget — their map is a wrong attractor that projection matching does not leave. It then runs
:func:`cryoace.reconstruct.refine.refine` on the same normalized images, so the map's units match.
Each round writes ``volume_refine_RR.mrc``, a ``refine`` record in metrics.jsonl (bands, mean error,
median pose change since the last round, the half maps' FSC-0.143 resolution, wall time counted on
from the training time, coverage and —
when the particle file has poses — the errors against them with the aligning rotation, as the
training's ``poses`` records) and redraws ``refine.png`` (pose change and error per round). At the end the
refined map becomes ``volume.mrc`` (and ``volume.png``); the caller writes the refined poses to
``poses.star`` (the encoder's own predictions go to ``poses_encoder.star``).

After each round the stage saves its state to ``checkpoints/refine.pt`` (atomically): a resumed run
whose training is over goes on from the last completed round (ab initio and earlier rounds are not
repeated); a checkpoint from another training step (the training went on) is ignored.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import numpy as np
import torch

from ..io.atomic import atomic_path
from ..io.mrc import read_volume, write_mrc
from ..reconstruct.ab_initio import AbInitioIteration, AbInitioSettings, ab_initio, mean_search_error
from ..reconstruct.refine import RefineRound, RefineSettings, RefineState, refine
from ..types import Pose
from .monitor import PoseMonitor

__all__ = ["refine_run"]


def refine_run(trainer, dataset, predicted: Pose, log: Callable[[str], None], progress: bool = True) -> Pose:
    """Refine the poses and map of ``trainer``'s run (see the module docstring); returns the refined
    poses (``predicted``, the encoder's, where there is nothing to refine)."""
    from ..evaluate.plots import plot_refinement, read_metrics
    from .export import plot_volume

    cfg = trainer.config.refine
    if len(dataset) < 2:  # two half sets are needed
        log("refinement skipped: it needs at least 2 particles")
        return predicted
    run_dir = trainer.run_dir
    pixel_size = trainer.pixel_size
    decoder_map = torch.as_tensor(read_volume(run_dir / "volume.mrc").data.copy())  # Trainer.finalize wrote it
    settings = RefineSettings(rounds=cfg.rounds, max_time_s=cfg.max_time_s, global_step_deg=cfg.global_step_deg,
                              batch_size=cfg.batch_size)
    n = len(dataset)
    monitor = PoseMonitor(n, "cpu", trainer.truth_rotmat_of())

    def on_round(record: RefineRound, pose: Pose, volume) -> None:
        write_mrc(run_dir / f"volume_refine_{record.round:02d}.mrc", volume.float().cpu().numpy(), pixel_size)
        gold = record.half_map_fsc.resolution(0.143)
        half_map = {"half_fsc0143_px": gold.px, "half_fsc0143_angst": gold.angstrom}
        monitor.update(np.arange(n), pose.rotmat.cpu())
        summary = monitor.summary()
        trainer.write_record({"kind": "refine", "step": trainer.step, "round": record.round,
                              "elapsed_s": clock(), "global_shells": record.global_shells,
                              "local_shells": record.local_shells, "mean_error": record.mean_error,
                              "pose_change_median_deg": record.pose_change_median_deg, **half_map, **summary})
        errors = (f", median error {summary['rot_median_deg']:.1f}° vs the file's poses"
                  if "rot_median_deg" in summary else "")
        moved = ("" if record.pose_change_median_deg is None
                 else f", poses moved {record.pose_change_median_deg:.2f}° (median)")
        log(f"refinement round {record.round + 1}: band {record.local_shells} shells, mean error "
            f"{record.mean_error:.4g}{moved}, half maps FSC-0.143 {gold.angstrom:.2f} Å{errors} "
            f"({record.elapsed_s:.0f} s)")
        plot_refinement(read_metrics(run_dir / "metrics.jsonl", kind="refine"), run_dir / "refine.png")

    checkpoint = run_dir / "checkpoints" / "refine.pt"
    resume, stage_elapsed = _load_state(checkpoint, trainer.step, n, log)
    stage_start = time.monotonic() - stage_elapsed

    def clock() -> float:  # the records' wall time goes on from the training's
        return trainer.elapsed_s + (time.monotonic() - stage_start)

    def on_state(state: RefineState) -> None:
        with atomic_path(checkpoint) as tmp:
            torch.save({"step": trainer.step, "round": state.round, "rotmat": state.pose.rotmat.cpu(),
                        "shift_angst": state.pose.shift_angst.cpu(), "half_references": state.half_references.cpu(),
                        "volume": state.volume.cpu(), "stage_elapsed_s": time.monotonic() - stage_start}, tmp)

    if resume is None:
        seed_map = (_ab_initio_seed(trainer, dataset, decoder_map, clock, log, progress) if cfg.ab_initio
                    else decoder_map)
        log(f"refining poses and map by projection matching ({cfg.rounds} rounds, SO(3) grid {cfg.global_step_deg:g}°)")
    else:
        seed_map = decoder_map  # not used: the saved state holds the references
        log(f"resuming the refinement after round {resume.round + 1} of {cfg.rounds}")
    result = refine(dataset, seed_map, settings, use_ctf=trainer.use_ctf, device=trainer.device,
                    progress=progress, on_round=on_round, resume=resume, on_state=on_state)
    rounds_done = result.rounds[-1].round + 1 if result.rounds else resume.round + 1
    volume = result.volume.float()
    # until here volume.mrc is the decoder's (an interrupted stage leaves it)
    os.replace(run_dir / "volume.mrc", run_dir / "volume_decoder.mrc")
    write_mrc(run_dir / "volume.mrc", volume.numpy(), pixel_size)
    plot_volume(volume, run_dir / "volume.png", pixel_size,
                title=f"cryoace map after {rounds_done} refinement rounds "
                      f"({trainer.image_size}³, {pixel_size:.4g} Å/voxel)")
    return result.pose


def _ab_initio_seed(trainer, dataset, decoder_map: torch.Tensor, clock: Callable[[], float],
                    log: Callable[[str], None], progress: bool) -> torch.Tensor:
    """The ab initio map or the decoder's, whichever has the lower search error (see the module doc);
    ``clock()`` is the run's wall time for the records."""
    cfg = trainer.config.refine
    settings = AbInitioSettings(iterations=cfg.ab_initio_iterations, seed=trainer.config.seed)

    def on_iteration(record: AbInitioIteration, volume) -> None:
        trainer.write_record({"kind": "ab_initio", "step": trainer.step, "iteration": record.iteration,
                              "elapsed_s": clock(), **{k: v for k, v in dataclasses.asdict(record).items()
                                                       if k not in ("iteration", "elapsed_s")}})

    log(f"ab initio: {settings.iterations} iterations of stochastic EM over poses from a blob "
        f"(band {settings.start_shells}→{settings.end_shells} shells, SO(3) grid {settings.step_deg:g}°)")
    built = ab_initio(dataset, None, settings, use_ctf=trainer.use_ctf, device=trainer.device,
                      progress=progress, on_iteration=on_iteration)
    write_mrc(trainer.run_dir / "volume_abinitio.mrc", built.volume.float().numpy(), trainer.pixel_size)
    errors = {name: mean_search_error(dataset, volume, settings.end_shells, step_deg=settings.step_deg,
                                      use_ctf=trainer.use_ctf, device=trainer.device, seed=trainer.config.seed)
              for name, volume in (("decoder", decoder_map), ("ab_initio", built.volume))}
    chosen = min(errors, key=errors.get)
    trainer.write_record({"kind": "refine_seed", "step": trainer.step, "elapsed_s": clock(),
                          "chosen": chosen, **{f"search_error_{k}": v for k, v in errors.items()}})
    log(f"refinement starts from the {'ab initio' if chosen == 'ab_initio' else 'decoder'} map (mean search "
        f"error {errors['ab_initio']:.5g} ab initio vs {errors['decoder']:.5g} decoder, "
        f"band {settings.end_shells} shells)")
    return built.volume if chosen == "ab_initio" else decoder_map


def _load_state(path, step: int, n: int, log: Callable[[str], None]) -> tuple[RefineState | None, float]:
    """The refinement state saved by an interrupted stage of this run (same training step and
    particles), and the stage's wall time until then; (None, 0) when there is none to go on from."""
    if not path.is_file():
        return None, 0.0
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = RefineState(round=int(saved["round"]), pose=Pose(saved["rotmat"], saved["shift_angst"]),
                            half_references=saved["half_references"], volume=saved["volume"])
    except Exception as exc:  # a damaged file: start the stage afresh rather than fail the run
        log(f"ignoring the refinement checkpoint {path} ({type(exc).__name__}: {exc})")
        return None, 0.0
    if int(saved["step"]) != step or state.pose.rotmat.shape[0] != n:
        log(f"ignoring the refinement checkpoint {path}: it is from training step {int(saved['step'])} with "
            f"{state.pose.rotmat.shape[0]} particles, this run is at step {step} with {n}")
        return None, 0.0
    return state, float(saved["stage_elapsed_s"])
