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

#: options a resumed run must not change: dest -> (config path, label)
_FIXED = {
    "preset": ("preset", "--preset"), "batch_size": ("batch_size", "--batch-size"),
    "lr": ("optim.lr", "--lr"), "decoder": ("decoder.name", "--decoder"), "loss": ("loss", "--loss"),
    "downsample": ("data.downsample", "--downsample"), "seed": ("seed", "--seed"),
    "invert_contrast": ("data.invert_contrast", "--invert-contrast"),
    "amsgrad": ("optim.amsgrad", "--amsgrad"), "grad_clip": ("optim.grad_clip", "--grad-clip"),
    "band_start": ("band_start_cyc_px", "--band-start"), "band_ramp": ("band_ramp_steps", "--band-ramp"),
    "encoder": ("encoder.name", "--encoder"), "decoder_lr": ("optim.decoder_lr", "--decoder-lr"),
    "optimizer": ("optim.name", "--optimizer"), "lr_warmup": ("optim.warmup_steps", "--lr-warmup"),
    "lr_milestones": ("optim.milestones", "--lr-milestones"), "lr_gamma": ("optim.gamma", "--lr-gamma"),
    "pip": ("pip.enabled", "--pip"), "pip_weight": ("pip.weight", "--pip-weight"),
    "pip_warmup": ("pip.warmup_steps", "--pip-warmup"), "pip_mode": ("pip.mode", "--pip-mode"),
    "pip_freeze_decoder": ("pip.freeze_decoder", "--pip-freeze-decoder"),
    "pip_snr": ("pip.snr_db", "--pip-snr"), "pip_shift_sigma": ("pip.shift_sigma_angst", "--pip-shift-sigma"),
    "warmup_labels": ("warmup_label_steps", "--warmup-labels"),
    "warmup_filter": ("warmup_label_filter", "--warmup-filter"), "shift_l1": ("shift_l1", "--shift-l1"),
    "gsym_views": ("gsym_views", "--gsym-views"), "force_gsym": ("force_gsym", "--force-gsym"),
    "halves": ("halves", "--halves"),
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
    g.add_argument("--encoder", choices=("vgg", "resnet18"),
                   help="pose encoder CNN: vgg (cryoAI, default) or resnet18 (ACE-EM)")
    g.add_argument("--decoder", choices=("fouriernet", "siren", "relu-pe", "voxel-real", "voxel-fourier"),
                   help="volume: fouriernet (default), siren, relu-pe, or an ACE-EM voxel grid in real or "
                   "Fourier space")
    g.add_argument("--decoder-lr", type=float, metavar="LR",
                   help="the decoder's own learning rate (default: --lr; voxel grids 1.0)")
    g.add_argument("--optimizer", choices=("adam", "adamw"), help="adam (cryoAI, default) or adamw (ACE-EM)")
    g.add_argument("--lr-warmup", type=int, metavar="STEPS", help="linear learning-rate warm-up (default 0)")
    g.add_argument("--lr-milestones", type=lambda t: tuple(int(x) for x in t.split(",") if x), metavar="S1,S2",
                   help="steps where the learning rate is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, help="learning-rate factor at each milestone (default 0.1)")
    g.add_argument("--loss", choices=("symmetric", "l2", "gsym"),
                   help="symmetric (cryoAI, default), l2, or gsym (ACE-EM's generalized symmetric loss: "
                   "also random in-plane turns and mirrors; meant for voxel decoders)")
    g.add_argument("--gsym-views", type=int, metavar="N", help="random views of --loss gsym (default 2)")
    g.add_argument("--force-gsym", action="store_true", default=None,
                   help="allow --loss gsym with a neural-field decoder (refused otherwise: ACE-EM reports it fails)")
    g.add_argument("--shift-l1", type=float, metavar="W", help="L1 penalty weight on predicted shifts in px (default 0)")
    g.add_argument("--warmup-labels", type=int, metavar="K",
                   help="ACE-EM warm-up labeling: fit low-pass filtered images for the first K steps")
    g.add_argument("--warmup-filter", type=int, metavar="I",
                   help="which of the encoder's Gaussian filters low-passes the warm-up labels (1-based, default 3)")
    g.add_argument("--seed", type=int, help="run seed (default 0)")
    g.add_argument("--band-start", type=float, metavar="CYC_PX",
                   help="coarse to fine: fit frequencies up to this radius (cycles/px, <= 0.5) first (presets: 0.1; "
                   "0.5 = the full band from the start) ...")
    g.add_argument("--band-ramp", type=int, metavar="STEPS",
                   help="... and widen the band linearly to Nyquist over this many steps")
    g = parser.add_argument_group("ACE-EM pose-image-pose (PIP) task")
    g.add_argument("--pip", action=argparse.BooleanOptionalAction, default=None,
                   help="add the PIP task: random poses -> decoder -> noisy images -> encoder -> pose loss (cpu and paper "
                   "presets: on)")
    g.add_argument("--pip-weight", type=float, metavar="LAMBDA",
                   help="weight of the PIP loss (presets: from the data's SNR, ACE-EM's 0.9 noise-free ... 0.07 at -10 dB)")
    g.add_argument("--pip-warmup", type=int, metavar="T", help="image-loss-only steps before PIP starts (cpu 100, paper 2000; PIP also waits until the "
                   "decoder renders 0.3 of the data's in-band amplitude)")
    g.add_argument("--pip-mode", choices=("joint", "alternate"),
                   help="PIP added to every step (joint, default) or on alternate steps")
    g.add_argument("--pip-freeze-decoder", action=argparse.BooleanOptionalAction, default=None,
                   help="PIP does not update the decoder (default: frozen, as in the paper)")
    g.add_argument("--pip-snr", type=float, metavar="DB",
                   help="noise of the PIP images from this SNR in dB (default: from the images' background)")
    g.add_argument("--pip-shift-sigma", type=float, metavar="ANGST",
                   help="σ of random PIP shifts in Å (default: the encoder's shifts on the batch)")
    g = parser.add_argument_group("refinement after training (projection matching; may change on --resume)")
    g.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                   help="after training, search every particle's pose against the decoder's map (global "
                   "over SO(3), then local), rebuild the map from those poses, and repeat with a growing "
                   "band; its map and poses become volume.mrc and poses.star (cpu preset: on)")
    g.add_argument("--refine-rounds", type=int, metavar="N", help="refinement rounds (default 10)")
    g.add_argument("--refine-max-time", metavar="T", help="stop refining after the round that passes T")
    g.add_argument("--refine-step", type=float, metavar="DEG", help="SO(3) grid spacing of the global search "
                   "(default 8°)")
    g.add_argument("--ab-initio", action=argparse.BooleanOptionalAction, default=None,
                   help="before refining, build a low-resolution map from a featureless blob by stochastic "
                   "EM over poses (robust at low SNR); refinement starts from it or the decoder's map, "
                   "whichever explains the images better (default: on)")
    g.add_argument("--ab-initio-iterations", type=int, metavar="N",
                   help="stochastic EM iterations of --ab-initio (default 30)")
    g = parser.add_argument_group("gold standard (half sets)")
    g.add_argument("--halves", action="store_true", default=None,
                   help="train two independent models on two halves of the particles (rlnRandomSubset when "
                   "the file has it, else a seeded random split; RUN_DIR/half1, half2), compare their "
                   "aligned maps by FSC every --eval-every steps (0.143 resolution in the log, "
                   "metrics.jsonl/.json, fsc.png, resolution.png); --max-time is shared by the halves")
    g.add_argument("--halves-patience", type=int, metavar="N",
                   help="with --halves: stop when the half-map resolution has not improved by more than 1%% "
                   "in N evaluations (may change on --resume)")
    g = parser.add_argument_group("data")
    g.add_argument("--downsample", type=int, metavar="L", help="Fourier-crop images to an L×L box")
    g.add_argument("--datadir", type=Path, help="directory holding the image stacks, if not where the file says")
    g.add_argument("--invert-contrast", action="store_true", default=None, help="for stacks with dark particles")
    g.add_argument("--check-contrast", action=argparse.BooleanOptionalAction, default=None,
                   help="before training, test on up to 1000 particles that they are white on a dark "
                   "background and stop if they look inverted (default: on)")
    g.add_argument("--auto-invert", action="store_true", default=None,
                   help="invert the images when the contrast check finds dark particles, instead of stopping")
    g.add_argument("--no-ctf", action="store_true", help="ignore the file's CTF columns")
    g.add_argument("--num-workers", type=int, metavar="N", help="data-loading processes (default 0)")
    g.add_argument("--preload", choices=("auto", "gpu", "ram", "none"),
                   help="hold the prepared images in GPU memory or RAM (auto: GPU if they fit in half the free "
                   "GPU memory, else RAM if they fit in half the available RAM, else read them from disk)")
    g = parser.add_argument_group("run")
    g.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the networks for training (default off; needs a C++ compiler on "
                   "the CPU, falls back to eager mode if compiling fails)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="the encoder's arithmetic: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on the CPU; "
                   "the Fourier/CTF math and the decoder are always fp32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for the encoder's convolutions (default: on CUDA only)")
    g.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--log-every", type=int, metavar="N", help="steps between loss logs")
    g.add_argument("--checkpoint-every", type=int, metavar="N", help="steps between checkpoints")
    g.add_argument("--volume-every", type=int, metavar="N", help="steps between volume_STEP.mrc (0 = none)")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help="steps between pose coverage / error records (default: --volume-every)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    g.add_argument("--quiet", action="store_true", help="no progress bar or messages")


def _get(config, dotted: str):
    obj = config
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(config, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    setattr(_get(config, ".".join(parents)) if parents else config, last, value)


def _budget(args, config) -> None:
    from ..train.config import parse_duration

    if args.max_time is None and args.epochs is None and args.steps is None:
        return
    config.max_time_s = parse_duration(args.max_time) if args.max_time is not None else None
    config.epochs = args.epochs
    config.steps = args.steps


def _refinement(args, config) -> None:
    from ..train.config import parse_duration

    if args.refine is not None:
        config.refine.enabled = args.refine
    if args.refine_rounds is not None:
        config.refine.rounds = args.refine_rounds
    if args.refine_max_time is not None:
        config.refine.max_time_s = parse_duration(args.refine_max_time)
    if args.refine_step is not None:
        config.refine.global_step_deg = args.refine_step
    if args.ab_initio is not None:
        config.refine.ab_initio = args.ab_initio
    if args.ab_initio_iterations is not None:
        config.refine.ab_initio_iterations = args.ab_initio_iterations


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
        for dest, (path, _label) in _FIXED.items():
            value = getattr(args, dest)
            if value is not None and dest != "preset":
                _set(config, path, value)
        if args.check_contrast is not None:
            config.data.check_contrast = args.check_contrast
        if args.auto_invert:
            config.data.auto_invert = True
        if args.no_ctf:
            config.data.use_ctf = False
    _budget(args, config)
    _refinement(args, config)
    if args.device is not None:
        config.device = args.device
    if args.compile is not None:
        config.compile = args.compile
    if args.num_workers is not None:
        config.data.num_workers = args.num_workers
    for dest, target, name in (("preload", config.data, "preload"), ("precision", config, "precision"),
                               ("channels_last", config, "channels_last")):
        if getattr(args, dest) is not None:
            setattr(target, name, getattr(args, dest))
    if args.datadir is not None:
        config.data.datadir = str(args.datadir)
    for dest in ("log_every", "checkpoint_every", "volume_every", "eval_every", "halves_patience"):
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
    if result.resolution_angst is not None:  # --halves
        print(f"half-map FSC 0.143 resolution {result.resolution_angst:.2f} Å; wrote {result.run_dir}/"
              "volume_half1.mrc, volume_half2.mrc, fsc.png, resolution.png, metrics.json and half1/, half2/")
    return 0
