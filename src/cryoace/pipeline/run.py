"""A whole reconstruction run: particles + configuration → RUN_DIR with every output.

:func:`run_reconstruction` is what ``cryoace reconstruct`` and ``cryoace demo`` call: it checks the
run directory, opens the particles as the configuration says, checks their contrast (white on dark,
:mod:`cryoace.io.contrast`; stops or inverts before anything is written), writes ``config.yaml`` (settings,
seeds, data description, provenance; a resumed run appends its command line to ``resumed``),
trains (:class:`~cryoace.train.trainer.Trainer`), writes ``volume.mrc`` and the PNGs, and predicts
every particle's pose into ``poses.star`` (:func:`~cryoace.train.predict.predict_poses`), and last
the self-contained ``report.html`` (:mod:`cryoace.evaluate.report`). With ``refine.enabled`` the
encoder's poses go to ``poses_encoder.star``, the decoder's map to ``volume_decoder.mrc``, and the
projection-matching refinement seeded by that map (:mod:`cryoace.pipeline.refine_stage`) writes
``volume.mrc`` and ``poses.star`` (rank 0 only; ``--halves`` runs have no refinement stage).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import CryoaceInputError
from ..train.config import TrainConfig, load_config, provenance, save_config, spawn_seeds
from .budget import JobBudget, describe_stages, stage_record
from .rundir import RunResult, check_run_dir, has_checkpoint, open_training_dataset, write_run_report

__all__ = ["RunResult", "run_reconstruction", "check_run_dir", "has_checkpoint", "FINAL_PASS_WAIT_S"]

#: how long the other torchrun ranks may wait (s) for rank 0's ab initio and refinement rounds before
#: they share the final pass (the process group's timeout)
FINAL_PASS_WAIT_S = 24 * 3600.0


def run_reconstruction(particles: str | os.PathLike, run_dir: str | os.PathLike, config: TrainConfig,
                       resume: bool = False, argv: list[str] | None = None, arguments: dict | None = None,
                       progress: bool = True,
                       log: Callable[[str], None] | None = None, table=None) -> RunResult:
    """Train on ``particles`` into ``run_dir`` and write every output (module docstring).

    With ``resume`` the run continues from ``run_dir/checkpoints/last.pt``; ``config`` must then be
    the run's own (budget, device and workers may differ). ``table`` (a ParticleTable) skips reading
    ``particles`` again. ``argv`` (default ``sys.argv``) and ``arguments`` (the parsed options) are
    recorded in the provenance. The run directory is locked for the whole run (:mod:`cryoace.io.lock`):
    a second process writing it (e.g. a second ``--resume``) is refused.
    """
    from ..io.lock import folder_lock

    kwargs = dict(resume=resume, argv=argv, arguments=arguments, progress=progress, log=log, table=table)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock for all ranks
        return _run_reconstruction(particles, run_dir, config, **kwargs)
    with folder_lock(run_dir, "run directory"):
        return _run_reconstruction(particles, run_dir, config, **kwargs)


def _run_reconstruction(particles, run_dir, config: TrainConfig, resume: bool, argv, arguments, progress: bool,
                        log, table) -> RunResult:
    import torch  # noqa: F401  (imported here so `cryoace --help` stays fast)

    from ..io.particles import read_particles
    from ..io.preload import prepare_dataset
    from ..train import distributed
    from ..train.predict import pose_predictor, predict_poses, write_poses_star
    from ..train.trainer import DataInfo, Trainer, load_checkpoint_file
    from .refine_stage import DECODER_MAP

    wall0 = time.monotonic()
    log = log or (lambda m: None)
    run_dir = Path(run_dir)
    if config.halves:  # two independent half-set models and their half-map FSC (gold standard)
        from .halves import run_halves

        if distributed.env_world_size() > 1:  # every rank would train and write both halves
            raise CryoaceInputError("--halves does not run under torchrun; start it as a single process")

        if config.refine.enabled:
            log("--halves: the two half models' maps are the result (no projection-matching refinement stage)")
        return run_halves(particles, run_dir, config, resume=resume, argv=argv, arguments=arguments,
                          progress=progress, log=log, table=table)
    config.validate()
    check_run_dir(run_dir, resume)
    owns_group = distributed.env_world_size() > 1 and not distributed.current().enabled
    # torchrun: join the group, cuda:LOCAL_RANK; with a refinement stage the other ranks wait through rank 0's
    # ab initio and rounds to share the final pass over every particle, hence the long timeout
    ctx = distributed.init_distributed(config.device, timeout_s=FINAL_PASS_WAIT_S if config.refine.enabled else 1800.0)
    ctx.barrier()  # every rank has checked RUN_DIR before rank 0 writes into it
    device = ctx.device
    if not ctx.is_main:  # rank 0 alone logs and writes
        log, progress = (lambda m: None), False
    seeds = spawn_seeds(config.seed)

    if table is None:
        table = read_particles(particles, datadir=config.data.datadir)
    dataset = open_training_dataset(table, particles, config, seeds["normalization"], resume, log)
    data_info = None
    if resume:
        state = load_checkpoint_file(run_dir / "checkpoints" / "last.pt")
        data_info = DataInfo(**state["data"])
        if data_info.n_particles != len(dataset) or data_info.image_size != dataset.image_size:
            raise CryoaceInputError(f"these particles ({len(dataset)} images of {dataset.image_size} px) "
                                    f"are not the run's ({data_info.n_particles} of {data_info.image_size} px)",
                                    particles)
        dataset.norm_mean, dataset.norm_std = data_info.norm_mean, data_info.norm_std
        del state

    dataset = prepare_dataset(dataset, config.data.preload, device, ctx.local_world_size, log, progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, dataset, run_dir, device=device, data_info=data_info, progress=progress, log=log)
    prov = provenance(argv)
    if arguments is not None:
        prov["arguments"] = arguments
    extra = {"seeds": seeds, "data": trainer.data_info.to_dict(), "provenance": prov}
    if resume and (run_dir / "config.yaml").is_file():
        _, old = load_config(run_dir / "config.yaml")
        extra["provenance"] = old.get("provenance", prov)
        extra["resumed"] = list(old.get("resumed") or []) + [prov]
    if ctx.is_main:
        save_config(run_dir / "config.yaml", config, extra)
    if resume:
        trainer.load_checkpoint(run_dir / "checkpoints" / "last.pt")
        log(f"resuming at step {trainer.step} (epoch {trainer.epoch}, {trainer.elapsed_s:.0f} s trained)")

    n_params = sum(p.numel() for p in trainer.params)
    log(f"{len(dataset)} particles, box {trainer.image_size} px at {trainer.pixel_size:.4g} Å/px, "
        f"CTF {'on' if trainer.use_ctf else 'off'}, {config.loss} loss, {config.decoder.name} decoder, "
        f"{n_params:,} parameters, batch {trainer.batch_size}"
        + (f" ({trainer.batch_size // ctx.world_size} on each of {ctx.world_size} processes)" if ctx.enabled else "")
        + f", device {device}")
    budget = JobBudget.of(config)
    trainer.time_limit_s = budget.networks_s()
    log(budget.describe())
    trainer.fit()
    trainer.write_record(stage_record("networks", trainer.step, 0.0, trainer.elapsed_s, budget.networks_s(),
                                      steps=trainer.step))
    # the final pass over the particles not in the refinement rounds is split over the ranks
    share_final_pass = ctx.enabled and config.refine.enabled
    if owns_group and not share_final_pass:  # training is over: the other ranks may leave while rank 0 writes
        distributed.cleanup()
    # with a refinement stage the decoder's map is not the result: volume.mrc waits for the stage's map
    trained = time.monotonic()
    trainer.finalize(DECODER_MAP if config.refine.enabled else "volume.mrc")
    poses_path = run_dir / "poses.star"
    gold = None
    if ctx.is_main:
        options = dict(symmetric=trainer.symmetric, use_ctf=trainer.use_ctf, batch_size=config.predict_batch_size,
                       device=device, radius_cyc_px=trainer.band_shells() / trainer.image_size)
        if config.refine.enabled:  # projection matching from the decoder's map (pipeline.refine_stage)
            from .refine_stage import refine_run

            def encoder_poses():
                return predict_poses(trainer.encoder, trainer.decoder, dataset, progress=progress, **options)

            subset = config.refine.subset
            if subset is None or len(dataset) <= subset:  # the networks' poses beside the result, for comparison
                log(f"predicting the poses of {len(dataset)} particles with the networks' encoder")
                pose = encoder_poses()
                write_poses_star(run_dir / "poses_encoder.star", table, pose)
                after_training_s = time.monotonic() - trained
                trainer.write_record(stage_record("encoder_poses", trainer.step, trainer.elapsed_s,
                                                  trainer.elapsed_s + after_training_s, None, particles=len(dataset)))
                predicted = lambda: pose  # noqa: E731
            else:  # a pass over every particle that nothing uses: left to predict-poses (the cost stays bounded)
                log(f"no poses_encoder.star: with more particles than --refine-subset ({subset}) the networks' "
                    f"poses are not predicted for every particle (cryoace predict-poses {run_dir} PARTICLES "
                    "-o poses_encoder.star gives them)")
                after_training_s, predicted = time.monotonic() - trained, encoder_poses
            refined = refine_run(trainer, dataset, predicted, log, progress, table=table,
                                 after_training_s=after_training_s,
                                 ranks=(ctx.rank, ctx.world_size) if share_final_pass else None)
            write_poses_star(poses_path, table, refined.pose, columns=refined.columns or None)
            gold = refined.gold
        else:  # amortized to the end: predicted chunk by chunk, then poses.star written chunk by chunk
            log(f"predicting the poses of {len(dataset)} particles")
            write_poses_star(poses_path, table, pose_predictor(trainer.encoder, trainer.decoder, dataset, **options),
                             progress=progress)
            log("no resolution is reported: the networks were trained on all particles together, so no "
                "independent half maps exist (use --refine, or --halves, for a gold-standard FSC)")
        stages = [r for r in trainer.history if r["kind"] == "stage"]
        if len(stages) > 1:
            log(describe_stages(stages, budget.total_s))
        write_run_report(run_dir, log)
    elif share_final_pass:  # the other ranks: their share of the final pass, then they leave
        from .refine_stage import follow_final_pass

        follow_final_pass(trainer, dataset, table, (ctx.rank, ctx.world_size))
    if owns_group and share_final_pass:
        distributed.cleanup()
    final = next((r["loss"] for r in reversed(trainer.history) if r["kind"] == "train"), None)
    return RunResult(run_dir=run_dir, volume=run_dir / "volume.mrc", poses=poses_path, config=run_dir / "config.yaml",
                     steps=trainer.step, epochs=trainer.step / trainer.steps_per_epoch,
                     train_time_s=trainer.elapsed_s, wall_time_s=time.monotonic() - wall0,
                     final_loss=final, voxel_size=trainer.pixel_size, image_size=trainer.image_size,
                     resolution_angst=gold.resolution().angstrom if gold is not None and gold.resolved else None,
                     gold_standard=gold)
