"""Benchmark: the order in which the local pose search samples the reference's Fourier volume
(issue "amortization that pays": the final pass's cost per particle is mostly this interpolation).

A local search renders Q = 27 rotations close to each particle's pose at the K frequencies of its band.
Sampled rotation-major (B, Q, K) the trilinear interpolation sweeps a whole slice before the next
rotation; frequency-major (B, K, Q) — what :func:`cryoace.reconstruct.pose_search.local_search` does —
the Q nearby samples of one frequency come one after another and read the same voxels. Both orders are
timed side by side, interleaved, on the padded (2L)³ transform of the demo molecule (L = 64); the samples are
checked to be identical. Writes bench/results/slice_layout_<device>.json with the CPU load seen.

    python bench/slice_layout.py [--batch 256] [--shells 12,20,28] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from cryoace.io.mrc import read_volume  # noqa: E402
from cryoace.physics.band import HalfDiscGrid  # noqa: E402
from cryoace.physics.forward import VoxelFourierVolume  # noqa: E402
from cryoace.physics.rotations import random_rotmat  # noqa: E402
from cryoace.physics.slicing import central_slice_coords  # noqa: E402
from cryoace.reconstruct.pose_search import local_offsets  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--shells", default="12,20,28", help="band radii (Fourier shells of L = 64)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="slice_layout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = read_volume(Path(__file__).resolve().parents[1] / "tests/data/volumes/adk_open_4ake_L64_1.5A.mrc")
    size = demo.data.shape[-1]
    volume = VoxelFourierVolume.from_real(torch.tensor(demo.data, dtype=torch.float32), pad_factor=2)
    rotmat = random_rotmat(args.batch, generator=torch.Generator().manual_seed(0))
    trial = rotmat[:, None] @ local_offsets(2.0)[None]  # (B, 27, 3, 3)
    load_start = os.getloadavg()
    rows = []
    for shells in (int(s) for s in args.shells.split(",")):
        band = HalfDiscGrid(size, radius_cyc_px=shells / size)
        coords = central_slice_coords(trial, band.freq)  # (B, Q, K, 3)
        times = {"rotation_major": [], "frequency_major": []}
        for _ in range(args.repeats):
            began = time.perf_counter()
            by_rotation = volume(coords)
            times["rotation_major"].append(time.perf_counter() - began)
            began = time.perf_counter()
            by_frequency = volume(coords.transpose(1, 2))
            times["frequency_major"].append(time.perf_counter() - began)
        if not torch.equal(by_rotation, by_frequency.transpose(1, 2)):
            raise SystemExit("the two orders gave different samples")
        row = {"shells": shells, "points": int(coords[..., 0].numel()),
               **{f"{k}_s": {"min": min(v), "median": sorted(v)[len(v) // 2]} for k, v in times.items()}}
        row["speedup_median"] = row["rotation_major_s"]["median"] / row["frequency_major_s"]["median"]
        rows.append(row)
        print(f"{shells:3d} shells, {row['points']:>9,d} samples: rotation-major "
              f"{row['rotation_major_s']['median']:.3f} s, frequency-major {row['frequency_major_s']['median']:.3f} s "
              f"(median of {args.repeats}; x{row['speedup_median']:.2f})")
    path = write_result(args.name, torch.device("cpu"), {
        "batch": args.batch, "rotations": int(trial.shape[1]), "threads": args.threads, "repeats": args.repeats,
        "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()), "runs": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
