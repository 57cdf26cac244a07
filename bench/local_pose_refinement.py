"""Benchmark: which local pose refinement is cheaper for the same accuracy — the grid cascade or
per-particle gradient descent (issue "amortization that pays", item 4; cryoSPIN refines its encoder's
poses by gradient descent, our final pass by a cascade of 3×3×3 rotation cubes × 3×3 shifts).

Takes a finished run (its half map 1, FSC-weighted as the final pass uses it, and its final bands)
and particles of its molecule. For ``--n`` particles: a global + local search gives each one's
reference pose; each reference is turned by ``--perturb-deg`` (median; half-normal) about a random
axis and shifted by 0.5 px (RMS) — a start as an encoder's after its coarse cube — and then refined

* by the cascade of :func:`cryoace.reconstruct.pose_search.local_search` (steps 4°, 2°, 1°, 0.5°,
  shifts ±0.5 px at each), as the final pass does, and
* by Adam on each particle's rotation vector and shift (``--gd-steps`` steps, learning rates 1° and
  0.3 px), the same error — ``Σ w·|Ŷ − C·e^{2πik·t}·V̂(Rᵀk)|²`` in the run's final band.

Recorded: wall time of each, the median angle of its result to the reference, and how often each
fits the image better (lower error). Writes bench/results/<--name>_cpu.json with the CPU load.

    python bench/local_pose_refinement.py RUN_DIR PARTICLES [--n 512] [--perturb-deg 3] [--gd-steps 15]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from cryoace.evaluate.fsc import fsc  # noqa: E402
from cryoace.io.mrc import read_volume  # noqa: E402
from cryoace.physics.ctf import compute_ctf  # noqa: E402
from cryoace.physics.forward import VoxelFourierVolume  # noqa: E402
from cryoace.physics.rotations import axis_angle_to_rotmat, geodesic_angle  # noqa: E402
from cryoace.physics.shift import phase_ramp  # noqa: E402
from cryoace.physics.slicing import central_slice_coords  # noqa: E402
from cryoace.pipeline.refine_stage import stage_settings  # noqa: E402
from cryoace.reconstruct.pose_search import (  # noqa: E402
    global_search,
    local_offsets,
    local_search,
    search_band,
    shift_grid,
    so3_grid,
)
from cryoace.reconstruct.refine import fsc_weighted  # noqa: E402
from cryoace.train.predict import load_run, open_particles  # noqa: E402
from cryoace.types import Pose  # noqa: E402


def band_error(reference, band, images, pixel_size, ctf, rotmat, shift_px) -> torch.Tensor:
    """Each image's error in ``band`` at (rotmat, shift_px): differentiable in both."""
    spectra = band.target(images)
    model = (compute_ctf(ctf, band.freq, pixel_size).to(spectra.real.dtype)
             * phase_ramp(band.freq, shift_px[:, None, :])[:, 0]
             * reference(central_slice_coords(rotmat, band.freq)))
    difference = spectra - model
    return (band.weights * (difference.real ** 2 + difference.imag ** 2)).sum(-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("particles", type=Path)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--perturb-deg", type=float, default=3.0)
    parser.add_argument("--gd-steps", type=int, default=15)
    parser.add_argument("--name", default="local_pose_refinement")
    args = parser.parse_args()
    load0 = os.getloadavg()
    run = load_run(args.run_dir)
    dataset = open_particles(args.particles, run.data)
    settings = stage_settings(run.config)
    size = dataset.image_size
    last = settings.rounds - 1
    local_shells = min(size // 2, settings.start_shells + last * settings.shells_per_round)
    global_shells = min(settings.global_max_shells, settings.global_shells + 2 * last, local_shells)
    gband, lband = search_band(size, global_shells), search_band(size, local_shells)
    halves = [torch.as_tensor(read_volume(args.run_dir / f"volume_half{h}.mrc").data.copy()).float() for h in (1, 2)]
    reference = VoxelFourierVolume.from_real(fsc_weighted(halves[0], fsc(halves[0], halves[1]).curve), pad_factor=2)
    rotations, shifts = so3_grid(settings.global_step_deg), shift_grid(1, 1.0)
    steps = [local_offsets(s) for s in (*settings.local_steps_deg, min(settings.local_steps_deg) / 2)]
    local_shifts = shift_grid(1, 0.5)
    generator = torch.Generator().manual_seed(0)
    totals = {"cascade_s": 0.0, "gradient_s": 0.0}
    angles = {"start": [], "cascade": [], "gradient": []}
    gradient_better = []
    for at in range(0, min(args.n, len(dataset)), 128):
        batch = dataset[np.arange(at, min(at + 128, args.n, len(dataset)))]
        images, pixel_size, ctf = batch.images, batch.pixel_size, batch.ctf
        found = global_search(reference, images, pixel_size, gband, rotations, ctf, shifts_px=shifts).pose
        for offsets in steps:
            found = local_search(reference, images, pixel_size, lband, found, offsets, local_shifts, ctf).pose
        count = len(images)
        turn = (torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=-1)
                * torch.randn(count, 1, generator=generator).abs() * math.radians(args.perturb_deg / 0.6745))
        start = Pose(found.rotmat @ axis_angle_to_rotmat(turn),
                     found.shift_angst + 0.5 * torch.randn(count, 2, generator=generator) * pixel_size[:, None])
        started = time.perf_counter()
        cascade = start
        for offsets in steps:
            result = local_search(reference, images, pixel_size, lband, cascade, offsets, local_shifts, ctf)
            cascade = result.pose
        totals["cascade_s"] += time.perf_counter() - started
        started = time.perf_counter()
        rotvec = torch.zeros(count, 3, requires_grad=True)
        shift_px = (start.shift_angst / pixel_size[:, None]).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([{"params": [rotvec], "lr": math.radians(1.0)}, {"params": [shift_px], "lr": 0.3}])
        for _ in range(args.gd_steps):
            error = band_error(reference, lband, images, pixel_size, ctf, start.rotmat @ axis_angle_to_rotmat(rotvec),
                               shift_px).sum()
            optimizer.zero_grad()
            error.backward()
            optimizer.step()
        with torch.no_grad():
            gradient_rotmat = start.rotmat @ axis_angle_to_rotmat(rotvec)
            gradient_error = band_error(reference, lband, images, pixel_size, ctf, gradient_rotmat, shift_px)
        totals["gradient_s"] += time.perf_counter() - started
        for key, rotmat in (("start", start.rotmat), ("cascade", cascade.rotmat), ("gradient", gradient_rotmat)):
            angles[key].append(torch.rad2deg(geodesic_angle(rotmat.double(), found.rotmat.double())))
        gradient_better.append((gradient_error < result.error).double())
    result = {"run": str(args.run_dir), "particles": str(args.particles), "n": min(args.n, len(dataset)),
              "perturb_deg": args.perturb_deg, "gd_steps": args.gd_steps, "band_shells": local_shells,
              **totals, **{f"median_to_reference_deg_{k}": float(torch.cat(v).median()) for k, v in angles.items()},
              "gradient_fits_better_fraction": float(torch.cat(gradient_better).mean()),
              "load_average_start": load0, "load_average_end": os.getloadavg()}
    path = write_result(args.name, torch.device("cpu"), result)
    print(f"{result['n']} particles from {result['median_to_reference_deg_start']:.1f}° off: cascade "
          f"{totals['cascade_s']:.1f} s → {result['median_to_reference_deg_cascade']:.2f}°, gradient descent "
          f"({args.gd_steps} Adam steps) {totals['gradient_s']:.1f} s → "
          f"{result['median_to_reference_deg_gradient']:.2f}° "
          f"(fits better for {100 * result['gradient_fits_better_fraction']:.0f} %); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
