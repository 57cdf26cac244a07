"""Reconstruct a map from particles with known poses (direct Fourier inversion with CTF/Wiener weighting).

Reads a RELION .star or cryoSPARC .cs file whose rows carry poses (rlnAngleRot/Tilt/Psi and origins,
or alignments3D/pose and shift), inserts every image's CTF-weighted spectrum at its central slice
and divides by the summed CTF² plus a small Wiener constant. The map is written with the (possibly
downsampled) pixel size in its header. With --half-maps the particles are split into two halves
(rlnRandomSubset when present, else a seeded random split); both half maps, their FSC plot and the
gold-standard (0.143) resolution are written too.

cryoDRGN users give the .mrcs stack with --poses (and --ctf) pickles instead of a star file.

Example:
  cryoace backproject particles.star -o map.mrc --half-maps --downsample 128
  cryoace backproject particles.mrcs --poses pose.pkl --ctf ctf.pkl -o map.mrc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import CryoaceInputError
from .particle_input import add_particle_input_args, open_particle_table


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", type=Path,
                        help="particles with poses: RELION .star, cryoSPARC .cs, or an .mrcs stack with --poses")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output map (.mrc)")
    parser.add_argument("--datadir", type=Path, help="directory holding the image stacks, if not where "
                        "the particle file says")
    parser.add_argument("--downsample", type=int, metavar="L", help="Fourier-crop images to an L×L box first")
    parser.add_argument("--half-maps", action="store_true", help="also write two half maps and their FSC")
    parser.add_argument("--invert-contrast", action="store_true", help="for stacks with dark particles")
    parser.add_argument("--no-ctf", action="store_true", help="ignore the CTF columns (images not CTF-modulated)")
    parser.add_argument("--wiener-eps", type=float, default=1e-2,
                        help="Wiener constant relative to the mean summed CTF² (default: 0.01); larger "
                        "for noisier data or few particles")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half split (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_particle_input_args(parser)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..evaluate.fsc import fsc
    from ..io.atomic import atomic_paths
    from ..io.mrc import write_mrc
    from ..io.particles import ParticleDataset
    from ..reconstruct.backproject import FourierAccumulator, accumulate, split_half_sets
    from ..runtime import resolve_device

    if args.wiener_eps <= 0:
        raise CryoaceInputError(f"--wiener-eps must be positive, got {args.wiener_eps}")
    if args.batch_size <= 0:
        raise CryoaceInputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.output.is_dir():
        raise CryoaceInputError("output is a directory; give a file name such as map.mrc", args.output)
    device = resolve_device(args.device)

    table = open_particle_table(args, args.particles, poses=args.poses)
    if not table.has_pose and table.image_paths is not None and args.particles.suffix.lower() in (".mrcs", ".mrc"):
        raise CryoaceInputError("an image stack has no poses; give them with --poses pose.pkl (backprojection "
                                "needs known orientations)", args.particles)
    if not table.has_pose:
        raise CryoaceInputError("the file has no poses (need rlnAngleRot/Tilt/Psi or alignments3D/pose); "
                                "backprojection needs known orientations", args.particles)
    dataset = ParticleDataset(table, downsample=args.downsample, invert_contrast=args.invert_contrast,
                              normalize=False)
    pixel_size = dataset.pixel_size
    rows = np.arange(len(dataset))
    use_ctf = dataset.has_ctf and not args.no_ctf

    size = dataset.image_size
    progress = not args.quiet
    print(f"{len(rows)} particles, box {size} px at {pixel_size:.4g} Å/px, CTF {'on' if use_ctf else 'off'}, "
          f"device {device}")

    def reconstruct(rows_part: np.ndarray, desc: str) -> FourierAccumulator:
        acc = FourierAccumulator(size, pad_factor=2, device=device)
        accumulate(dataset, rows_part, acc, batch_size=args.batch_size, use_ctf=use_ctf, progress=progress,
                   desc=desc)
        return acc

    def to_numpy(volume: torch.Tensor) -> np.ndarray:
        return volume.float().cpu().numpy()

    if args.half_maps:
        half1, half2 = split_half_sets(table, rows, seed=args.seed)
        if len(half1) == 0 or len(half2) == 0:
            raise CryoaceInputError("cannot split fewer than 2 particles into half sets", args.particles)
        acc1, acc2 = reconstruct(half1, "half 1"), reconstruct(half2, "half 2")
        full = acc1.merged(acc2).volume(args.wiener_eps)
        vol1, vol2 = acc1.volume(args.wiener_eps), acc2.volume(args.wiener_eps)
        stem = args.output.with_suffix("")
        result = fsc(vol1, vol2, voxel_size=pixel_size)
        gold = result.resolution(0.143)
        from ..evaluate.plots import plot_fsc
        # the main map, both half maps and the plot appear together or not at all (a full disk)
        outputs = [args.output, Path(f"{stem}_half1.mrc"), Path(f"{stem}_half2.mrc"), Path(f"{stem}_fsc.png")]
        with atomic_paths(*outputs) as (tmp_full, tmp1, tmp2, tmp_png):
            write_mrc(tmp_full, to_numpy(full), pixel_size)
            write_mrc(tmp1, to_numpy(vol1), pixel_size)
            write_mrc(tmp2, to_numpy(vol2), pixel_size)
            plot_fsc({"half 1 vs half 2": result}, tmp_png)
        print(f"half maps: {stem}_half1.mrc, {stem}_half2.mrc ({len(half1)} + {len(half2)} particles); "
              f"FSC 0.143 at {gold.angstrom:.2f} Å ({gold.px:.2f} px); plot {stem}_fsc.png")
    else:
        full = reconstruct(rows, "backprojecting").volume(args.wiener_eps)
        write_mrc(args.output, to_numpy(full), pixel_size)
    print(f"wrote {args.output} ({size}³ voxels, {pixel_size:.4g} Å/voxel)")
    return 0
