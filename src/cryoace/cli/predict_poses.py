"""Predict every particle's pose with the trained encoder of a reconstruction run.

Rebuilds the run's encoder and decoder from RUN_DIR (config.yaml, checkpoints/last.pt), prepares the
images as in training (Fourier-cropped to the run's box, normalized with the run's mean and std; the
pixel size must match), runs the encoder over every particle in batches without gradients, and — for
a run trained with the symmetric loss — keeps, per image, the pose of the better of the direct and
the 180°-rotated path (as 'cryoace reconstruct' does for its poses.star). Writes a RELION 3.1 star
file with rlnAngleRot/Tilt/Psi (degrees) and rlnOriginX/YAngst (Å), keeping every input column, that
'cryoace backproject', RELION and cryoSPARC read. Particles are predicted chunk by chunk (--chunk-rows
at a time) into a temporary file next to the output (88 bytes per particle, removed at the end), then
written chunk by chunk, so memory stays flat with millions of particles.

A run made with --teach-encoder also holds an encoder taught from its final map
(checkpoints/encoder_taught.pt): by default (--encoder auto) its poses are predicted, in the map's
frame — poses to start a local refinement from, for particles of the same molecule that were not in
the run. --encoder network picks the encoder trained with the decoder.

The output's suffix picks the format: .star as above, .cs for cryoSPARC (alignments3D/pose and shift)
or .pkl for cryoDRGN (rotations and shifts as a fraction of the box).

Example:
  cryoace predict-poses run1 particles.star -o poses.star
  cryoace predict-poses run1 particles.mrcs --ctf ctf.pkl -o pose.pkl
  cryoace backproject poses.star -o map_from_poses.mrc
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..defaults import CHUNK_ROWS
from ..errors import CryoaceInputError
from .particle_input import add_particle_input_args, open_particle_table


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a 'cryoace reconstruct' run directory")
    parser.add_argument("particles", type=Path, help="particles: RELION .star, cryoSPARC .cs or an .mrcs stack")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output poses, in the format of its suffix: .star (RELION, every input column "
                        "kept), .cs (cryoSPARC) or .pkl (cryoDRGN pose pickle)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint other than RUN_DIR/checkpoints/last.pt")
    parser.add_argument("--encoder", choices=("auto", "taught", "network"), default="auto",
                        help="taught: the encoder taught from the run's final map (reconstruct --teach-encoder; "
                        "RUN_DIR/checkpoints/encoder_taught.pt); network: the one trained with the decoder; "
                        "auto (default): the taught one when the run has it and no --checkpoint is given")
    add_run_input_args(parser)
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS,
                        help=f"particles predicted (and written) at once (default {CHUNK_ROWS}; every chunk but "
                             "the last has exactly this many, so its batches have the same shapes each time)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_particle_input_args(parser, poses_flag=None)


def add_run_input_args(parser: argparse.ArgumentParser) -> None:
    """The options of a command that reads particles as a run's encoder sees them (:func:`open_with_encoder`)."""
    parser.add_argument("--datadir", type=Path, help="directory holding the image stacks, if not where the file says")
    parser.add_argument("--invert-contrast", action="store_true", default=None,
                        help="for stacks with dark particles (default: as the run was trained)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder batch (default 256)")


def main(args: argparse.Namespace) -> int:
    from ..runtime import resolve_device
    from ..train.predict import POSE_SUFFIXES, write_poses

    for name in ("batch_size", "chunk_rows"):
        if getattr(args, name) <= 0:
            raise CryoaceInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.output.is_dir():
        raise CryoaceInputError("output is a directory; give a file name such as poses.star", args.output)
    if args.output.suffix.lower() not in POSE_SUFFIXES:
        raise CryoaceInputError("the output must be a .star (RELION), .cs (cryoSPARC) or .pkl (cryoDRGN) file",
                                args.output)
    device = resolve_device(args.device)
    _, table, _, poses, what = open_with_encoder(args, device)
    write_poses(args.output, table, poses, chunk_rows=args.chunk_rows, progress=not args.quiet)
    print(f"wrote {args.output}: poses of {len(table)} particles from {args.run_dir} ({what})", file=sys.stdout)
    return 0


def open_with_encoder(args: argparse.Namespace, device):
    """The particles of ``args.particles`` prepared as the run ``args.run_dir`` trained on, and the encoder
    that ``args.encoder`` picks (``auto``: the taught one when the run has it and no ``args.checkpoint``
    is given): (the run, table, dataset, rows → Pose, what the poses come from)."""
    from ..pipeline.refine_stage import TAUGHT_ENCODER
    from ..train.predict import load_run, open_particles, pose_predictor
    from ..train.teach import load_taught_encoder

    taught_path = args.run_dir / TAUGHT_ENCODER
    checkpoint = getattr(args, "checkpoint", None)
    taught = None
    if args.encoder == "taught" or (args.encoder == "auto" and checkpoint is None and taught_path.is_file()):
        taught = load_taught_encoder(taught_path, device)
    run = load_run(args.run_dir, device, checkpoint)
    table = open_particle_table(args, args.particles)
    table.pose = None  # the file's own angles are replaced, not read: 20 bytes per particle less to hold
    invert = run.config.data.invert_contrast if args.invert_contrast is None else args.invert_contrast
    dataset = open_particles(args.particles, run.data, invert_contrast=invert, table=table)
    if taught is not None:
        def poses(rows):
            return taught.predict_particles(dataset.subset(rows), batch_size=args.batch_size, device=device)

        return run, table, dataset, poses, "the encoder taught from the run's map"
    symmetric = run.config.loss == "symmetric"
    radius = run.config.band_shells(run.step, run.data.image_size) / run.data.image_size
    poses = pose_predictor(run.encoder, run.decoder, dataset, symmetric=symmetric, use_ctf=run.data.use_ctf,
                           batch_size=args.batch_size, device=device, radius_cyc_px=radius)
    return run, table, dataset, poses, f"the run's encoder at step {run.step}{', symmetric paths' if symmetric else ''}"
