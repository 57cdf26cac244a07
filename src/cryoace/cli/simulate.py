"""Simulate a particle dataset with known poses from a map or an atomic model.

The input is a map (.mrc/.map; its header voxel size, or --pixel-size) or an atomic model
(.pdb/.cif[.gz]), which is first turned into a map as by 'cryoace molmap' (--box, --pixel-size,
--resolution). Each particle gets a Haar-uniform rotation (or the poses of --poses-from), a shift
~ N(0, --shift-std Å) per axis, a RELION CTF (defocus log-normal about --defocus-median with
--defocus-spread = sigma of ln(defocus), astigmatism uniform in [0, --astigmatism] Å at a random
angle) and white Gaussian noise at --snr-db, where SNR = var(clean) / sigma² and var(clean) is the
mean per-image variance over the whole box of the noise-free, CTF-modulated, shifted images
(docs/conventions.md §1). Images are formed by the same Fourier path as the decoders (--projector fourier), or by
real-space rotate-and-sum (--projector real). --seed makes the dataset reproducible: one seed per
purpose (poses, shifts, defocus, noise) is spawned from it and recorded.

Written to DIR: particles.mrcs (particles_000.mrcs, ... above --stack-size images), particles.star
(RELION 3.1, true poses, CTF, rlnRandomSubset), volume.mrc (the ground truth) and simulation.yaml
(every parameter, the seeds and the noise sigma). Memory stays flat in N. The dataset is written into
a hidden folder beside DIR that becomes DIR only when complete: a killed run leaves no partial dataset
(and the next run removes its folder).

Presets (command-line options override them): adk (4AKE, shipped model, L=64 at 1.5 Å/px,
50000 particles, -10 dB), demo (the same with 2000 particles: 'cryoace simulate --preset demo -o
demo'), spike (6VYB, give the model file; L=128 at 3.0 Å/px, 50000 particles, -10 dB).

Example:
  cryoace simulate --preset demo -o demo_dataset
  cryoace simulate 6vyb.cif.gz --preset spike -o spike_clean --noise-free
  cryoace simulate map.mrc -o sim -n 10000 --snr-db -10 --shift-std 3 --defocus-median 15000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CryoaceInputError

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".rec")
#: command-line dest -> SimulationConfig field, for the values a preset may set
_CONFIG_OPTIONS = {
    "shift_std": "shift_std_angst", "defocus_median": "defocus_median", "defocus_spread": "defocus_spread",
    "astigmatism": "astigmatism", "voltage": "voltage_kv", "cs": "cs_mm",
    "amplitude_contrast": "amplitude_contrast", "bfactor": "bfactor",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, nargs="?", metavar="MAP_OR_MODEL",
                        help="map (.mrc) or atomic model (.pdb/.cif[.gz]); optional with --preset adk/demo")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument("-n", "--num-particles", dest="n", type=int, metavar="N",
                        help="number of particles (default: the preset's, or the number of --poses-from rows)")
    parser.add_argument("--preset", metavar="NAME", help="adk, demo or spike (see above)")
    g = parser.add_argument_group("map from an atomic model")
    g.add_argument("--box", type=int, metavar="L", help="box size in px (even; default: fit the molecule)")
    g.add_argument("--pixel-size", type=float, metavar="Å",
                   help="pixel size (Å/px); for a map, overrides its header")
    g.add_argument("--resolution", type=float, metavar="Å", help="molmap resolution (Å)")
    g = parser.add_argument_group("poses")
    g.add_argument("--poses-from", type=Path, metavar="STAR",
                   help="take rotations and shifts from this particle file (.star/.cs) instead of drawing them")
    g.add_argument("--shift-std", type=float, metavar="Å", help="std of the shift per axis (Å; default 0)")
    g = parser.add_argument_group("CTF")
    g.add_argument("--no-ctf", action="store_true", help="no CTF (plain projections)")
    g.add_argument("--defocus-median", type=float, metavar="Å", help="median defocus (Å; default 15000)")
    g.add_argument("--defocus-spread", type=float, metavar="S",
                   help="sigma of ln(defocus) (default 0.2, about ±20%%)")
    g.add_argument("--astigmatism", type=float, metavar="Å",
                   help="defocusU - defocusV drawn uniformly in [0, this] (Å; default 0)")
    g.add_argument("--voltage", type=float, metavar="kV", help="accelerating voltage (default 300)")
    g.add_argument("--cs", type=float, metavar="mm", help="spherical aberration (default 2.7)")
    g.add_argument("--amplitude-contrast", type=float, metavar="W", help="amplitude contrast (default 0.1)")
    g.add_argument("--bfactor", type=float, metavar="Å²", help="CTF B-factor envelope (default 0)")
    g = parser.add_argument_group("noise and images")
    g.add_argument("--snr-db", type=float, metavar="DB",
                   help="SNR in dB, e.g. -10 (SNR 0.1); needed unless --noise-free or a --preset")
    g.add_argument("--noise-free", action="store_true", help="no noise")
    g.add_argument("--invert-contrast", action="store_true", help="dark particles on a light background")
    g.add_argument("--projector", default="fourier", metavar="KIND",
                   help="fourier (physics.forward, as the decoders; default) or real (rotate and sum)")
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    g.add_argument("--stack-size", type=int, default=100_000, metavar="N",
                   help="most images per .mrcs file (default 100000)")
    g.add_argument("--batch-size", type=int, metavar="B", help="images rendered at once (default: auto)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    g.add_argument("--overwrite", action="store_true", help="replace a dataset already in DIR")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _is_map(path: Path) -> bool:
    return path.suffix.lower() in MAP_SUFFIXES


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise CryoaceInputError(f"{name} must be a positive number, got {value:g}")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io.mrc import read_volume
    from ..runtime import resolve_device
    from ..simulate.molmap import fit_box, molmap, read_model
    from ..simulate.particles import SimulationConfig, check_output_dir, simulate_dataset
    from ..simulate.presets import get_preset

    preset = get_preset(args.preset) if args.preset is not None else None
    if args.n is not None and args.n <= 0:
        raise CryoaceInputError(f"-n must be a positive number of particles, got {args.n}")
    _positive("--pixel-size", args.pixel_size)
    _positive("--resolution", args.resolution)
    if args.box is not None and (args.box <= 0 or args.box % 2):
        raise CryoaceInputError(f"--box must be a positive even number of pixels, got {args.box}")
    if args.noise_free and args.snr_db is not None:
        raise CryoaceInputError("give either --snr-db or --noise-free, not both")
    if args.projector not in ("fourier", "real"):
        raise CryoaceInputError(f"--projector must be 'fourier' or 'real', got {args.projector!r}")
    check_output_dir(args.output, args.overwrite)
    device = resolve_device(args.device)

    # -- the input: a map, or a model turned into a map ----------------------------------------
    source = args.input
    if source is None:
        if preset is None:
            raise CryoaceInputError("give a map or an atomic model (or --preset demo / adk)")
        if preset.model is None:
            raise CryoaceInputError(f"--preset {preset.name} needs the model file: {preset.model_hint}")
        source = preset.model
    provenance: dict = {"input": {"path": str(Path(source).resolve())}, "preset": args.preset}
    if _is_map(source):
        if args.box is not None or args.resolution is not None:
            raise CryoaceInputError("--box and --resolution make a map from an atomic model; the input "
                                    "is already a map", source)
        mrc = read_volume(source)
        pixel_size = args.pixel_size if args.pixel_size is not None else mrc.voxel_size
        if not pixel_size > 0:
            raise CryoaceInputError("the map header has no voxel size; give --pixel-size", source)
        volume, origin = mrc.data, mrc.origin
        provenance["input"].update(kind="map", header_voxel_size=float(mrc.voxel_size))
    else:
        pixel_size = args.pixel_size if args.pixel_size is not None else (preset and preset.pixel_size)
        resolution = args.resolution if args.resolution is not None else (preset and preset.resolution)
        if not pixel_size:
            raise CryoaceInputError("an atomic model needs --pixel-size (or a --preset)", source)
        if not resolution:
            raise CryoaceInputError("an atomic model needs --resolution for its map (or a --preset)", source)
        model = read_model(source)
        box = args.box if args.box is not None else (preset.box if preset else fit_box(model, pixel_size, resolution))
        result = molmap(model, box, pixel_size, resolution)
        volume, origin = result.data, result.origin
        provenance["input"].update(kind="atomic model", atoms=len(model),
                                   elements_guessed=bool(model.guessed_elements))
        provenance["molmap"] = {"box": int(box), "pixel_size_angst": float(pixel_size),
                                "resolution_angst": float(resolution), "sigma_angst": 0.225 * float(resolution),
                                "weights": "atomic number Z", "centroid_angst": list(result.centroid),
                                "origin_angst": list(result.origin)}

    # -- poses ---------------------------------------------------------------------------------
    poses = None
    n = args.n
    if args.poses_from is not None:
        from ..io.particles import read_particles

        try:
            table = read_particles(args.poses_from)
        except CryoaceInputError as first_error:
            # a poses-only file may have no pixel size: then origins in px are read at the map's
            try:
                table = read_particles(args.poses_from, pixel_size=float(pixel_size))
            except CryoaceInputError:
                raise first_error from None
        if not table.has_pose:
            raise CryoaceInputError("the file has no poses (rlnAngleRot/Tilt/Psi)", args.poses_from)
        poses = table.pose
        n = len(table) if n is None else n
        if n > len(table):
            raise CryoaceInputError(f"-n {n} is more than the {len(table)} poses in the file", args.poses_from)
        provenance["poses_from"] = str(args.poses_from.resolve())
    if n is None:
        if preset is None:
            raise CryoaceInputError("give the number of particles with -n (or a --preset)")
        n = preset.n

    # -- the configuration: command line > preset > defaults -----------------------------------
    settings = dict(preset.settings) if preset else {}
    for dest, field in _CONFIG_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            settings[field] = value
    if args.noise_free:
        settings["snr_db"] = None
    elif args.snr_db is not None:
        settings["snr_db"] = args.snr_db
    elif "snr_db" not in settings:
        raise CryoaceInputError("give the noise level with --snr-db (e.g. -10) or --noise-free")
    cfg = SimulationConfig(n=int(n), ctf=not args.no_ctf, invert_contrast=args.invert_contrast,
                           projector=args.projector, seed=args.seed, stack_size=args.stack_size,
                           batch_size=args.batch_size, **settings)
    cfg.validate()
    provenance["arguments"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                               if not k.startswith("_")}

    size = volume.shape[-1]
    noise = "noise-free" if cfg.snr_db is None else f"SNR {cfg.snr_db:g} dB"
    print(f"simulating {cfg.n} particles, box {size} px at {pixel_size:.4g} Å/px, {noise}, "
          f"CTF {'on' if cfg.ctf else 'off'}, {cfg.projector} projector, device {device}", file=sys.stderr)
    res = simulate_dataset(np.asarray(volume, dtype=np.float32), float(pixel_size), args.output, cfg,
                           poses=poses, volume_origin=origin, provenance=provenance,
                           overwrite=args.overwrite, progress=not args.quiet, device=device,
                           log=lambda m: print(f"cryoace simulate: {m}", file=sys.stderr))
    stacks = res.stacks[0].name if len(res.stacks) == 1 else f"{len(res.stacks)} stacks"
    print(f"wrote {res.n} particles to {args.output}/ ({stacks}, particles.star, volume.mrc, "
          f"simulation.yaml); noise sigma {res.noise_sigma:.4g}")
    return 0
