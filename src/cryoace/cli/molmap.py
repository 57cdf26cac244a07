"""Make a density map from an atomic model (PDB / mmCIF, optionally gzipped), molmap-style.

Reads the first model with gemmi, drops hydrogens and waters (guessing elements from atom names when
the file has no element column, so that e.g. CA is carbon), and sums one Gaussian per atom of weight
Z (atomic number) and sigma = 0.225 x resolution, integrated over each voxel (electrons/Å³). The
model's centre (Z-weighted centroid) sits at voxel L//2; the header voxel size and origin
(centroid - (L//2) x pixel size) make the map overlay the model in ChimeraX. Without --box, the
smallest even box that holds the molecule is used.

Example:
  cryoace molmap 4ake.pdb -o adk.mrc --box 64 --pixel-size 1.5 --resolution 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CryoaceInputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="atomic model: .pdb, .cif, .mmcif (optionally .gz)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output map (.mrc)")
    parser.add_argument("--box", type=int, metavar="L", help="box size in pixels (even; default: fit the molecule)")
    parser.add_argument("--pixel-size", type=float, required=True, metavar="Å", help="voxel size (Å/px)")
    parser.add_argument("--resolution", type=float, required=True, metavar="Å",
                        help="resolution of the map (Å); each atom is a Gaussian of sigma 0.225 x resolution")


def main(args: argparse.Namespace) -> int:
    from ..io.mrc import write_mrc
    from ..simulate.molmap import fit_box, molmap, read_model

    if not args.pixel_size > 0:
        raise CryoaceInputError(f"--pixel-size must be a positive number of Å, got {args.pixel_size:g}")
    if not args.resolution > 0:
        raise CryoaceInputError(f"--resolution must be a positive number of Å, got {args.resolution:g}")
    if args.box is not None and (args.box <= 0 or args.box % 2):
        raise CryoaceInputError(f"--box must be a positive even number of pixels, got {args.box}")
    if args.output.is_dir():
        raise CryoaceInputError("output is a directory; give a file name such as map.mrc", args.output)
    model = read_model(args.model)
    box = args.box if args.box is not None else fit_box(model, args.pixel_size, args.resolution)
    result = molmap(model, box, args.pixel_size, args.resolution)
    write_mrc(args.output, result.data, result.pixel_size, origin=result.origin)
    guessed = " (elements guessed from atom names)" if model.guessed_elements else ""
    print(f"{len(model)} atoms{guessed}, centroid ({', '.join(f'{c:.2f}' for c in result.centroid)}) Å "
          f"at voxel {box // 2}", file=sys.stderr)
    print(f"wrote {args.output} ({box}³ voxels, {args.pixel_size:g} Å/voxel, resolution "
          f"{args.resolution:g} Å, origin ({', '.join(f'{o:.3f}' for o in result.origin)}) Å)")
    return 0
