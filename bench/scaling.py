"""Benchmark: how the whole `cryoace reconstruct` run grows with the number of particles
(issue "amortization that pays"), today's pipeline beside the amortized one.

For each N of ``--n`` the demo molecule is simulated at −10 dB (L = 64, CTF, shifts) and reconstructed
with a fixed amount of work per stage — the networks' ``--steps``, the ab initio's
``--ab-initio-iterations``, ``--refine-rounds`` — and a ``--max-time`` large enough that no stage is cut,
so the wall time is the cost of that work, not a budget:

* ``old``: every particle in every refinement round (``--refine-subset 0``);
* ``new``: the rounds on a bounded subset (``--subset``), an encoder taught from their map for
  ``--teach`` (``--teach-encoder``), then every other particle posed by it and searched locally first,
  globally only where its score says so.

``--old-n`` limits the old pipeline to some N (its cost grows linearly: hours at 64k on 2 cores).
Each run is its own process, so its peak RSS (the process's and its children's maxima) is its own.
Recorded per run: wall time, time at the end of each stage (from metrics.jsonl), peak RSS, FSC-0.5
against the truth, the median and mean squared Frobenius pose errors after alignment, and the
claimed resolution. Writes bench/results/<name>_<device>.json with the CPU load seen.

    python bench/scaling.py [--n 4000,16000,64000] [--old-n 4000] [--subset 2000] [--teach 3m]
        [--steps 300] [--ab-initio-iterations 30] [--refine-rounds 6] [--preload auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, truth_fsc05_px  # noqa: E402

from cryoace.evaluate.plots import read_metrics  # noqa: E402
from cryoace.evaluate.truth import evaluate_poses  # noqa: E402
from cryoace.io.particles import read_particles  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402

#: runs `cryoace reconstruct` in this process and prints two peaks (kB) of its own memory: the resident
#: set's high-water mark (``VmHWM``; it would count a memory-mapped stack's pages once read, but the
#: dataset reads stacks by positional reads since 7676ee2) and the anonymous part's (``RssAnon``,
#: sampled every 0.2 s: the memory the run itself holds). Not ``ru_maxrss``: Linux carries the parent's
#: high-water mark over fork/vfork + exec into the child's (see bench/memory.py), and this script
#: simulates the data itself.
RECONSTRUCT = ("import sys, threading, time\n"
               "from cryoace.cli.main import main\n"
               "def status(key):\n"
               "    with open('/proc/self/status') as f:\n"
               "        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))\n"
               "anon = [0]\n"
               "def sample():\n"
               "    while True:\n"
               "        anon[0] = max(anon[0], status('RssAnon'))\n"
               "        time.sleep(0.2)\n"
               "threading.Thread(target=sample, daemon=True).start()\n"
               "code = main(sys.argv[1:])\n"
               "print('PEAK_RSS_KB', status('VmHWM'), max(anon[0], status('RssAnon')), flush=True)\n"
               "sys.exit(code)\n")


def stage_times(metrics: Path) -> dict:
    """Wall time (s) at the end of each stage, from the records' run clock."""
    out = {}
    for kind, label in (("train", "training"), ("ab_initio", "ab_initio"), ("refine", "rounds"),
                        ("teach", "teaching"), ("refine_all", "all_particles"), ("gold_standard", "gold_standard")):
        records = read_metrics(metrics, kind)
        if records:
            out[label] = max(float(r.get("elapsed_s", 0.0)) for r in records)
    return out


def run_reconstruct(star: Path, run_dir: Path, args: list[str]) -> tuple[int, float, float, float]:
    """(exit status, wall time s, peak RSS MB, peak anonymous RSS MB) of one `cryoace reconstruct` in a
    fresh process."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", RECONSTRUCT, "reconstruct", str(star), "-o", str(run_dir),
                           "--quiet", "--device", "cpu", *args], capture_output=True, text=True)
    wall = time.monotonic() - start
    peaks = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
    rss_mb, anon_mb = (int(v) / 1024 for v in peaks[-1]) if peaks else (float("nan"), float("nan"))
    return proc.returncode, wall, rss_mb, anon_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="4000,16000,64000")
    parser.add_argument("--old-n", default="4000", help="the N at which today's pipeline runs too")
    parser.add_argument("--pipelines", default="new,old", help="which pipelines to run (e.g. old alone)")
    parser.add_argument("--subset", default="2000", help="the new pipeline's --refine-subset")
    parser.add_argument("--teach", default="3m", help="the new pipeline's --teach-encoder")
    parser.add_argument("--steps", default="300", help="the networks' steps (both pipelines)")
    parser.add_argument("--ab-initio-iterations", default="30", help="the job's default")
    parser.add_argument("--refine-rounds", default="6")
    parser.add_argument("--max-time", default="12h", help="large: no stage is cut")
    parser.add_argument("--preload", default="auto", help="the runs' --preload (auto caches the prepared "
                        "images in RAM when they fit in half the available memory: RSS then grows with N)")
    parser.add_argument("--work", type=Path, default=Path("bench_work/scaling"))
    parser.add_argument("--name", default="scaling")
    args = parser.parse_args()
    common = ["--max-time", args.max_time, "--refine-max-time", args.max_time, "--steps", args.steps,
              "--ab-initio-iterations", args.ab_initio_iterations, "--refine-rounds", args.refine_rounds,
              "--preload", args.preload]
    pipelines = {"new": ["--refine-subset", args.subset, "--teach-encoder", args.teach],
                 "old": ["--refine-subset", "0"]}
    old_n = {int(n) for n in args.old_n.split(",") if n}
    runs = []
    for n in map(int, args.n.split(",")):
        star = demo_dataset(args.work / f"data_{n}", noise_free=False, n=n, seed=0)
        for pipeline, extra in pipelines.items():
            if pipeline not in args.pipelines.split(",") or (pipeline == "old" and n not in old_n):
                continue
            run_dir = args.work / f"run_{n}_{pipeline}"
            load0 = os.getloadavg()
            status, wall, peak_mb, anon_mb = run_reconstruct(star, run_dir, common + extra)
            result = {"n": n, "pipeline": pipeline, "arguments": common + extra, "exit_status": status,
                      "wall_time_s": wall, "peak_rss_mb": peak_mb, "peak_anonymous_rss_mb": anon_mb,
                      "load_average_start": load0,
                      "load_average_end": os.getloadavg()}
            if status in (0, 4):
                gold = json.loads((run_dir / "gold_standard.json").read_text())
                poses = evaluate_poses(read_particles(run_dir / "poses.star"), read_particles(star))
                result |= {"stages_end_s": stage_times(run_dir / "metrics.jsonl"),
                           "fsc05_px": truth_fsc05_px(run_dir / "volume.mrc", star.parent / "volume.mrc"),
                           "median_error_deg": poses.errors.median_angle_deg,
                           "mean_sq_frobenius": poses.errors.mean_sq_frobenius,
                           "claimed_px": gold["unmasked_resolution_px"], "resolved": gold["resolved"]}
                stages = {k: round(v) for k, v in result["stages_end_s"].items()}
                print(f"N {n:6d}, {pipeline}: {wall / 60:.1f} min, peak RSS {peak_mb:.0f} MB "
                      f"(anonymous {anon_mb:.0f} MB; stages end {stages}), "
                      f"FSC-0.5 {result['fsc05_px']:.2f} px, median error {result['median_error_deg']:.1f}°, "
                      f"claimed {result['claimed_px']:.2f} px",
                      flush=True)
            else:
                print(f"N {n:6d}, {pipeline}: exit status {status} after {wall / 60:.1f} min", flush=True)
            runs.append(result)
            write_result(args.name, resolve_device("cpu"), {"options": vars(args) | {"work": str(args.work)},
                                                            "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
