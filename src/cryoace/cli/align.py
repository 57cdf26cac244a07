"""Align a map onto a reference map: rotation, translation and hand, then report the FSC.

Searches the rotation (a near-uniform grid of --angular-step degrees on small low-passed copies of
both maps, then a local refinement at up to --refine-size voxels), the translation (peak of the FFT
cross-correlation, refined to sub-voxel precision) and the hand (the mirror image is tried too, unless
--flip-hand or --keep-hand decides it). A map with another box or voxel size is first resampled onto
the reference's grid (Fourier crop/pad about the box centres). Writes the aligned map (on the
reference's grid), the transform as JSON beside it (rotation matrix G, hand, shift in px and Å,
correlation; the aligned map is map(H G (r - shift)) with r in Å from the box centre and
H = diag(1, 1, -1) when the hand is flipped) and a PNG of the FSC against the reference. Prints the
correlation and the resolution at FSC 0.5 and 0.143. With --no-search nothing is searched: the map is
only resampled (without -r: kept on its own grid) and, with --flip-hand, mirrored.

Example:
  cryoace align run/volume.mrc -r truth.mrc -o run/volume_aligned.mrc
  cryoace align run/volume.mrc --flip-hand --no-search -o run/volume_mirrored.mrc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import CryoaceInputError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", type=Path, metavar="MAP", help="the map to move (.mrc)")
    parser.add_argument("-r", "--reference", type=Path, metavar="REFERENCE",
                        help="the reference map (.mrc); required unless --no-search")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="ALIGNED.mrc",
                        help="the aligned map (.mrc)")
    hand = parser.add_mutually_exclusive_group()
    hand.add_argument("--flip-hand", action="store_true", help="force the mirror image (no hand search)")
    hand.add_argument("--keep-hand", action="store_true", help="never mirror (no hand search)")
    parser.add_argument("--no-search", action="store_true",
                        help="no rotation/translation search: only resample (and mirror with --flip-hand)")
    parser.add_argument("--angular-step", type=float, default=18.0, metavar="DEG",
                        help="spacing of the global rotation grid in degrees (default 18)")
    parser.add_argument("--coarse-size", type=int, default=20, metavar="PX",
                        help="box of the global search, voxels (default 20)")
    parser.add_argument("--refine-size", type=int, default=64, metavar="PX",
                        help="largest box of the local refinement, voxels (default 64)")
    parser.add_argument("--json", type=Path, metavar="OUT.json",
                        help="where to write the transform (default: ALIGNED.json beside the map)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png",
                        help="FSC plot (default: ALIGNED_fsc.png beside the map)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the FSC plot")


def _check_args(args: argparse.Namespace) -> None:
    if args.reference is None and not args.no_search:
        raise CryoaceInputError("a reference map (-r REFERENCE) is needed to search; "
                                "pass --no-search to only mirror/resample", args.map)
    if not args.angular_step > 0 or args.angular_step > 90:
        raise CryoaceInputError(f"--angular-step must be in (0, 90] degrees, got {args.angular_step}")
    for name in ("coarse_size", "refine_size"):
        if getattr(args, name) < 8:
            raise CryoaceInputError(f"--{name.replace('_', '-')} must be at least 8, "
                                    f"got {getattr(args, name)}")
    if args.output.suffix.lower() not in (".mrc", ".map"):
        raise CryoaceInputError("output must end in .mrc or .map", args.output)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..evaluate.fsc import DEFAULT_THRESHOLDS, fsc
    from ..evaluate.map_align import align_maps
    from ..io.atomic import atomic_path
    from ..io.mrc import read_volume, write_mrc
    from .fsc import fsc_summary_line

    _check_args(args)
    moving = read_volume(args.map)
    reference = read_volume(args.reference) if args.reference is not None else moving
    hands = "flipped" if args.flip_hand else ("original" if args.keep_hand else "both")
    result = align_maps(moving.data, reference.data, moving.voxel_size, reference.voxel_size,
                        hands=hands, search=not args.no_search, angular_step_deg=args.angular_step,
                        coarse_size=args.coarse_size, refine_size=args.refine_size)
    fsc_result = None
    if args.reference is not None:
        fsc_result = fsc(result.aligned, reference.data, voxel_size=result.voxel_size)

    json_path = args.json or args.output.with_suffix(".json")
    plot_path = None if args.no_plot or fsc_result is None else (
        args.plot or args.output.with_name(args.output.stem + "_fsc.png"))
    write_mrc(args.output, result.aligned.numpy().astype(np.float32), result.voxel_size or 0.0,
              origin=reference.origin)
    payload = {"map": str(args.map), "reference": None if args.reference is None else str(args.reference),
               "aligned_map": str(args.output), **result.to_dict(),
               "fsc": None if fsc_result is None else fsc_result.to_dict(DEFAULT_THRESHOLDS)}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    if plot_path is not None:
        from ..evaluate.plots import plot_fsc

        plot_fsc({f"{args.map.name} aligned vs {args.reference.name}": fsc_result}, plot_path,
                 thresholds=DEFAULT_THRESHOLDS)

    # one short table: what was done and how well the maps agree after it
    shift = ", ".join(f"{v:.2f}" for v in result.shift_px.tolist())
    sa = result.shift_angst
    rows = [("hand", "flipped (mirrored)" if result.flip_hand else "original"),
            ("rotation", f"{result.angle_deg:.2f}°"),
            ("shift", f"({shift}) px" + ("" if sa is None else
                                          " = (" + ", ".join(f"{v:.2f}" for v in sa.tolist()) + ") Å")),
            ("correlation", f"{result.correlation:.4f}")]
    if result.correlation_other_hand is not None:
        rows.append(("other hand", f"{result.correlation_other_hand:.4f}"))
    if result.resampled_from is not None:
        box, vs = result.resampled_from
        rows.append(("resampled", f"from {box} px" + (f" at {vs:g} Å/px" if vs else "")))
    for key, value in rows:
        print(f"{key:>12}  {value}")
    if fsc_result is not None:
        for t in DEFAULT_THRESHOLDS:
            print(fsc_summary_line(fsc_result.resolution(t)))
    written = [args.output, json_path] + ([plot_path] if plot_path else [])
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
