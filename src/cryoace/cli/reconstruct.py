"""Ab initio reconstruction with unknown poses (cryoAI: amortized pose encoder + FourierNet decoder).

Reads particles (RELION .star, cryoSPARC .cs, or an .mrcs stack), trains a pose encoder (image →
rotation and shift) jointly with a neural Fourier volume through the shared image-formation model
(CTF, shift, central slice), with cryoAI's symmetric loss by default, and writes into RUN_DIR:
config.yaml (every setting, seeds, version, command line), checkpoints/ (step_XXXXXX.pt, last.pt),
metrics.jsonl and tensorboard/ (loss curves), volume_STEP.mrc maps during training, and at the end
volume.mrc (voxel size = the images' pixel size after --downsample), volume.png (central slices and
projections), loss.png and poses.star (every particle's predicted pose, all input columns kept).

Presets: tiny (seconds, for tests), cpu (small networks for a 2-core CPU, torch.compile, 20
minutes) and paper (cryoAI's: VGG16-like encoder, FourierNet 256, batch 64, AMSGrad lr 1e-4, clip
1.0; 20 epochs).
The default is cpu on the CPU and paper on a GPU. Options override the preset. The budget stops at
the first of --steps, --epochs, --max-time (given ones replace the preset's; totals over resumes).
--resume continues an interrupted run exactly (same settings; a larger budget trains further). A
NaN/Inf loss rolls back to the last checkpoint with half the learning rate.

Example:
  cryoace reconstruct particles.star -o run1 --max-time 30m
  cryoace reconstruct particles.star -o run1 --resume --max-time 1h
  cryoace reconstruct particles.star -o run2 --preset paper --downsample 128 --device cuda --epochs 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CryoaceInputError

#: options a resumed run must not change: dest -> (config path, label)
_FIXED = {
    "preset": ("preset", "--preset"), "batch_size": ("batch_size", "--batch-size"),
    "lr": ("optim.lr", "--lr"), "decoder": ("decoder.name", "--decoder"), "loss": ("loss", "--loss"),
    "downsample": ("data.downsample", "--downsample"), "seed": ("seed", "--seed"),
    "invert_contrast": ("data.invert_contrast", "--invert-contrast"),
    "amsgrad": ("optim.amsgrad", "--amsgrad"), "grad_clip": ("optim.grad_clip", "--grad-clip"),
    "band_start": ("band_start_cyc_px", "--band-start"), "band_ramp": ("band_ramp_steps", "--band-ramp"),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", type=Path, help="particles: RELION .star, cryoSPARC .cs or an .mrcs stack")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--preset", help="tiny, cpu or paper (default: cpu on the CPU, paper on a GPU)")
    g = parser.add_argument_group("budget (the first reached stops training)")
    g.add_argument("--max-time", metavar="T", help="training time, e.g. 30m, 1.5h, 90s (bare number: minutes)")
    g.add_argument("--epochs", type=float, metavar="E", help="passes over the particles")
    g.add_argument("--steps", type=int, metavar="N", help="optimizer steps")
    g = parser.add_argument_group("model and optimization")
    g.add_argument("--batch-size", type=int, metavar="B", help="images per step")
    g.add_argument("--lr", type=float, help="Adam learning rate")
    g.add_argument("--amsgrad", action=argparse.BooleanOptionalAction, default=None,
                   help="AMSGrad variant of Adam (presets: on)")
    g.add_argument("--grad-clip", type=float, metavar="NORM", help="clip the gradient norm (0 = off; presets: 1.0)")
    g.add_argument("--decoder", choices=("fouriernet", "siren", "relu-pe"), help="neural volume (default fouriernet)")
    g.add_argument("--loss", choices=("symmetric", "l2"), help="symmetric (cryoAI, default) or l2")
    g.add_argument("--seed", type=int, help="run seed (default 0)")
    g.add_argument("--band-start", type=float, metavar="CYC_PX",
                   help="coarse to fine: fit frequencies up to this radius (cycles/px, <= 0.5) first ...")
    g.add_argument("--band-ramp", type=int, metavar="STEPS",
                   help="... and widen the band linearly to Nyquist over this many steps")
    g = parser.add_argument_group("data")
    g.add_argument("--downsample", type=int, metavar="L", help="Fourier-crop images to an L×L box")
    g.add_argument("--datadir", type=Path, help="directory holding the image stacks, if not where the file says")
    g.add_argument("--invert-contrast", action="store_true", default=None, help="for stacks with dark particles")
    g.add_argument("--no-ctf", action="store_true", help="ignore the file's CTF columns")
    g.add_argument("--num-workers", type=int, metavar="N", help="data-loading processes (default 0)")
    g = parser.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the networks for training (cpu preset: on; needs a C++ compiler on "
                   "the CPU, falls back to eager mode if compiling fails)")
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--log-every", type=int, metavar="N", help="steps between loss logs")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints")
    g.add_argument("--volume-every", type=int, metavar="N", help="steps between volume_STEP.mrc (0 = none)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def _get(config, dotted: str):
    obj = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _budget(args, config) -> None:
    from ..train.config import parse_duration

    if args.max_time is None and args.epochs is None and args.steps is None:
        return
    config.max_time_s = parse_duration(args.max_time) if args.max_time is not None else None
    config.epochs = args.epochs
    config.steps = args.steps


def build_config(args: argparse.Namespace):
    """The run's TrainConfig: preset + options (new run), or the run's own + budget (--resume)."""
    from ..runtime import resolve_device
    from ..train.config import load_config, preset_config

    if args.resume:
        config, _ = load_config(args.output / "config.yaml")
        for dest, (path, label) in _FIXED.items():
            value = getattr(args, dest)
            if value is not None and value != _get(config, path):
                raise CryoaceInputError(f"{label} {value} differs from the run's {_get(config, path)}; a "
                                        "resumed run keeps its settings (only the budget, device and "
                                        "logging options may change)", args.output)
        if args.no_ctf and config.data.use_ctf:
            raise CryoaceInputError("--no-ctf differs from the run's setting", args.output)
    else:
        name = args.preset
        if name is None:
            device = resolve_device(args.device or "auto")
            name = "paper" if device.type == "cuda" else "cpu"
        config = preset_config(name)
        if args.batch_size is not None:
            config.batch_size = args.batch_size
        if args.lr is not None:
            config.optim.lr = args.lr
        if args.amsgrad is not None:
            config.optim.amsgrad = args.amsgrad
        if args.grad_clip is not None:
            config.optim.grad_clip = args.grad_clip
        if args.decoder is not None:
            config.decoder.name = args.decoder
        if args.loss is not None:
            config.loss = args.loss
        if args.seed is not None:
            config.seed = args.seed
        if args.band_start is not None:
            config.band_start_cyc_px = args.band_start
        if args.band_ramp is not None:
            config.band_ramp_steps = args.band_ramp
        if args.downsample is not None:
            config.data.downsample = args.downsample
        if args.invert_contrast:
            config.data.invert_contrast = True
        if args.no_ctf:
            config.data.use_ctf = False
    _budget(args, config)
    if args.device is not None:
        config.device = args.device
    if args.compile is not None:
        config.compile = args.compile
    if args.num_workers is not None:
        config.data.num_workers = args.num_workers
    if args.datadir is not None:
        config.data.datadir = str(args.datadir)
    for dest in ("log_every", "checkpoint_every", "volume_every"):
        if getattr(args, dest) is not None:
            setattr(config, dest, getattr(args, dest))
    if args.no_tensorboard:
        config.tensorboard = False
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
    return 0
