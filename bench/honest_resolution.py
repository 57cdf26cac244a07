"""Benchmark: does the reported resolution tell the truth? (issue "a resolution that never lies")

Runs the default ``cryoace reconstruct`` (cpu preset, with the budgets given here) on

* ``signal``: the demo simulation (adenylate kinase, 2000 particles, L = 64, 1.5 Å/px, SNR −10 dB,
  CTF, shifts), and
* ``noise``: the same star file (same CTF parameters, pixel size and names) whose stack holds pure
  Gaussian noise,

and, through the API, ``wrong_start``: a refinement of the signal set from another molecule's map
(the spike, tests/data), which converges to a wrong map that both halves reproduce; the
posterior-predictive check must withhold its resolution. For every refinement round and at the
end, it compares the gold-standard half-map FSC-0.143 the run reports (unmasked, and masked with
the phase-randomization correction) with the FSC-0.5 of its
map against the true map (aligned, both hands; the truth of the signal set). For the noise set there
is no truth: the run must say NOT RESOLVED and exit with status 4, and its half maps must not agree
at better than 10 px. Writes bench/results/honest_resolution_<device>.json with the CPU load seen.

    python bench/honest_resolution.py [--max-time 20m] [--refine-rounds 10] [--work DIR]
                                      [--sets signal,noise,wrong_start]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, truth_fsc05_px  # noqa: E402

from cryoace.cli.main import main as cli  # noqa: E402
from cryoace.evaluate.plots import read_metrics  # noqa: E402
from cryoace.io.mrc import open_mrc, read_volume, write_mrc  # noqa: E402
from cryoace.io.particles import read_particles  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402


def noise_dataset(signal_star: Path, directory: Path, seed: int = 0) -> Path:
    """``signal_star`` with every image replaced by Gaussian noise (same file names, same CTFs)."""
    star = directory / "particles.star"
    if star.is_file():
        return star
    directory.mkdir(parents=True, exist_ok=True)
    table = read_particles(signal_star)
    rng = np.random.default_rng(seed)
    for stack in map(Path, table.stack_paths):
        shape = open_mrc(stack, mmap=True).data.shape  # (count, L, L)
        write_mrc(directory / stack.name, rng.standard_normal(shape).astype(np.float32),
                  float(np.asarray(table.pixel_size).ravel()[0]))
    shutil.copy(signal_star, star)  # last: a star file here means the dataset is complete
    return star


def run_one(name: str, star: Path, truth: Path | None, run_dir: Path, max_time: str, rounds: int) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    load0, wall0 = os.getloadavg(), time.monotonic()
    status = cli(["reconstruct", str(star), "-o", str(run_dir), "--quiet", "--device", "cpu",
                  "--max-time", max_time, "--refine-rounds", str(rounds)])
    wall = time.monotonic() - wall0
    gold = json.loads((run_dir / "gold_standard.json").read_text())
    out = {"exit_status": status, "wall_time_s": wall, "load_average_start": load0, "load_average_end": os.getloadavg(),
           "resolved": gold["resolved"], "reasons": gold["reasons"],
           "reported_masked_px": gold["masked_resolution_px"], "reported_unmasked_px": gold["unmasked_resolution_px"],
           "start_resolution_px": gold["start_resolution_px"], "confidence_median": gold["confidence_median"],
           "predictive_check": gold.get("predictive_check"), "start_agreement_px": gold.get("start_agreement_px"),
           "start_agreement_limit_px": gold.get("start_agreement_limit_px"), "rounds": []}
    for record in read_metrics(run_dir / "metrics.jsonl", kind="refine"):
        point = {"round": record["round"], "half_fsc0143_px": record["half_fsc0143_px"],
                 "confidence_median": record.get("confidence_median"), "elapsed_s": record["elapsed_s"],
                 "rot_median_deg": record.get("rot_median_deg")}
        if truth is not None:
            point["truth_fsc05_px"] = truth_fsc05_px(run_dir / f"volume_refine_{record['round']:02d}.mrc", truth)
            point["ratio"] = point["truth_fsc05_px"] / point["half_fsc0143_px"]
        out["rounds"].append(point)
    if truth is not None:
        out["truth_fsc05_px"] = truth_fsc05_px(run_dir / "volume.mrc", truth)
        out["ratio_masked"] = out["truth_fsc05_px"] / out["reported_masked_px"]
        out["ratio_unmasked"] = out["truth_fsc05_px"] / out["reported_unmasked_px"]
    print(f"{name}: exit {status}, {'resolved' if gold['resolved'] else 'NOT RESOLVED'}, reported "
          f"{gold['unmasked_resolution_px']:.2f} px unmasked (claimed) / {gold['masked_resolution_px']:.2f} px masked"
          + (f", truth FSC-0.5 {out['truth_fsc05_px']:.2f} px" if truth is not None else "")
          + f", {wall:.0f} s", flush=True)
    for point in out["rounds"]:
        print(f"    round {point['round']}: half maps {point['half_fsc0143_px']:.2f} px"
              + (f", truth {point['truth_fsc05_px']:.2f} px (×{point['ratio']:.2f})" if truth is not None else "")
              + f", median confidence {point['confidence_median']:.2f}", flush=True)
    return out


def run_wrong_start(star: Path, truth: Path, rounds: int) -> dict:
    """Refine the particles of ``star`` from the spike's map (scaled to the truth's std) and judge it."""
    import torch

    from cryoace.evaluate.gold_standard import assess
    from cryoace.io.particles import ParticleDataset
    from cryoace.reconstruct.refine import RefineSettings, refine

    dataset = ParticleDataset(read_particles(star), normalize=True)
    reference = read_volume(truth)
    spike = torch.tensor(read_volume(Path(__file__).resolve().parents[1] / "tests/data/volumes/spike_6vyb_L64_3.0A.mrc")
                         .data, dtype=torch.float32)
    wrong = spike * float(np.std(reference.data) / spike.std())
    load0, wall0 = os.getloadavg(), time.monotonic()
    result = refine(dataset, wrong, RefineSettings(rounds=rounds), progress=False)
    pixel_size = float(dataset.pixel_size)
    gold = assess(result.half_volumes[0], result.half_volumes[1], result.start_resolution_px, pixel_size,
                  result.confidence, check=result.check)
    truth_px = truth_fsc05_px(result.volume.numpy(), truth, pixel_size)
    out = {"wall_time_s": time.monotonic() - wall0, "load_average_start": load0, "load_average_end": os.getloadavg(),
           "resolved": gold.resolved, "reasons": gold.reasons, "reported_masked_px": gold.resolution(masked=True).px,
           "reported_unmasked_px": gold.resolution(masked=False).px, "truth_fsc05_px": truth_px,
           "predictive_check": result.check.to_dict(), "confidence_median": gold.confidence_median,
           "rounds": [{"round": r.round, "half_fsc0143_px": r.half_map_fsc.resolution(0.143).px,
                       "pose_change_median_deg": r.pose_change_median_deg} for r in result.rounds]}
    print(f"wrong_start: {'resolved' if gold.resolved else 'NOT RESOLVED'}, half maps {out['reported_unmasked_px']:.2f}"
          f" px unmasked, truth FSC-0.5 {truth_px:.2f} px, pose confidence {result.check.observed:.2f} vs "
          f"{result.check.expected:.2f} for the map's own projections", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="20m", help="each run's whole-job budget (the cpu preset's: 20m)")
    parser.add_argument("--refine-rounds", type=int, default=10)
    parser.add_argument("--sets", default="signal,noise,wrong_start")
    parser.add_argument("--work", type=Path, default=Path("bench_work/honest_resolution"))
    args = parser.parse_args()
    signal = demo_dataset(args.work / "data_-10", noise_free=False)
    results = {}
    for name in args.sets.split(","):
        if name == "wrong_start":
            results[name] = run_wrong_start(signal, signal.parent / "volume.mrc", args.refine_rounds)
            continue
        star = signal if name == "signal" else noise_dataset(signal, args.work / "data_noise")
        truth = signal.parent / "volume.mrc" if name == "signal" else None
        results[name] = run_one(name, star, truth, args.work / f"run_{name}", args.max_time, args.refine_rounds)
    path = write_result("honest_resolution", resolve_device("cpu"),
                        {"max_time": args.max_time, "refine_rounds": args.refine_rounds, "runs": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
