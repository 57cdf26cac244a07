"""Benchmark: the global search's shift grid around each particle's centring shift and around 0, against
around 0 only (``cryoace refine --centring 0``, the search before) — side by side on the same particles.

Takes a finished run (its half maps) and simulated particles of the same molecule with known poses
(``--new-data``, e.g. made with ``cryoace simulate --preset demo --seed 11``). Runs ``cryoace refine
RUN new.star --encoder none`` (every particle searched globally) both ways and records, against the
truth after global alignment: the median pose error, the mean squared Frobenius error (the tail
counts), the fraction beyond 20° overall and by the particles' true distance from the centre, the
search's wall time, and the map's FSC-0.5 against the true map. Writes
bench/results/<--name>_<device>.json with the CPU load seen.

    python bench/centring.py RUN_DIR --new-data DIR [--truth-map MAP] [--work DIR] [--name centring]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import truth_fsc05_px  # noqa: E402

from cryoace.cli.main import main as cli  # noqa: E402
from cryoace.evaluate.truth import evaluate_poses  # noqa: E402
from cryoace.io.particles import read_particles  # noqa: E402
from cryoace.physics.rotations import geodesic_angle  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402

#: the particles' true distance from the centre (px) in these bins
DISTANCE_BINS_PX = (0.0, 2.0, 3.0, 4.0, 5.0, 6.0, float("inf"))


def errors_by_distance(poses: Path, truth: Path) -> dict:
    """Pose errors of ``poses`` against ``truth`` (star files, same particles): overall and per bin of the
    true shift's length."""
    estimated, true = read_particles(poses), read_particles(truth)
    evaluation = evaluate_poses(estimated, true)
    alignment = evaluation.alignment
    angle = torch.rad2deg(geodesic_angle(alignment.aligned, alignment.reference))
    distance = true.pose.shift_angst.double().norm(dim=-1) / torch.as_tensor(true.pixel_size, dtype=torch.float64)
    bins = {}
    for low, high in zip(DISTANCE_BINS_PX[:-1], DISTANCE_BINS_PX[1:], strict=True):
        inside = (distance >= low) & (distance < high)
        if inside.any():
            bins[f"{low:g}-{high:g} px"] = {"particles": int(inside.sum()),
                                           "beyond_20deg": float((angle[inside] > 20).double().mean()),
                                           "median_deg": float(angle[inside].median())}
    return {"median_deg": float(evaluation.errors.median_angle_deg),
            "mean_sq_frobenius": float(evaluation.errors.mean_sq_frobenius),
            "beyond_20deg": float((angle > 20).double().mean()), "by_distance_from_centre": bins}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--new-data", type=Path, required=True, help="particles with true poses (particles.star)")
    parser.add_argument("--truth-map", type=Path, default=None, help="default NEW_DATA/volume.mrc")
    parser.add_argument("--work", type=Path, default=Path("bench_work/centring"))
    parser.add_argument("--name", default="centring")
    args = parser.parse_args()
    star = args.new_data / "particles.star"
    truth_map = args.truth_map or args.new_data / "volume.mrc"
    result = {"run": str(args.run_dir), "new_data": str(args.new_data), "load_average_start": os.getloadavg(),
              "ways": {}}
    for label, centring in (("centred", None), ("around_0_only", "0")):
        out = args.work / label
        if out.exists():
            shutil.rmtree(out)
        flags = [] if centring is None else ["--centring", centring]
        status = cli(["refine", str(args.run_dir), str(star), "-o", str(out), "--quiet", "--encoder", "none", *flags])
        if status not in (0, 4):
            print(f"cryoace refine failed ({status})", file=sys.stderr)
            return 1
        search = json.loads((out / "search.json").read_text())
        way = {"search_s": search["search_s"], "fsc05_vs_truth_px": truth_fsc05_px(out / "volume.mrc", truth_map),
               **errors_by_distance(out / "poses.star", star)}
        result["ways"][label] = way
        print(f"{label:14s}: {way['search_s']:.0f} s, median {way['median_deg']:.2f}°, mean sq. Frobenius "
              f"{way['mean_sq_frobenius']:.4f}, {100 * way['beyond_20deg']:.1f} % beyond 20°, FSC-0.5 "
              f"{way['fsc05_vs_truth_px']:.2f} px", flush=True)
    result["load_average_end"] = os.getloadavg()
    print(f"wrote {write_result(args.name, resolve_device('cpu'), result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
