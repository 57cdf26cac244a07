"""Refine the poses of new particles against a finished run's half maps, and rebuild the map from them.

For particles of the same molecule that were not in the run (a new collection, a larger selection):
each particle's pose is first predicted in one forward pass by the run's encoder (the one taught
from its map with 'reconstruct --teach-encoder' when the run has it, else the networks' encoder;
--encoder picks, none skips it), then searched against the run's half map of its own half set
(RUN_DIR/volume_half1.mrc or volume_half2.mrc; rlnRandomSubset when the file has it, else a seeded
random split). Local search first: each particle is searched locally from the encoder's pose (cubes
as wide as the encoder's error needs, then finer) at the run's final band, and only where the found
pose's score stays below a threshold does it fall back to the global search over SO(3). The reach
and the threshold are calibrated on 256 particles searched both ways: the kept local results may
explain their images worse than the global search's in at most 5 % of them; an encoder whose poses
are mostly beyond a local search's reach (another frame) is not used. OUT gets poses.star (every
input column kept, with rlnRandomSubset, cryoacePoseConfidence — NaN where a local result was kept:
no global search measured it — and cryoacePoseScore, the pose's fit against random rotations in
standard deviations), search.json (how the search went: the calibration, how many particles fell
back to the global search, its wall time), volume.mrc and the half maps built from these particles alone
(volume_half1.mrc, volume_half2.mrc, volume_mask.mrc), gold_standard.json and fsc.png: the new half
maps are as independent as the run's, so their FSC is a gold standard; a resolution is only claimed
beyond the run's --refine-start-resolution (what the run's half maps shared). The images are
prepared as the run's (Fourier-cropped to its box, normalized with its mean and std); the pixel size
must match.

Under torchrun (one process per GPU, or gloo on the CPU) the encoder's pass, the searches and the
map's Fourier sums are split over the processes (each takes every WORLD_SIZE-th particle) and
summed; rank 0 writes OUT. The result is the single process's, up to the order of float sums.

Exit status: 0 done; 2 bad input (a run without half maps, another box or pixel size); 4 the half
maps resolved nothing (NOT RESOLVED, as 'cryoace reconstruct').

Example:
  cryoace reconstruct particles.star -o run1 --teach-encoder 10m
  cryoace refine run1 new_particles.star -o refined_new
  cryoace fsc refined_new/volume.mrc run1/volume.mrc
  torchrun --nproc-per-node 4 -m cryoace refine run1 new_particles.star -o refined_new --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import CryoaceInputError
from .particle_input import add_particle_input_args
from .predict_poses import add_run_input_args

HALF_MAPS = ("volume_half1.mrc", "volume_half2.mrc")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a finished 'cryoace reconstruct' run with a refinement stage (its half maps)")
    parser.add_argument("particles", type=Path, help="particles: RELION .star, cryoSPARC .cs or an .mrcs stack")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                        help="output directory (poses.star, volume.mrc, half maps, gold_standard.json, fsc.png)")
    parser.add_argument("--encoder", choices=("auto", "taught", "network", "none"), default="auto",
                        help="the poses to start from: taught (RUN_DIR/checkpoints/encoder_taught.pt), network "
                        "(the encoder trained with the decoder), none (the global search alone); auto (default): "
                        "taught when the run has it, else network")
    parser.add_argument("--no-local-first", action="store_true",
                        help="search every particle globally over SO(3) as well (the encoder's pose is still carried "
                        "locally and kept where it fits better): slower, for comparison or a poor encoder")
    parser.add_argument("--false-accept", type=float, default=None, metavar="F",
                        help="local first: the score threshold keeps at most F of a calibration sample's local results "
                        "that fit their image worse than the global search (default: the run's --refine-false-accept; "
                        "lower: more particles searched globally)")
    parser.add_argument("--centring", type=float, default=None, metavar="F",
                        help="the global search's centring radius as a fraction of the box (default: the run's "
                        "--refine-centring; 0: shifts around 0 only)")
    add_run_input_args(parser)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_particle_input_args(parser, poses_flag=None)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate.gold_standard import UNRESOLVED_EXIT_CODE
    from ..io.atomic import atomic_path
    from ..io.mrc import read_volume, write_mrc
    from ..pipeline.refine_stage import encoder_starts, half_sets_of, stage_settings
    from ..pipeline.rundir import write_gold_standard
    from ..reconstruct.refine import refine_particles
    from ..train import distributed
    from ..train.config import check_centring_radius, check_false_accept
    from ..train.predict import write_poses_star
    from ..train.teach import pose_agreement
    from .predict_poses import open_with_encoder

    if args.batch_size <= 0:
        raise CryoaceInputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.centring is not None:
        check_centring_radius("--centring", args.centring)
    if args.false_accept is not None:
        check_false_accept("--false-accept", args.false_accept)
    out: Path = args.output
    if out.exists() and not out.is_dir():
        raise CryoaceInputError("the output exists and is not a directory", out)
    if (out / "poses.star").exists():
        raise CryoaceInputError("the output directory already holds a refinement (poses.star); give another", out)
    for name in HALF_MAPS:
        if not (args.run_dir / name).is_file():
            raise CryoaceInputError(f"the run has no {name}: refine needs the half maps of a run with a refinement "
                                    "stage (cryoace reconstruct --refine, on in the cpu preset)", args.run_dir / name)
    context = distributed.init_distributed(args.device)  # a no-op outside torchrun
    device = context.device
    rank, world = context.rank, context.world_size
    choice = args.encoder
    args.encoder = "network" if choice == "none" else choice  # the run's data preparation is needed either way
    run, table, dataset, predict, what = open_with_encoder(args, device)
    half_maps = torch.stack([torch.as_tensor(read_volume(args.run_dir / name).data.copy()) for name in HALF_MAPS])
    if tuple(half_maps.shape[1:]) != (dataset.image_size,) * 3:
        raise CryoaceInputError(f"the run's half maps are {tuple(half_maps.shape[1:])}, its images "
                                f"{dataset.image_size} px", args.run_dir / HALF_MAPS[0])
    n = len(dataset)
    quiet = args.quiet or not context.is_main
    say = (lambda m: None) if quiet else (lambda m: print(f"cryoace refine: {m}", file=sys.stderr))
    mine = np.arange(rank, n, world)  # the particles this process searches (extend_refinement's split)
    initial = None
    if choice != "none":
        say(f"predicting the poses of {n} particles with {what}"
            + (f" ({len(mine)} in each of {world} processes)" if world > 1 else ""))
        initial = encoder_starts(predict, n, (rank, world))
    settings = stage_settings(run.config)  # the run's final bands, grid and start low-pass
    settings = dataclasses.replace(settings, local_first=not args.no_local_first)
    if args.centring is not None:
        settings = dataclasses.replace(settings, centring_radius=args.centring)
    if args.false_accept is not None:
        settings = dataclasses.replace(settings, max_false_accept=args.false_accept)
    halves = half_sets_of(table, n, run.config.seed)
    say(f"searching {n} particles against the run's half maps (each half set against its own)")
    started = time.monotonic()
    result = refine_particles(dataset, half_maps.float(), halves, settings, initial=initial,
                              use_ctf=run.data.use_ctf, device=device,
                              progress=not quiet, ranks=(rank, world) if world > 1 else None)
    search_s = time.monotonic() - started
    if not context.is_main:  # rank 0 writes; the others hold the same result
        distributed.cleanup()
        return 0
    out.mkdir(parents=True, exist_ok=True)
    write_mrc(out / "volume.mrc", result.volume.float().numpy(), run.data.pixel_size)
    gold = write_gold_standard(out, result.half_volumes[0], result.half_volumes[1], run.data.pixel_size,
                               result.start_resolution_px, result.confidence, result.check,
                               title="gold-standard FSC of the new particles' half maps")
    write_poses_star(out / "poses.star", table, result.pose, columns=result.star_columns())
    search = {"particles": n, "processes": world, "search_s": search_s, "encoder": None if choice == "none" else what,
              "local_first": None if result.local_first is None else result.local_first.to_dict()}
    with atomic_path(out / "search.json") as tmp:
        tmp.write_text(json.dumps(search, indent=2) + "\n")
    if initial is not None:  # (rank 0's particles)
        median, within = pose_agreement(initial.rotmat[mine], result.pose.rotmat[mine])
        print(f"{what}: its poses were within {median:.1f}° of the refined ones (median; "
              f"{100 * within:.0f} % within 15°)")
    if result.local_first is not None:
        print(f"search: {result.local_first.describe()}")
    print(f"wrote {out}/poses.star, volume.mrc, volume_half1.mrc, volume_half2.mrc, volume_mask.mrc, "
          f"gold_standard.json and fsc.png ({n} particles)")
    for line in gold.summary():
        print(line)
    distributed.cleanup()
    return 0 if gold.resolved else UNRESOLVED_EXIT_CODE
