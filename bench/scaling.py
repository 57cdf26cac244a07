"""Benchmark: how the whole `cryoace reconstruct` run grows with the number of particles
(issue "amortization that pays").

For each N of ``--n`` the demo molecule is simulated at −10 dB (L = 64, CTF, shifts) and reconstructed
with the same options, once per ``--subset`` value (``--refine-subset``: the refinement rounds run on
at most that many particles, every other particle is searched once at the end; 0 = every particle in
every round, the pipeline before). Recorded per run: wall time, time per stage (training, ab initio,
refinement rounds, the final pass over the other particles) from metrics.jsonl, peak RSS of the
process tree, FSC-0.5 against the truth, the median pose error, and the claimed resolution. Writes
bench/results/<name>_<device>.json with the CPU load seen.

    python bench/scaling.py [--n 2000,8000] [--subset 2000] [--max-time 20m] [--refine-rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, truth_fsc05_px  # noqa: E402

from cryoace.cli.main import main as cli  # noqa: E402
from cryoace.evaluate.plots import read_metrics  # noqa: E402
from cryoace.evaluate.truth import evaluate_poses  # noqa: E402
from cryoace.io.particles import read_particles  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402


def stage_times(metrics: Path) -> dict:
    """Wall time (s) at the end of each stage, from the records' run clock."""
    out = {}
    for kind, label in (("train", "training"), ("ab_initio", "ab_initio"), ("refine", "rounds"),
                        ("refine_all", "all_particles"), ("gold_standard", "gold_standard")):
        records = read_metrics(metrics, kind)
        if records:
            out[label] = max(float(r.get("elapsed_s", 0.0)) for r in records)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="2000,8000")
    parser.add_argument("--subset", default="2000", help="--refine-subset values to run (0 = all particles)")
    parser.add_argument("--max-time", default="20m", help="each run's whole-job budget")
    parser.add_argument("--refine-rounds", default="4")
    parser.add_argument("--work", type=Path, default=Path("bench_work/scaling"))
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args()
    runs = []
    for n in map(int, args.n.split(",")):
        star = demo_dataset(args.work / f"data_{n}", noise_free=False, n=n, seed=0)
        for subset in map(int, args.subset.split(",")):
            run_dir = args.work / f"run_{n}_subset{subset}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            load0, wall0 = os.getloadavg(), time.monotonic()
            status = cli(["reconstruct", str(star), "-o", str(run_dir), "--quiet", "--device", "cpu",
                          "--max-time", args.max_time, "--refine-rounds", args.refine_rounds,
                          "--refine-subset", str(subset)])
            wall = time.monotonic() - wall0
            gold = json.loads((run_dir / "gold_standard.json").read_text())
            poses = evaluate_poses(read_particles(run_dir / "poses.star"), read_particles(star))
            result = {"n": n, "subset": subset, "exit_status": status, "wall_time_s": wall,
                      "stages_end_s": stage_times(run_dir / "metrics.jsonl"),
                      "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "load_average_start": load0, "load_average_end": os.getloadavg(),
                      "fsc05_px": truth_fsc05_px(run_dir / "volume.mrc", star.parent / "volume.mrc"),
                      "median_error_deg": poses.errors.median_angle_deg,
                      "mean_sq_frobenius": poses.errors.mean_sq_frobenius,
                      "claimed_px": gold["unmasked_resolution_px"], "resolved": gold["resolved"]}
            runs.append(result)
            print(f"N {n:6d}, subset {subset:6d}: {wall / 60:.1f} min (stages end {result['stages_end_s']}), "
                  f"FSC-0.5 {result['fsc05_px']:.2f} px, median error {result['median_error_deg']:.1f}°, "
                  f"claimed {result['claimed_px']:.2f} px", flush=True)
            write_result(args.name, resolve_device("cpu"), {"options": vars(args) | {"work": str(args.work)},
                                                            "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
