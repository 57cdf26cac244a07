"""Simulate the built-in adenylate-kinase dataset and reconstruct it ab initio, then score it.

The whole method on a fresh machine, with no downloads: 2000 particles of adenylate kinase (PDB
4AKE chain A, shipped with cryoace) at L = 64, 1.5 Å/px, random poses, 3 Å shifts, CTF and noise
at -10 dB ('cryoace simulate --preset demo'; --noise-free for clean images) go to DIR/dataset;
with the 'cpu' preset reconstructs them with unknown poses into DIR/run within --max-time (the whole
job, 20 minutes by default: amortized training of encoder + decoder, an ab initio map by stochastic
EM, then projection-matching refinement rounds; 'cryoace reconstruct --refine'); finally the predicted
poses are aligned to the true ones (global rotation and hand, least squares over all particles) and
the map, carried into the truth's frame by the same transform, is scored by its FSC against the
true map ('cryoace evaluate'). The last lines name the maps to open in ChimeraX.

An existing DIR/dataset is reused (not simulated again); an existing DIR/run needs --resume.

Example:
  cryoace demo -o cryoace_demo
  cryoace demo -o cryoace_demo_clean --noise-free --max-time 15m
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CryoaceInputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path("cryoace_demo"), metavar="DIR",
                        help="output directory (default: ./cryoace_demo)")
    parser.add_argument("--max-time", default="20m", metavar="T",
                        help="the reconstruction's whole wall time (networks, ab initio, refinement), e.g. 20m, "
                        "1h, 90s (default: 20m)")
    parser.add_argument("--preset", default="cpu", help="training preset (default: cpu)")
    parser.add_argument("--noise-free", action="store_true", help="simulate images without noise")
    parser.add_argument("-n", "--num-particles", dest="n", type=int, metavar="N",
                        help="number of particles (default: 2000)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation and the run (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue DIR/run (e.g. with a larger --max-time)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def simulate_demo(out_dir: Path, noise_free: bool = False, n: int | None = None, seed: int = 0,
                  device="cpu", progress: bool = True):
    """The 'demo' simulation preset through the Python API (map from the shipped model, then particles)."""
    from ..simulate.molmap import molmap, read_model
    from ..simulate.particles import SimulationConfig, simulate_dataset
    from ..simulate.presets import get_preset

    preset = get_preset("demo")
    result = molmap(read_model(preset.model), preset.box, preset.pixel_size, preset.resolution)
    settings = dict(preset.settings)
    if noise_free:
        settings["snr_db"] = None
    cfg = SimulationConfig(n=int(n or preset.n), seed=seed, **settings)
    provenance = {"preset": "demo", "command": "cryoace demo", "input": {"path": str(preset.model)}}
    return simulate_dataset(result.data, preset.pixel_size, out_dir, cfg, volume_origin=result.origin,
                            provenance=provenance, progress=progress, device=device)


def resume_hint(args: argparse.Namespace, argv: list[str]) -> str | None:
    """After Ctrl-C: the exact command that continues the demo's run."""
    from .main import resume_command

    return resume_command(args.output / "run", argv)


def main(args: argparse.Namespace) -> int:
    from ..pipeline.run import check_run_dir, run_reconstruction
    from ..runtime import resolve_device
    from ..train.config import parse_duration, preset_config
    from .main import main as cli

    if args.n is not None and args.n <= 0:
        raise CryoaceInputError(f"-n must be a positive number of particles, got {args.n}")
    out: Path = args.output
    if out.exists() and not out.is_dir():
        raise CryoaceInputError("the output exists and is not a directory; give a folder for the demo", out)
    data_dir, run_dir = out / "dataset", out / "run"
    check_run_dir(run_dir, args.resume)
    config = preset_config(args.preset)
    config.max_time_s, config.steps, config.epochs = parse_duration(args.max_time), None, None
    config.device = args.device
    config.seed = args.seed
    device = resolve_device(args.device)

    def say(message: str) -> None:
        print(f"cryoace demo: {message}", file=sys.stderr)

    star = data_dir / "particles.star"
    if star.is_file():
        say(f"using the dataset already in {data_dir}")
    else:
        noise = "noise-free" if args.noise_free else "SNR -10 dB"
        say(f"simulating adenylate kinase (4AKE), L=64 at 1.5 Å/px, {noise}, into {data_dir}")
        simulate_demo(data_dir, noise_free=args.noise_free, n=args.n, seed=args.seed, device=device,
                      progress=not args.quiet)
    if args.resume:
        from ..train.config import load_config

        own, _ = load_config(run_dir / "config.yaml")
        own.max_time_s, own.steps, own.epochs, own.device = config.max_time_s, None, None, config.device
        config = own
    say(f"reconstructing with unknown poses ({config.preset} preset, {args.max_time} on {device})")
    result = run_reconstruction(star, run_dir, config, resume=args.resume, progress=not args.quiet,
                                log=(lambda m: None) if args.quiet else (lambda m: say(m)),
                                arguments={k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(args).items() if not k.startswith("_")})
    print(f"trained {result.steps} steps ({result.epochs:.1f} epochs) in {result.train_time_s / 60:.1f} min; "
          f"map {result.volume}")
    say("scoring against the truth (poses aligned over all particles, both hands; map carried along)")
    status = cli(["evaluate", str(run_dir), "--truth", str(star), "--truth-map", str(data_dir / "volume.mrc")])
    if status:
        return status
    print(f"open in ChimeraX: {run_dir / 'volume_aligned.mrc'} (the reconstruction in the truth's frame) "
          f"over {data_dir / 'volume.mrc'} (the true map); raw map: {result.volume}")
    from .reconstruct import report_gold_standard

    return report_gold_standard(result)  # what the data alone say, to compare with the truth above
