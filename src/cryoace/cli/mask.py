"""Make a soft mask from a map: threshold, dilate, raised-cosine edge.

Voxels above --threshold (map units) form the mask; it is dilated by --extend voxels and given a
raised-cosine edge --soft voxels wide (1 inside, falling to 0 at extend + soft voxels from the
thresholded region). Without --threshold, the threshold is the larger of 3 robust noise standard
deviations above the median (1.4826 x median absolute deviation: the box is mostly solvent) and 5% of
the way from the median to the maximum (for noise-free maps); the value used is printed. --lowpass
smooths the map (Gaussian, amplitude 1/2 at that resolution in Å) before thresholding. The mask is
written with the map's voxel size, for 'cryoace fsc --mask'.

Example:
  cryoace mask half1.mrc -o mask.mrc --lowpass 15 --extend 3 --soft 6
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CryoaceInputError


def add_args(parser: argparse.ArgumentParser) -> None:
    from ..defaults import MASK_EXTEND_PX as DEFAULT_EXTEND_PX
    from ..defaults import MASK_SOFT_PX as DEFAULT_SOFT_PX

    parser.add_argument("map", type=Path, metavar="MAP", help="the map (.mrc)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="MASK.mrc",
                        help="the mask (.mrc)")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="density threshold in map units (default: from the map's statistics)")
    parser.add_argument("--extend", type=float, default=DEFAULT_EXTEND_PX, metavar="PX",
                        help=f"dilation in voxels (default {DEFAULT_EXTEND_PX:g})")
    parser.add_argument("--soft", type=float, default=DEFAULT_SOFT_PX, metavar="PX",
                        help=f"width of the raised-cosine edge in voxels (default {DEFAULT_SOFT_PX:g})")
    parser.add_argument("--lowpass", type=float, metavar="ANGSTROM",
                        help="low-pass the map to this resolution (Å) before thresholding")


def main(args: argparse.Namespace) -> int:
    from ..evaluate.mask import make_mask
    from ..io.mrc import read_volume, write_mrc

    if args.extend < 0 or args.soft < 0:
        raise CryoaceInputError(f"--extend and --soft must be >= 0, got {args.extend:g} and {args.soft:g}")
    if args.lowpass is not None and not args.lowpass > 0:
        raise CryoaceInputError(f"--lowpass must be positive, got {args.lowpass:g}")
    vol = read_volume(args.map)
    if args.lowpass is not None and not vol.voxel_size > 0:
        raise CryoaceInputError("--lowpass needs a voxel size in the header", args.map)
    try:
        mask, threshold = make_mask(vol.data, threshold=args.threshold, extend_px=args.extend,
                                    soft_px=args.soft, lowpass_angst=args.lowpass,
                                    voxel_size=vol.voxel_size)
    except ValueError as exc:
        raise CryoaceInputError(str(exc), args.map) from None
    write_mrc(args.output, mask.numpy(), vol.voxel_size, origin=vol.origin)
    inside = float((mask >= 0.5).float().mean())
    print(f"threshold {threshold:.4g}{'' if args.threshold is not None else ' (default)'}, "
          f"extend {args.extend:g} px, soft edge {args.soft:g} px: {100 * inside:.1f}% of the box "
          f"at >= 0.5; wrote {args.output}")
    return 0
