"""Evaluate a reconstruction against ground truth: pose errors and the FSC of the aligned map.

Reads the predicted poses (RUN_DIR/poses.star as written by 'cryoace predict-poses', or --poses) and
pairs them with the true poses of --truth by rlnImageName (stack file and index; failing that, by row
order when the counts are equal). An ab initio result lives in an arbitrary frame and hand, so the
global rotation G that best maps the predicted rotations onto the true ones is fitted by least
squares over all particles (SVD), for both hands (the mirror is (x, y, z) -> (x, y, -z)), and the
hand with the smaller error is kept. Reported: the hand and G; the mean and median squared Frobenius
error ||R_gt - R_aligned||^2 (0-8) and the mean and median angle (degrees); the mean squared
translation error in pixels of the truth particles, also after removing the global 3D offset of the
map that the shifts imply; and the pose coverage (fraction of 768 equal-area viewing-direction
cells reached) of the predicted and the true poses.

With --symmetry (Cn or Dn) a particle posed at a symmetry mate of its true pose (the same image) is
not wrong: its error is to the nearest mate, and the global rotation is fitted modulo the symmetry.
The true map's axes are found in --truth-map when it is given (a map made from an atomic model keeps
the model's axes), else RELION's frame is assumed (n-fold axis z, first two-fold x).

With --truth-map, the run's map (RUN_DIR/volume.mrc, or --volume) is carried into the truth's frame
and hand with the same G, its global translation relative to the truth (which ab initio shifts leave
free) is found by FFT cross-correlation and removed (--no-center keeps it), and the FSC against the
true map is reported at 0.5 and 0.143 in px and Å. A truth map with a larger box is Fourier-cropped
to the run's box when both cover the same physical box (a run on downsampled particles).

Written to RUN_DIR: evaluation.json (everything above), and with --truth-map fsc_vs_truth.png and
volume_aligned.mrc (the map as compared: open it over the true map in ChimeraX). A short table goes
to stdout (to stderr with --json -).

Example:
  cryoace evaluate runs/adk --truth demo_dataset/particles.star --truth-map demo_dataset/volume.mrc
  cryoace evaluate runs/adk --truth sim/particles.star --poses other_poses.star --json -
  cryoace evaluate runs/hand --truth hand.mrcs --truth-poses hand_rot.pkl
  cryoace evaluate runs/spike --truth sim/particles.star --truth-map sim/volume.mrc --symmetry C3
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..errors import CryoaceInputError
from .particle_input import add_particle_input_args, open_particle_table

HANDS = ("auto", "original", "flipped")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (cryoace reconstruct -o)")
    parser.add_argument("--truth", type=Path, required=True, metavar="PARTICLES",
                        help="particle file with the true poses (.star, .cs, or an .mrcs stack with --truth-poses)")
    parser.add_argument("--truth-map", type=Path, metavar="MAP", help="the true map (.mrc) for the FSC")
    parser.add_argument("--poses", type=Path, metavar="POSES",
                        help="predicted poses to evaluate: .star, .cs, or a cryoDRGN pose.pkl in the order of "
                        "the --truth particles (default: RUN_DIR/poses.star)")
    parser.add_argument("--volume", type=Path, metavar="MAP",
                        help="predicted map to compare with --truth-map (default: RUN_DIR/volume.mrc)")
    parser.add_argument("--json", metavar="OUT.json",
                        help="also write the JSON here ('-' for stdout); RUN_DIR/evaluation.json is always written")
    parser.add_argument("--hand", default="auto", choices=HANDS,
                        help="auto (default: the better of both), or force one hand")
    parser.add_argument("--no-center", action="store_true",
                        help="do not remove the map's global translation before the FSC")
    parser.add_argument("--coverage-bins", type=int, default=768, metavar="N",
                        help="equal-area viewing-direction cells for the pose coverage (default: 768)")
    parser.add_argument("--oversample", type=int, default=2, metavar="K",
                        help="resample the map on a K-times finer grid when rotating it (default: 2; "
                        "1 = plain trilinear, less memory)")
    parser.add_argument("--symmetry", default="C1", metavar="GROUP",
                        help="point group of the true map (Cn or Dn, default C1): each pose error is then "
                        "to the particle's nearest symmetry mate (the same image). With --truth-map the "
                        "axes are found in the true map (they need not lie along z); without, RELION's "
                        "frame is assumed (n-fold axis z, first two-fold x)")
    add_particle_input_args(parser, poses_flag="--truth-poses", ctf=False)


def _warn(message: str) -> None:
    print(f"cryoace evaluate: warning: {message}", file=sys.stderr)


def _num(v: float, digits: int = 2) -> str:
    """Fixed-point without a '-0.00'."""
    return f"{round(float(v), digits) + 0.0:.{digits}f}"


def _fmt_res(res) -> str:
    a = f" ({res.angstrom:.2f} Å)" if res.angstrom is not None else ""
    return f"{'' if res.crossed else '≤'}{res.px:.2f} px{a}"


def _table(poses, comparison, written, out, symmetry: dict | None = None) -> None:
    d = poses.to_dict()
    al, rot, tr, cov = d["alignment"], d["rotation_error"], d["translation_error"], d["pose_coverage"]
    ax = ", ".join(_num(v, 3) for v in al["rotation_axis"])
    rows = [
        ("particles", f"{poses.n_particles} (paired by {poses.matched_by})"),
        *([] if symmetry is None else [("symmetry", f"{symmetry['group']}: errors to the nearest symmetry mate; "
                                                    f"axes {symmetry['frame_from']}" + (
                                                        "" if symmetry["correlation"] is None else
                                                        f" (self-correlation {symmetry['correlation']:.3f})"))]),
        ("hand", f"{al['hand']} (mean ‖ΔR‖²_F {al['mean_sq_frobenius']:.4f}; other hand "
                 f"{al['mean_sq_frobenius_other_hand']:.4f})"),
        ("global rotation", f"{al['rotation_angle_deg']:.2f}° about ({ax})"),
        ("rotation error", f"‖ΔR‖²_F mean {rot['mean_sq_frobenius']:.4f}, median "
                           f"{rot['median_sq_frobenius']:.4f}; angle median {rot['median_angle_deg']:.2f}°, "
                           f"mean {rot['mean_angle_deg']:.2f}°"),
        ("translation error", f"mean squared {tr['mean_sq_px']:.4f} px² (rms {tr['rms_px']:.3f} px); "
                              f"{tr['mean_sq_px_after_offset']:.4f} px² after a global offset of ("
                              + ", ".join(_num(v) for v in tr["global_offset_px"]) + ") px"),
        ("pose coverage", f"predicted {cov['predicted']:.3f}, truth {cov['truth']:.3f} "
                          f"({cov['n_bins']} equal-area cells; uniform {cov['uniform_expected']:.3f})"),
    ]
    if comparison is not None:
        off = ", ".join(_num(v) for v in comparison.offset_px.tolist())
        if comparison.centered:
            rows.append(("map offset", f"({off}) px removed before the FSC"))
        r5, r143 = comparison.fsc.resolution(0.5), comparison.fsc.resolution(0.143)
        rows.append(("FSC vs truth", f"0.5: {_fmt_res(r5)}; 0.143: {_fmt_res(r143)}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", file=out)
    if written:
        print("wrote " + ", ".join(str(p) for p in written), file=out)


def _predicted(path: Path, truth):
    """The predicted poses' table: a .star/.cs file, or a cryoDRGN pose pickle of the truth's particles
    (row by row, at their stored box and pixel size)."""
    from ..io.particles import read_particles

    if path.suffix.lower() != ".pkl":
        return read_particles(path)
    from ..io.cryodrgn import read_cryodrgn_poses
    from ..train.predict import stored_box_size

    pred = truth.subset(slice(None))
    pred.pose = read_cryodrgn_poses(path, stored_box_size(truth), truth.pixel_size, count=len(truth))
    return pred


def _symmetry(args: argparse.Namespace, truth_map) -> tuple:
    """(operators or None, the JSON record or None) of ``--symmetry`` (None, None for C1)."""
    import numpy as np
    import torch

    from ..physics.symmetry import parse_group, symmetry_operators

    try:
        kind, n = parse_group(args.symmetry)
    except ValueError as exc:
        raise CryoaceInputError(f"--symmetry: {exc}") from None
    if n == 1 and kind == "C":
        return None, None
    group = f"{kind}{n}"
    if truth_map is None:
        operators = symmetry_operators(group)
        frame, correlation, where = torch.eye(3, dtype=torch.float64), None, "assumed in RELION's frame"
    else:
        from ..evaluate.symmetry import symmetry_frame

        # a copy: a memory-mapped map is read-only
        found = symmetry_frame(torch.tensor(np.asarray(truth_map, dtype=np.float32)), group)
        operators, frame, correlation = found.operators, found.frame, found.correlation
        where = f"found in the true map {args.truth_map}"
        if correlation < 0.5:
            _warn(f"the true map matches itself under {group} only weakly (correlation {correlation:.2f}): is it "
                  f"{group}-symmetric?")
    return operators, {"group": group, "frame_from": where, "correlation": correlation,
                       "frame": [[float(v) for v in row] for row in frame.tolist()],
                       "note": "the true map's operators are frame · g · frameᵀ (g in RELION's frame: n-fold "
                               "axis z, first two-fold x); a pose error is to the nearest R_gt·g"}


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..evaluate.truth import compare_maps, evaluate_poses
    from ..io.atomic import atomic_path
    from ..io.mrc import read_volume, write_mrc

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise CryoaceInputError("run directory not found", run_dir)
    if args.coverage_bins < 1:
        raise CryoaceInputError(f"--coverage-bins must be a positive number, got {args.coverage_bins}")
    if args.oversample < 1:
        raise CryoaceInputError(f"--oversample must be at least 1, got {args.oversample}")
    poses_path = args.poses if args.poses is not None else run_dir / "poses.star"
    if not poses_path.is_file():
        hint = "" if args.poses is not None else (
            " (write it with 'cryoace predict-poses RUN_DIR PARTICLES -o RUN_DIR/poses.star', or pass --poses)")
        raise CryoaceInputError(f"predicted poses not found{hint}", poses_path)
    volume_path = args.volume if args.volume is not None else run_dir / "volume.mrc"
    if args.volume is not None and args.truth_map is None:
        raise CryoaceInputError("--volume is compared with --truth-map; give the true map too")

    truth = open_particle_table(args, args.truth, poses=args.truth_poses)
    pred = _predicted(poses_path, truth)
    if args.truth_map is not None:  # read (and check) the maps before any work
        truth_map = read_volume(args.truth_map)
        if not volume_path.is_file():
            raise CryoaceInputError("predicted map not found (pass --volume)", volume_path)
        volume = read_volume(volume_path)

    operators, symmetry = _symmetry(args, truth_map.data if args.truth_map is not None else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hands = {"auto": "both"}.get(args.hand, args.hand)
        poses = evaluate_poses(pred, truth, hands=hands, coverage_bins=args.coverage_bins, operators=operators)
    for w in caught:
        _warn(str(w.message))

    comparison = None
    if args.truth_map is not None:
        if not volume.voxel_size > 0:
            _warn(f"{volume_path} has no voxel size in its header; assuming the true map's box")
        comparison = compare_maps(volume.data, volume.voxel_size, truth_map.data, truth_map.voxel_size,
                                  poses.alignment, center=not args.no_center, oversample=args.oversample,
                                  volume_path=volume_path, truth_path=args.truth_map)

    payload = {
        "run_dir": str(run_dir), "poses": str(poses_path), "truth": str(args.truth),
        "truth_map": None if args.truth_map is None else str(args.truth_map),
        "volume": None if args.truth_map is None else str(volume_path),
        **poses.to_dict(),
        "symmetry": symmetry,
        "fsc_vs_truth": None if comparison is None else comparison.to_dict(),
    }
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    written = []
    if comparison is not None:
        from ..evaluate.plots import plot_fsc

        png = run_dir / "fsc_vs_truth.png"
        label = "aligned run map vs true map"
        plot_fsc({label: comparison.fsc}, png, title=f"{run_dir.name}: FSC against the true map")
        aligned_path = run_dir / "volume_aligned.mrc"
        write_mrc(aligned_path, comparison.aligned.numpy().astype(np.float32),
                  comparison.fsc.voxel_size or 0.0)
        written += [png, aligned_path]
    json_path = run_dir / "evaluation.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(text)
    written.insert(0, json_path)
    to_stdout = args.json == "-"
    if args.json is not None and not to_stdout:
        with atomic_path(args.json) as tmp:
            tmp.write_text(text)
        written.append(Path(args.json))
    _table(poses, comparison, written, sys.stderr if to_stdout else sys.stdout, symmetry)
    if to_stdout:
        sys.stdout.write(text)
    return 0
