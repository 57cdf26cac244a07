"""Benchmark: do the half sets' independent ab initio maps agree when right, and disagree when wrong?

For ``--ab-initio-halves`` (:func:`cryoace.reconstruct.ab_initio.ab_initio_half_sets`) the run claims a
resolution only when the two half sets' own ab initio maps agree (FSC 0.5 after alignment) within
``MAX_START_DISAGREEMENT`` × the ab initio's band limit. This runs ``--starts`` ab initio runs on each
half set of simulated data sets (e.g. the cases of bench/abinitio_panel.py) and reports, for every
map, its FSC-0.5 against the truth and search error on its half, and for every pair (one map of each
half) their agreement — so that the limit can be judged against maps known to be right or wrong.

    python bench/abinitio_halves.py DATA_DIR [DATA_DIR ...] [--starts 2] [--name abinitio_halves]

Each ``DATA_DIR`` holds ``particles.star`` and ``volume.mrc`` (the truth). Writes
bench/results/<NAME>_cpu.json with the CPU load seen.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result
from runs import truth_fsc05_px

from cryoace.evaluate.gold_standard import MAX_START_DISAGREEMENT
from cryoace.evaluate.map_align import half_map_fsc
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.reconstruct.ab_initio import AbInitioSettings, ab_initio_starts


def measure(data: Path, starts: int, seed: int) -> dict:
    load0, wall0 = os.getloadavg(), time.monotonic()
    dataset = ParticleDataset(read_particles(data / "particles.star"), normalize=True)
    n = len(dataset)
    perm = np.random.default_rng(seed).permutation(n)
    halves = [np.sort(perm[: (n + 1) // 2]), np.sort(perm[(n + 1) // 2:])]
    maps, errors, truth = [], [], []
    for h, rows in enumerate(halves):
        built = ab_initio_starts(dataset, [AbInitioSettings(seed=seed + k + 1000 * h) for k in range(starts)], rows,
                                 progress=False)
        maps.append(built[0])
        errors.append(built[1])
        truth.append([truth_fsc05_px(m.numpy(), data / "volume.mrc", float(dataset.pixel_size)) for m in built[0]])
    agreement = [[half_map_fsc(a, b, float(dataset.pixel_size)).fsc.resolution(0.5).px for b in maps[1]]
                 for a in maps[0]]
    kept = [int(np.argmin(e)) for e in errors]
    band_px = int(dataset.image_size) / AbInitioSettings().end_shells
    return {"data": str(data), "particles": n, "wall_time_s": time.monotonic() - wall0, "load_average_start": load0,
            "load_average_end": os.getloadavg(), "band_px": band_px,
            "limit_px": MAX_START_DISAGREEMENT * band_px, "search_errors": errors, "truth_fsc05_px": truth,
            "agreement_px": agreement, "kept": kept, "kept_agreement_px": agreement[kept[0]][kept[1]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="abinitio_halves")
    args = parser.parse_args()
    cases = []
    for data in args.data:
        case = measure(data, args.starts, args.seed)
        cases.append(case)
        print(f"{data.name}: maps vs truth {case['truth_fsc05_px']} px; pairs agree "
              f"{np.round(case['agreement_px'], 2).tolist()} px (limit {case['limit_px']:.2f}); kept {case['kept']} "
              f"→ {case['kept_agreement_px']:.2f} px ({case['wall_time_s'] / 60:.1f} min)", flush=True)
        path = write_result(args.name, torch.device("cpu"), {"starts": args.starts, "cases": cases})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
