"""Fourier shell correlation between two maps, with the resolution at FSC 0.5 and 0.143.

Computes the FSC over Fourier shells one voxel wide (shell 0 .. L/2, L/2 = Nyquist) and prints a
table (shell, frequency in 1/Å, resolution in Å, FSC) and the resolution where the curve first drops
below 0.5 (use against a ground-truth map) and 0.143 (use between independent half-maps), in pixels
(L/shell, Nyquist = 2.0) and in Å, interpolating linearly between shells. With --mask, both maps are
multiplied by the (soft) mask first, and the correlation the mask itself adds is removed by phase
randomization (Chen et al. 2013: phases randomized beyond the shell where the unmasked FSC drops below
0.8; the table and resolutions are of the corrected curve, the JSON also holds the unmasked, masked
and randomized curves). The voxel size comes from the MRC headers (or --pixel-size);
without one, resolutions are given in pixels only. With --json -, the JSON goes to stdout and the
table to stderr.

Example:
  cryoace fsc half1.mrc half2.mrc --mask mask.mrc --json fsc.json --plot fsc.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import CryoaceInputError

VOXEL_SIZE_RTOL = 1e-3
MAX_TABLE_ROWS = 33


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map1", type=Path, help="first map (.mrc)")
    parser.add_argument("map2", type=Path, help="second map (.mrc), same box and voxel size")
    parser.add_argument("--mask", type=Path, metavar="MASK",
                        help="real-space (soft) mask (.mrc) multiplied into both maps")
    parser.add_argument("--json", metavar="OUT.json",
                        help="write the curve and resolutions as JSON ('-' for stdout)")
    parser.add_argument("--plot", type=Path, metavar="OUT.png", help="write a PNG plot of the curve")
    parser.add_argument("--pixel-size", type=float, metavar="Å", dest="voxel_size",
                        help="voxel size of the maps in Å/px, overriding the headers")
    parser.add_argument("--voxel-size", type=float, dest="voxel_size", action=_RenamedOption,
                        help=argparse.SUPPRESS)  # the old name, still accepted
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the phase randomization with --mask (default 0)")


class _RenamedOption(argparse.Action):
    """A hidden old option name: stores like the new one, with a note to use the new name."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"cryoace fsc: note: {option_string} is now called --pixel-size", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _warn(message: str) -> None:
    print(f"cryoace fsc: warning: {message}", file=sys.stderr)


def _voxel_size(args, vs1: float, vs2: float) -> float | None:
    if args.voxel_size is not None:
        if not args.voxel_size > 0:
            raise CryoaceInputError(f"--pixel-size must be positive, got {args.voxel_size}")
        return float(args.voxel_size)
    if vs1 > 0 and vs2 > 0:
        if abs(vs1 - vs2) > VOXEL_SIZE_RTOL * max(vs1, vs2):
            raise CryoaceInputError(f"voxel size {vs2:g} Å differs from {vs1:g} Å of {args.map1} "
                                    "(resample one map, or pass --pixel-size)", args.map2)
        return vs1
    if vs1 > 0:
        _warn(f"{args.map2} has no voxel size in its header; using {vs1:g} Å from {args.map1}")
        return vs1
    if vs2 > 0:
        _warn(f"{args.map1} has no voxel size in its header; using {vs2:g} Å from {args.map2}")
        return vs2
    _warn("neither map has a voxel size in its header; resolutions are in pixels only "
          "(pass --pixel-size)")
    return None


def _load(args):
    from ..io.mrc import read_volume

    m1 = read_volume(args.map1)
    m2 = read_volume(args.map2)
    if m1.data.shape != m2.data.shape:
        raise CryoaceInputError(f"box size {m2.data.shape[0]} differs from {m1.data.shape[0]} "
                                f"of {args.map1}", args.map2)
    mask = None
    if args.mask is not None:
        mk = read_volume(args.mask)
        if mk.data.shape != m1.data.shape:
            raise CryoaceInputError(f"mask box size {mk.data.shape[0]} differs from the maps' "
                                    f"{m1.data.shape[0]}", args.mask)
        mask = mk.data
        if not np.any(mask):
            raise CryoaceInputError("mask is empty (all zeros)", args.mask)
    voxel_size = _voxel_size(args, m1.voxel_size, m2.voxel_size)  # may raise: warn only after it
    if mask is not None:
        lo, hi = float(mask.min()), float(mask.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            _warn(f"{args.mask} values span [{lo:.3g}, {hi:.3g}], not [0, 1]; used as given")
    return m1.data, m2.data, mask, voxel_size


def _table(result, out) -> None:
    in_a = result.voxel_size is not None
    unit = "Å" if in_a else "px"
    freq_unit = "1/Å" if in_a else "1/px"
    print(f"{'shell':>5}  {'freq (' + freq_unit + ')':>12}  {'res (' + unit + ')':>10}  {'FSC':>7}",
          file=out)
    n = len(result.curve)
    step = max(1, -(-(n - 1) // (MAX_TABLE_ROWS - 1)))
    rows = list(range(1, n, step))
    if rows[-1] != n - 1:
        rows.append(n - 1)
    scale = result.voxel_size or 1.0
    for k in rows:
        freq = result.freq_cyc_px[k] / scale
        print(f"{k:5d}  {freq:12.4f}  {1.0 / freq:10.2f}  {result.curve[k]:7.4f}", file=out)


def fsc_summary_line(res) -> str:
    """One line for an FSC crossing: the resolution in px (and Å) and where the curve crossed."""
    a = f", {res.angstrom:.2f} Å" if res.angstrom is not None else ""
    head = f"resolution at FSC {res.threshold:g}: {res.px:.2f} px{a}"
    if res.crossed:
        return f"{head} (crossing at shell {res.shell:.2f})"
    return f"{head} (never drops below: Nyquist, at least this good)"


def main(args: argparse.Namespace) -> int:
    from ..evaluate.fsc import DEFAULT_THRESHOLDS, fsc, masked_fsc
    from ..io.atomic import atomic_path

    vol1, vol2, mask, voxel_size = _load(args)
    corrected = None
    if mask is not None:
        corrected = masked_fsc(vol1, vol2, mask, voxel_size=voxel_size, seed=args.seed)
        result = corrected.corrected
    else:
        result = fsc(vol1, vol2, voxel_size=voxel_size)

    to_stdout_json = args.json == "-"
    out = sys.stderr if to_stdout_json else sys.stdout
    _table(result, out)
    for t in DEFAULT_THRESHOLDS:
        print(fsc_summary_line(result.resolution(t)), file=out)
    if corrected is not None:
        how = ("no correction needed" if corrected.randomize_from_shell is None else
               f"phases randomized from shell {corrected.randomize_from_shell}")
        res = [(name, c.resolution(0.143)) for name, c in
               (("unmasked", corrected.unmasked), ("masked", corrected.masked),
                ("randomized", corrected.randomized)) if c is not None]
        print(f"masked FSC corrected ({how}); at 0.143: "
              + ", ".join(f"{name} {r.px:.2f} px" for name, r in res), file=out)

    if args.json is not None:
        payload = {"map1": str(args.map1), "map2": str(args.map2),
                   "mask": None if args.mask is None else str(args.mask),
                   **(result.to_dict(DEFAULT_THRESHOLDS) if corrected is None
                      else corrected.to_dict(DEFAULT_THRESHOLDS))}
        text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
        if to_stdout_json:
            sys.stdout.write(text)
        else:
            with atomic_path(args.json) as tmp:
                tmp.write_text(text)
    if args.plot is not None:
        from ..evaluate.plots import plot_fsc

        label = f"{args.map1.name} vs {args.map2.name}"
        curves = {label: result} if corrected is None else {
            f"{label} (masked, corrected)": result, "unmasked": corrected.unmasked,
            **({} if corrected.randomized is None else {"masked": corrected.masked,
                                                        "phase-randomized": corrected.randomized})}
        plot_fsc(curves, args.plot, thresholds=DEFAULT_THRESHOLDS)
    return 0
