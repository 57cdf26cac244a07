"""Ab initio reconstruction with unknown poses (cryoAI: amortized pose encoder + FourierNet decoder).

Reads particles (RELION .star, cryoSPARC .cs, or an .mrcs stack), trains a pose encoder (image →
rotation and shift) jointly with a neural Fourier volume through the shared image-formation model
(CTF, shift, central slice), with cryoAI's symmetric loss by default, and writes into RUN_DIR:
config.yaml (every setting, seeds, version, command line), checkpoints/ (step_XXXXXX.pt, last.pt),
metrics.jsonl and tensorboard/ (loss curves), volume_STEP.mrc maps during training, and at the end
volume.mrc (voxel size = the images' pixel size after --downsample), volume.png (central slices and
projections), loss.png and poses.star (every particle's predicted pose, all input columns kept).

Presets: tiny (seconds, for tests), cpu (small networks for a 2-core CPU, 8 minutes of training then
10 rounds of --refine, about 6 minutes on the demo) and paper
(cryoAI's: VGG16-like encoder, FourierNet 256, batch 64, AMSGrad lr 1e-4, clip 1.0; 20 epochs).

ACE-EM: --pip adds the pose-image-pose task (random poses rendered by the decoder, made noisy and
encoded; a pose loss), --warmup-labels K fits low-passed images first, --decoder voxel-real /
voxel-fourier use voxel grids (own learning rate 1.0; --optimizer adamw), --loss gsym the generalized
symmetric loss, --shift-l1 penalises large shifts, --encoder resnet18. Every --eval-every steps the
coverage of the recent training poses (and, when the particle file has angles, their errors after
global alignment) goes to metrics.jsonl, TensorBoard and viewing_directions.png.
The default is cpu on the CPU and paper on a GPU. Options override the preset. The budget stops at
the first of --steps, --epochs, --max-time (given ones replace the preset's; totals over resumes).
--resume continues an interrupted run exactly (same settings; a larger budget trains further). A
NaN/Inf loss rolls back to the last checkpoint with half the learning rate. Before training, a quick
pose-free test on up to 1000 particles stops the run if they look dark on a light background (fix it
with --invert-contrast, or let --auto-invert do it; --no-check-contrast skips the test).

Example:
  cryoace reconstruct particles.star -o run1 --max-time 30m
  cryoace reconstruct particles.star -o run1 --resume --max-time 1h
  cryoace reconstruct particles.star -o run2 --preset paper --downsample 128 --device cuda --epochs 10
  torchrun --nproc-per-node 4 -m cryoace reconstruct particles.star -o run3 --preset paper --batch-size 256

Gold standard: --halves trains two independent models on two halves of the particles (RUN_DIR/half1,
half2) and reports the FSC-0.143 resolution of their aligned maps as training goes; RUN_DIR then holds
volume_half1.mrc, volume_half2.mrc, their average volume.mrc, fsc.png and poses.star in half 1's frame.

Several GPUs: launch with torchrun (one process per GPU; --batch-size is the global batch, split
evenly over the processes; rank 0 writes every file). See README.md for several nodes (SLURM).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CryoaceInputError

def add_args(parser: argparse.ArgumentParser) -> None:
    from ..options import add_options
    from ..train.config import OPTION_GROUPS, PRESETS, TrainConfig

    parser.add_argument("particles", type=Path, help="particles: RELION .star, cryoSPARC .cs or an .mrcs stack")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--preset", help=f"{', '.join(PRESETS)} (default: cpu on the CPU, paper on a GPU)")
    # every other setting's option (flag, help, choices, default) is declared on its TrainConfig field
    groups = add_options(parser, TrainConfig, OPTION_GROUPS,
                         presets={name: make() for name, make in PRESETS.items()})
    g = groups["run"]
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def build_config(args: argparse.Namespace):
    """The run's TrainConfig: preset + options (new run), or the run's own + the options a resumed run
    may change (budget, device, logging, refinement; :func:`cryoace.options.apply_options`)."""
    from ..options import ResumeConflict, apply_options
    from ..runtime import resolve_device
    from ..train.config import load_config, preset_config

    if args.resume:
        config, _ = load_config(args.output / "config.yaml")
        if args.preset is not None and args.preset != config.preset:
            raise CryoaceInputError(f"--preset {args.preset} differs from the run's {config.preset}; a resumed "
                                    "run keeps its settings (only the budget, device and logging options "
                                    "may change)", args.output)
    else:
        name = args.preset
        if name is None:
            device = resolve_device(args.device or "auto")
            name = "paper" if device.type == "cuda" else "cpu"
        config = preset_config(name)
    try:
        apply_options(args, config, resume=args.resume)
    except ResumeConflict as exc:
        raise CryoaceInputError(f"{exc}; a resumed run keeps its settings (only the budget, device and "
                                "logging options may change)", args.output) from None
    config.validate()
    return config


def _arguments(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


def main(args: argparse.Namespace) -> int:
    from ..train.run import check_run_dir, run_reconstruction

    check_run_dir(args.output, args.resume)
    config = build_config(args)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"cryoace reconstruct: {message}", file=sys.stderr)

    result = run_reconstruction(args.particles, args.output, config, resume=args.resume,
                                arguments=_arguments(args), progress=not args.quiet, log=log)
    loss = f", final loss {result.final_loss:.4g}" if result.final_loss is not None else ""
    print(f"trained {result.steps} steps ({result.epochs:.2f} epochs) in {result.train_time_s:.0f} s{loss}")
    print(f"wrote {result.volume} ({result.image_size}³ voxels, {result.voxel_size:.4g} Å/voxel), "
          f"{result.poses} and {result.run_dir}/volume.png, loss.png, config.yaml, checkpoints/")
    if result.resolution_angst is not None:  # --halves
        print(f"half-map FSC 0.143 resolution {result.resolution_angst:.2f} Å; wrote {result.run_dir}/"
              "volume_half1.mrc, volume_half2.mrc, fsc.png, resolution.png, metrics.json and half1/, half2/")
    return 0
