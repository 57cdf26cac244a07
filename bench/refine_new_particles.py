"""Benchmark: amortized on new particles (issue "amortization that pays", item 8) — ``cryoace refine``.

Takes a finished run with a taught encoder (``reconstruct --teach-encoder``, or ``--teach MINUTES`` here
to teach one into a copy of the run) and simulated particles of the same molecule that were not in
the run (another seed: ``--new-data``, made with ``cryoace simulate`` when missing). Measures, against
the truth:

* the encoder's poses of the new particles (``cryoace predict-poses``, one forward pass each): median
  error and fraction within 15° after global alignment (issue 15's targets: ≤ 10° noise-free,
  ≤ 15° at −10 dB);
* ``cryoace refine RUN new.star``: the refined poses' errors, the wall time, and its map's FSC-0.5
  against the true map beside the run's own map's (target: within 0.5 px), and the claimed
  gold-standard resolution — side by side with local search first (the default: the global search
  only where the pose score falls short) and ``--no-local-first`` (every particle searched globally
  as well, the search before), on the same particles and encoder; with ``--false-accept F1,F2,...`` the
  local-first search once per tolerated false-accept rate (``refine --false-accept``: the tail of wrong
  poses against the time of more global searches).

Writes bench/results/<--name>_<device>.json with the CPU load seen.

    python bench/refine_new_particles.py RUN_DIR --new-data DIR [--n 1000] [--seed 11] [--snr-db -10]
        [--teach 10] [--false-accept 0.05,0.02] [--no-global] [--work DIR] [--name refine_new_particles]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import truth_fsc05_px  # noqa: E402

from cryoace.cli.main import main as cli  # noqa: E402
from cryoace.evaluate.truth import evaluate_poses  # noqa: E402
from cryoace.io.particles import read_particles  # noqa: E402


def teach_into(run: Path, source: Path, minutes: float) -> dict:
    """Teach an encoder from the final map of ``source`` (a run) as ``reconstruct --teach-encoder``
    does (its particles, normalization and refined shifts) and save it as ``run``'s (a copy of it)
    taught encoder."""
    from cryoace.io.atomic import atomic_path
    from cryoace.io.mrc import read_volume
    from cryoace.pipeline.refine_stage import TAUGHT_ENCODER
    from cryoace.train.predict import load_run, open_particles
    from cryoace.train.teach import TeachSettings, teach_encoder

    trained = load_run(source)
    config_particles = read_particles(source / "poses.star")  # (its stacks are named relative to it)
    dataset = open_particles(source / "poses.star", trained.data, table=config_particles)
    volume = torch.as_tensor(read_volume(source / "volume.mrc").data.copy())
    started = time.monotonic()
    taught = teach_encoder(volume, dataset, TeachSettings(steps=10 ** 9, max_time_s=minutes * 60, seed=0),
                           shifts_angst=config_particles.pose.shift_angst, use_ctf=trained.data.use_ctf,
                           progress=False)
    with atomic_path(run / TAUGHT_ENCODER) as tmp, open(tmp, "wb") as fh:
        torch.save(taught.state(), fh)
    return {"minutes": minutes, "steps": taught.history[-1].step if taught.history else None,
            "wall_s": time.monotonic() - started}


def pose_errors(predicted: Path, truth: Path) -> dict:
    from cryoace.physics.rotations import geodesic_angle

    evaluation = evaluate_poses(read_particles(predicted), read_particles(truth))
    alignment = evaluation.alignment
    angle = torch.rad2deg(geodesic_angle(alignment.aligned, alignment.reference))
    return {"median_deg": float(evaluation.errors.median_angle_deg),
            "within_15deg": float((angle <= 15.0).double().mean()),
            "mean_sq_frobenius": float(evaluation.errors.mean_sq_frobenius)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--new-data", type=Path, required=True, help="new particles (simulated here if missing)")
    parser.add_argument("--truth-map", type=Path, default=None, help="default NEW_DATA/volume.mrc")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--snr-db", type=float, default=-10.0)
    parser.add_argument("--teach", type=float, default=None, help="teach an encoder for this many minutes first")
    parser.add_argument("--false-accept", default="", help="comma-separated rates for refine --false-accept "
                        "(default: the run's alone)")
    parser.add_argument("--no-global", action="store_true", help="skip the --no-local-first comparison")
    parser.add_argument("--work", type=Path, default=Path("bench_work/refine_new_particles"))
    parser.add_argument("--name", default="refine_new_particles")
    args = parser.parse_args()

    load0 = os.getloadavg()
    star = args.new_data / "particles.star"
    if not star.is_file():
        if cli(["simulate", "--preset", "demo", "-o", str(args.new_data), "-n", str(args.n), "--seed", str(args.seed),
                "--snr-db", str(args.snr_db), "--quiet"]) != 0:
            return 1
    truth_map = args.truth_map or args.new_data / "volume.mrc"
    run = args.work / "run"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(args.run_dir, run)
    teach = teach_into(run, args.run_dir, args.teach) if args.teach else None
    encoder_star = args.work / "encoder_new.star"
    started = time.monotonic()
    if cli(["predict-poses", str(run), str(star), "-o", str(encoder_star), "--quiet"]) != 0:
        return 1
    predict_s = time.monotonic() - started
    run_map_px = truth_fsc05_px(args.run_dir / "volume.mrc", truth_map)

    def refined(name: str, *flags: str) -> dict:
        out = args.work / name
        if out.exists():
            shutil.rmtree(out)
        started = time.monotonic()
        status = cli(["refine", str(run), str(star), "-o", str(out), "--quiet", *flags])
        wall_s = time.monotonic() - started
        gold = json.loads((out / "gold_standard.json").read_text())
        search = json.loads((out / "search.json").read_text())
        fsc05 = truth_fsc05_px(out / "volume.mrc", truth_map)
        return {**pose_errors(out / "poses.star", star), "wall_s": wall_s, "search_s": search["search_s"],
                "exit_status": status, "fsc05_vs_truth_px": fsc05, "map_difference_px": fsc05 - run_map_px,
                "claimed_px": gold.get("resolution_px"), "resolved": gold.get("resolved"),
                "local_first": search["local_first"]}

    # side by side, same particles and encoder: local search first (the default), and every particle
    # searched globally as well (--no-local-first: the pipeline before)
    rates = [float(f) for f in args.false_accept.split(",") if f]
    by_rate = {f"{f:g}": refined(f"refined_new_fa{f:g}", "--false-accept", f"{f:g}") for f in rates}
    result = {
        "run": str(args.run_dir), "new_data": str(args.new_data), "particles": len(read_particles(star)),
        "teach": teach, "load_average_start": load0,
        "encoder": {**pose_errors(encoder_star, star), "wall_s": predict_s},
        "refine": next(iter(by_rate.values())) if by_rate else refined("refined_new"),
        "refine_by_false_accept": by_rate,
        "refine_global": None if args.no_global else refined("refined_new_global", "--no-local-first"),
        "run_map_fsc05_vs_truth_px": run_map_px,
        "targets": {"encoder_median_deg": {"noise_free": 10.0, "-10dB": 15.0}, "map_within_px": 0.5},
        "load_average_end": os.getloadavg(),
    }
    path = write_result(args.name, torch.device("cpu"), result)
    e = result["encoder"]
    print(f"encoder on {result['particles']} new particles: median {e['median_deg']:.1f}° "
          f"({100 * e['within_15deg']:.0f} % within 15°) in {predict_s:.0f} s")
    shown = [(f"refine --false-accept {f}", r) for f, r in by_rate.items()] or [("refine (local first)",
                                                                               result["refine"])]
    if result["refine_global"] is not None:
        shown.append(("refine --no-local-first", result["refine_global"]))
    for label, r in shown:
        plan = r["local_first"]
        kept = "" if not plan or plan["threshold"] is None else (
            f", {plan['particles'] - plan['fell_back']} of {plan['particles']} kept from the local search")
        print(f"{label}: median {r['median_deg']:.2f}°, {100 * (1 - r['within_15deg']):.1f} % beyond 15°, "
              f"mean sq. Frobenius {r['mean_sq_frobenius']:.3f}, map FSC-0.5 "
              f"{r['fsc05_vs_truth_px']:.2f} px vs the run's {run_map_px:.2f} px, claimed {r['claimed_px']:.2f} px, "
              f"search {r['search_s']:.0f} s{kept}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
