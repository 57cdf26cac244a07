"""Write a run's self-contained HTML report (RUN_DIR/report.html).

One page, no network resources (images embedded, inline CSS, no scripts), with sections: timings
(steps, training time, images/s, final loss), the loss curve, FSC curves (half maps from training
records, against the truth from 'cryoace evaluate --truth-map', 'cryoace fsc --json' files in
RUN_DIR), the half-map resolution over training time, the orientation coverage of poses.star
(Mollweide histogram of viewing directions), central slices and projections of volume.mrc, and
config.yaml. A section whose files are missing says so. 'cryoace reconstruct' writes the report at
the end of every run; run this again after 'cryoace evaluate' to add the FSC against the truth.

Example:
  cryoace report runs/adk
  cryoace report runs/adk -o adk_report.html
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (cryoace reconstruct -o)")
    parser.add_argument("-o", "--output", type=Path, metavar="OUT.html",
                        help="where to write the report (default: RUN_DIR/report.html)")


def main(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report

    path = write_report(args.run_dir, args.output)
    print(f"wrote {path}")
    return 0
