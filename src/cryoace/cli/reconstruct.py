"""Ab initio reconstruction with unknown poses (cryoAI: amortized pose encoder + FourierNet decoder).

Reads particles (RELION .star, cryoSPARC .cs, or an .mrcs stack with cryoDRGN's --ctf/--poses pickles;
--ind/--first select particles, --pixel-size gives a missing pixel size), trains a pose encoder (image →
rotation and shift) jointly with a neural Fourier volume through the shared image-formation model
(CTF, shift, central slice), with cryoAI's symmetric loss by default, and writes into RUN_DIR:
config.yaml (every setting, seeds, version, command line), checkpoints/ (step_XXXXXX.pt, last.pt),
metrics.jsonl and tensorboard/ (loss curves), volume_STEP.mrc maps during training, and at the end
volume.mrc (voxel size = the images' pixel size after --downsample), volume.png (central slices and
projections), loss.png and poses.star (every particle's predicted pose, all input columns kept).

Presets: tiny (seconds, for tests), cpu (small networks for a 2-core CPU, then the ab initio and up
to 10 rounds of --refine, the whole job within --max-time 20m) and paper
(cryoAI's: VGG16-like encoder, FourierNet 256, batch 64, AMSGrad lr 1e-4, clip 1.0; 20 epochs).
Both train coarse to fine with ACE-EM's PIP task. What the networks alone reach on a 2-core CPU
(--no-refine, bench/amortized.py): on the demo Fourier-cropped to 32 px (--downsample 32, what a CPU
user should do), the cpu preset predicts every particle's pose at a 5.9-11.7° median error after 10
minutes noise-free (four seeds, coverage ≥ 0.88) and at 14.9° after 90 minutes at SNR -10 dB (coverage
0.86; the decoder's map at 9.9 Å, a backprojection from its poses at 7.5 Å); full-size boxes, the
paper preset and millions of particles need a GPU. On the CPU, --refine turns the
networks' start into a high-resolution map.

ACE-EM: --pip adds the pose-image-pose task (random poses rendered by the decoder, made noisy and
encoded; a pose loss), --warmup-labels K fits low-passed images first, --decoder voxel-real /
voxel-fourier use voxel grids (own learning rate 1.0; --optimizer adamw), --loss gsym the generalized
symmetric loss, --shift-l1 penalises large shifts, --encoder resnet18. Every --eval-every steps the
coverage of the recent training poses (and, when the particle file has angles, their errors after
global alignment) goes to metrics.jsonl, TensorBoard and viewing_directions.png.
The default is cpu on the CPU and paper on a GPU. Options override the preset. The networks' training
stops at the first of --steps, --epochs and their share of --max-time (given ones replace the
preset's; totals over resumes). --max-time is the whole job's: with --refine the networks get a
quarter, the ab initio at most 35 %, the refinement rounds the rest, less the final pass over the
particles not in the rounds (--refine-subset), which cannot be cut; the last round that fits searches
at the full band. Each stage's time goes to the log, metrics.jsonl ("stage" records) and report.html.
--resume continues an interrupted run exactly (same settings; a larger budget trains further). A
NaN/Inf loss rolls back to the last checkpoint with half the learning rate. Before training, a quick
pose-free test on up to 1000 particles stops the run if they look dark on a light background (fix it
with --invert-contrast, or let --auto-invert do it; --no-check-contrast skips the test).

Example:
  cryoace reconstruct particles.star -o run1 --max-time 30m
  cryoace reconstruct particles.star -o run1 --resume --max-time 1h
  cryoace reconstruct particles.star -o run2 --preset paper --downsample 128 --device cuda --epochs 10
  torchrun --nproc-per-node 4 -m cryoace reconstruct particles.star -o run3 --preset paper --batch-size 256
  cryoace reconstruct particles.mrcs --ctf ctf.pkl -o run1 --max-time 30m --export-poses cs,pkl

Gold standard: --halves trains two independent models on two halves of the particles (RUN_DIR/half1,
half2) and reports the FSC-0.143 resolution of their aligned maps as training goes; RUN_DIR then holds
volume_half1.mrc, volume_half2.mrc, their average volume.mrc, fsc.png and poses.star in half 1's frame.

Resolution you can trust: the refinement (--refine, on in the cpu preset) keeps two half sets apart
(rlnRandomSubset when the file has it), each aligned against its own half map from a common start
low-passed to --refine-start-resolution (12 px). RUN_DIR gets volume_half1.mrc, volume_half2.mrc,
volume_mask.mrc, gold_standard.json and fsc.png (unmasked, masked and phase-randomization corrected
curves); poses.star gets rlnRandomSubset and cryoacePoseConfidence (each particle's pose
confidence). When the half maps agree no further than the start's low-pass (what pure noise gives),
no resolution is claimed: the last lines and report.html say NOT RESOLVED and why.

Exit status: 0 done; 2 bad input; 3 the run failed on good input (training diverged); 4 the run
finished but resolved nothing (NOT RESOLVED above); 130 interrupted (continue with --resume).

Several GPUs: launch with torchrun (one process per GPU; --batch-size is the global batch, split
evenly over the processes; rank 0 writes every file). See README.md for several nodes (SLURM).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import CryoaceInputError
from .particle_input import add_particle_input_args, open_particle_table

#: --export-poses format -> file name in RUN_DIR
_POSE_EXPORTS = {"cs": "poses.cs", "pkl": "pose.pkl"}


def _pose_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in _POSE_EXPORTS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"expected cs, pkl or cs,pkl, got {text!r}")
    return formats


def _export_poses(poses_star: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write the poses of ``poses_star`` in each of ``formats`` next to it; the written paths."""
    from ..io.star import read_star
    from ..train.predict import write_poses

    if not formats:
        return []
    table = read_star(poses_star)
    written = []
    for fmt in formats:
        out = poses_star.parent / _POSE_EXPORTS[fmt]
        write_poses(out, table, table.pose)
        written.append(out)
    return written


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
    g.add_argument("--export-poses", type=_pose_formats, metavar="cs,pkl", default=(),
                   help="also write the final poses as RUN_DIR/poses.cs (cryoSPARC) and/or RUN_DIR/pose.pkl "
                   "(cryoDRGN), besides poses.star")
    add_particle_input_args(parser)


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


#: particle-input options a resumed run takes from its first run when not given again
_INPUT_OPTIONS = ("pixel_size", "ctf", "poses", "ind", "first")


def _resumed_inputs(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the particle-input options of the run's first start where they are not given
    again (a resumed run must see the same particles, with the same CTF and pixel size); a different
    value is refused."""
    from ..train.config import load_config

    _, raw = load_config(args.output / "config.yaml")
    recorded = (raw.get("provenance") or {}).get("arguments") or {}
    values = {}
    for dest in _INPUT_OPTIONS:
        given, before = getattr(args, dest), recorded.get(dest)
        if given is not None and dest in recorded and str(given) != str(before):
            flag = "--" + dest.replace("_", "-")
            raise CryoaceInputError(f"{flag} {given} differs from the run's {before}; a resumed run reads "
                                    "the same particles", args.output)
        if given is None and before is not None:
            values[dest] = before if dest in ("pixel_size", "first") else Path(before)
    return argparse.Namespace(**{**vars(args), **values})


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str | None:
    """After Ctrl-C: the exact command that continues this run."""
    from .main import resume_command

    return resume_command(args.output, argv)


def main(args: argparse.Namespace) -> int:
    from ..pipeline.run import check_run_dir, run_reconstruction

    check_run_dir(args.output, args.resume)
    config = build_config(args)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"cryoace reconstruct: {message}", file=sys.stderr)

    inputs = _resumed_inputs(args) if args.resume else args
    inputs.datadir = config.data.datadir  # a resumed run's own unless --datadir moves it
    first_rank = os.environ.get("RANK", "0") == "0"  # under torchrun every rank reads; one says it
    table = open_particle_table(inputs, args.particles, poses=inputs.poses,
                                note=lambda m: log(f"note: {m}") if first_rank else None)
    result = run_reconstruction(args.particles, args.output, config, resume=args.resume,
                                arguments=_arguments(args), progress=not args.quiet, log=log, table=table)
    loss = f", final loss {result.final_loss:.4g}" if result.final_loss is not None else ""
    print(f"trained {result.steps} steps ({result.epochs:.2f} epochs) in {result.train_time_s:.0f} s{loss}")
    print(f"wrote {result.volume} ({result.image_size}³ voxels, {result.voxel_size:.4g} Å/voxel), "
          f"{result.poses} and {result.run_dir}/volume.png, loss.png, config.yaml, checkpoints/")
    exported = _export_poses(result.poses, args.export_poses)
    if exported:
        print("wrote " + ", ".join(str(p) for p in exported))
    return report_gold_standard(result)


def report_gold_standard(result) -> int:
    """Print the run's resolution verdict (its last lines) and return the exit status: 0, or
    :data:`~cryoace.evaluate.gold_standard.UNRESOLVED_EXIT_CODE` when the half maps (of the refinement,
    or of ``--halves``) resolved nothing."""
    from ..evaluate.gold_standard import UNRESOLVED_EXIT_CODE

    gold = result.gold_standard
    if gold is not None:
        print(f"half maps {result.run_dir}/volume_half1.mrc, volume_half2.mrc and their mask volume_mask.mrc "
              "(cryoace fsc volume_half1.mrc volume_half2.mrc gives the resolution claimed, with --mask "
              "volume_mask.mrc the masked one); "
              "fsc.png, gold_standard.json")
        for line in gold.summary():
            print(line)
        return 0 if gold.resolved else UNRESOLVED_EXIT_CODE
    print("no resolution is reported: no independent half maps (the networks alone saw every particle)")
    return 0
