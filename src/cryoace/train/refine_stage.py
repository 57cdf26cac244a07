"""The refinement stage of a run: projection matching seeded by the trained decoder's map.

After the amortized training (``TrainConfig.refine.enabled``), :func:`refine_run` takes the decoder's
map (already written as ``volume.mrc``; renamed ``volume_decoder.mrc`` when the stage ends) and runs
:func:`cryoace.reconstruct.refine.refine` on the same normalized images, so the map's units match.
Each round writes ``volume_refine_RR.mrc``, a ``refine`` record in metrics.jsonl (bands, mean error,
median pose change since the last round, the half maps' FSC-0.143 resolution, wall time counted on
from the training time, coverage and —
when the particle file has poses — the errors against them with the aligning rotation, as the
training's ``poses`` records) and redraws ``refine.png`` (pose change and error per round). At the end the
refined map becomes ``volume.mrc`` (and ``volume.png``); the caller writes the refined poses to
``poses.star`` (the encoder's own predictions go to ``poses_encoder.star``).

The stage is not checkpointed: a resumed run repeats it from the decoder's map.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from ..io.mrc import read_volume, write_mrc
from ..reconstruct.refine import RefineRound, RefineSettings, refine
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
    monitor = PoseMonitor(n, "cpu", trainer._truth_rotmat())

    def on_round(record: RefineRound, pose: Pose, volume) -> None:
        write_mrc(run_dir / f"volume_refine_{record.round:02d}.mrc", volume.float().cpu().numpy(), pixel_size)
        gold = record.half_map_fsc.resolution(0.143)
        half_map = {"half_fsc0143_px": gold.px, "half_fsc0143_angst": gold.angstrom}
        monitor.update(np.arange(n), pose.rotmat.cpu())
        summary = monitor.summary()
        trainer._record({"kind": "refine", "step": trainer.step, "round": record.round,
                         "elapsed_s": trainer.elapsed_s + record.elapsed_s, "global_shells": record.global_shells,
                         "local_shells": record.local_shells, "mean_error": record.mean_error,
                         "pose_change_median_deg": record.pose_change_median_deg, **half_map, **summary})
        errors = f", median error {summary['rot_median_deg']:.1f}° vs the file's poses" if "rot_median_deg" in summary else ""
        moved = "" if record.pose_change_median_deg is None else f", poses moved {record.pose_change_median_deg:.2f}° (median)"
        log(f"refinement round {record.round + 1}: band {record.local_shells} shells, mean error "
            f"{record.mean_error:.4g}{moved}, half maps FSC-0.143 {gold.angstrom:.2f} Å{errors} "
            f"({record.elapsed_s:.0f} s)")
        plot_refinement(read_metrics(run_dir / "metrics.jsonl", kind="refine"), run_dir / "refine.png")

    log(f"refining poses and map by projection matching ({cfg.rounds} rounds, SO(3) grid {cfg.global_step_deg:g}°)")
    result = refine(dataset, decoder_map, settings, use_ctf=trainer.use_ctf, device=trainer.device,
                    progress=progress, on_round=on_round)
    volume = result.volume.float()
    # until here volume.mrc is the decoder's (an interrupted stage leaves it)
    os.replace(run_dir / "volume.mrc", run_dir / "volume_decoder.mrc")
    write_mrc(run_dir / "volume.mrc", volume.numpy(), pixel_size)
    plot_volume(volume, run_dir / "volume.png", pixel_size,
                title=f"cryoace map after {len(result.rounds)} refinement rounds "
                      f"({trainer.image_size}³, {pixel_size:.4g} Å/voxel)")
    return result.pose
