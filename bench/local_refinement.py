"""Benchmark: refinement rounds with and without local-only searches for confident particles.

The refinement's rounds search every particle over SO(3) and then locally in the whole band; once the
poses are found, most particles' global search only confirms their pose. With
``RefineSettings.local_confidence`` (0.9, the default), a particle whose last global search singled
out its pose is searched only locally around it (the unresolved ones and the last round stay global).
This runs both, side by side in one process, on the same particles from the same start map — a
simulated set's own ab initio map, or the true map low-passed as the refinement does — and reports
per round the wall time, the fraction searched globally, the half maps' FSC-0.143, and at the end the
FSC-0.5 against the truth and the median pose error after global alignment.

    python bench/local_refinement.py DATA_DIR [--start volume_abinitio.mrc] [--rounds 6] [--name NAME]

``DATA_DIR`` holds ``particles.star`` and ``volume.mrc`` (the truth), e.g. a case of
bench/abinitio_panel.py. Writes bench/results/<NAME>_cpu.json with the CPU load seen.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from common import write_result
from runs import truth_fsc05_px

from cryoace.evaluate.align import align_rotations
from cryoace.io.mrc import read_volume
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.physics.rotations import geodesic_angle
from cryoace.reconstruct.refine import RefineSettings, refine


def run(dataset, start: torch.Tensor, truth: Path, rounds: int, local_confidence: float | None) -> dict:
    load0, wall0 = os.getloadavg(), time.monotonic()
    settings = RefineSettings(rounds=rounds, local_confidence=local_confidence, check_particles=0)
    result = refine(dataset, start, settings, progress=False)
    wall = time.monotonic() - wall0
    truth_rotmat = dataset.table.pose.rotmat.double()
    aligned = align_rotations(result.pose.rotmat.double(), truth_rotmat).aligned
    angles = torch.rad2deg(geodesic_angle(aligned, truth_rotmat))
    previous = 0.0
    per_round = []
    for record in result.rounds:
        per_round.append({"round": record.round, "seconds": record.elapsed_s - previous,
                          "global_fraction": record.global_fraction,
                          "half_fsc0143_px": record.half_map_fsc.resolution(0.143).px})
        previous = record.elapsed_s
    return {"local_confidence": local_confidence, "wall_time_s": wall, "load_average_start": load0,
            "load_average_end": os.getloadavg(), "rounds": per_round,
            "truth_fsc05_px": truth_fsc05_px(result.volume.numpy(), truth, float(dataset.pixel_size)),
            "median_error_deg": float(angles.median()),
            "mean_sq_frobenius": float(((aligned - truth_rotmat) ** 2).sum((-2, -1)).mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--start", type=Path, default=None, help="start map (default: the truth, low-passed by "
                        "the refinement's gold-standard start)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--name", default="local_refinement")
    args = parser.parse_args()
    truth = args.data / "volume.mrc"
    dataset = ParticleDataset(read_particles(args.data / "particles.star"), normalize=True)
    if args.start is None:  # the truth in the images' units: scaled to the dataset's own reconstruction scale
        start = torch.as_tensor(read_volume(truth).data.copy())
        start = start / start.std() * 0.01
    else:
        start = torch.as_tensor(read_volume(args.start).data.copy())
    results = []
    for local_confidence in (None, RefineSettings().local_confidence):
        results.append(run(dataset, start, truth, args.rounds, local_confidence))
        r = results[-1]
        print(f"local_confidence {local_confidence}: {r['wall_time_s']:.0f} s, rounds "
              + ", ".join(f"{x['seconds']:.0f} s ({100 * x['global_fraction']:.0f} % global)" for x in r["rounds"])
              + f"; FSC-0.5 vs truth {r['truth_fsc05_px']:.2f} px, median error {r['median_error_deg']:.2f}°",
              flush=True)
    path = write_result(args.name, torch.device("cpu"),
                        {"data": str(args.data), "start": str(args.start), "particles": len(dataset),
                         "results": results, "speedup": results[0]["wall_time_s"] / results[1]["wall_time_s"]})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
