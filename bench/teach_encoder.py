"""Benchmark: how well an encoder taught from a run's map predicts poses, against its time budget
(issue "amortization that pays": poses in one forward pass, learned at a cost that does not grow with N).

Takes a finished run (its refined map and poses.star) on simulated particles with known poses. The
encoder is taught from the run's map (:func:`cryoace.train.teach.teach_encoder`); every
``--check-every`` steps its poses of 400 particles are compared with the run's refined poses (same
frame: no alignment), and at the end with the true poses after global alignment, on particles held
out of the draws that lent their CTFs and, with ``--image-weight``, of the image loss's particles.
Writes bench/results/teach_encoder_<device>.json with the CPU load seen.

    python bench/teach_encoder.py RUN_DIR DATA_DIR [--map MAP] [--minutes 10] [--image-size 32] [--image-weight 0]
        [--name teach_encoder]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from cryoace.evaluate.align import align_rotations  # noqa: E402
from cryoace.io.mrc import read_volume  # noqa: E402
from cryoace.io.particles import ParticleDataset, read_particles  # noqa: E402
from cryoace.physics.rotations import geodesic_angle  # noqa: E402
from cryoace.runtime import resolve_device  # noqa: E402
from cryoace.train.teach import TeachSettings, pose_agreement, teach_encoder  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("data_dir", type=Path, help="the simulated particles (particles.star with true poses)")
    parser.add_argument("--map", type=Path, default=None,
                        help="teach from this map instead of RUN_DIR/volume.mrc (e.g. RUN_DIR/volume_abinitio.mrc, "
                        "which the refinement started from: the same frame)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--image-weight", type=float, default=0.0,
                        help="weight of cryoAI's image loss on the training particles (0 = PIP only)")
    parser.add_argument("--name", default="teach_encoder")
    args = parser.parse_args()

    truth = read_particles(args.data_dir / "particles.star")
    dataset = ParticleDataset(truth, normalize=True)
    refined = read_particles(args.run_dir / "poses.star")  # same rows and order as the particle file
    map_path = args.map or args.run_dir / "volume.mrc"
    volume = torch.tensor(read_volume(map_path).data, dtype=torch.float32)
    rng = np.random.default_rng(0)
    held_out = np.sort(rng.choice(len(dataset), min(400, len(dataset) // 4), replace=False))
    train_rows = np.setdiff1d(np.arange(len(dataset)), held_out)
    settings = TeachSettings(steps=args.steps, max_time_s=args.minutes * 60, image_size=args.image_size,
                             width=args.width, check_every=args.check_every, image_weight=args.image_weight)
    load0 = os.getloadavg()

    def show(record) -> None:
        print(f"{record.elapsed_s:6.0f} s  step {record.step:5d}  loss ‖ΔR‖² {record.rotation_loss:.3f}, shift "
              f"{record.shift_loss_px2:.2f} px²  |  vs refined poses: median {record.median_deg:.1f}°, "
              f"{100 * record.within_15deg:.0f} % within 15°", flush=True)

    taught = teach_encoder(volume, dataset, settings, rows=train_rows,
                           shifts_angst=refined.pose.shift_angst[train_rows],
                           check=(held_out, refined.pose.rotmat[held_out]), progress=False, on_record=show)
    predicted = taught.predict(dataset[held_out].images).rotmat
    true_rot = truth.pose.rotmat[held_out].double()
    alignment = align_rotations(predicted, true_rot)
    angle = torch.rad2deg(geodesic_angle(alignment.aligned, true_rot))
    refined_median, refined_within = pose_agreement(predicted, refined.pose.rotmat[held_out])
    result = {
        "run_dir": str(args.run_dir), "data_dir": str(args.data_dir), "map": str(map_path), "settings": vars(settings),
        "load_average_start": load0, "load_average_end": os.getloadavg(), "particles_held_out": len(held_out),
        "steps": taught.history[-1].step if taught.history else 0,
        "history": [vars(r) for r in taught.history],
        "vs_refined": {"median_deg": refined_median, "within_15deg": refined_within},
        "vs_truth": {"median_deg": float(angle.median()), "within_15deg": float((angle <= 15).double().mean()),
                     "within_30deg": float((angle <= 30).double().mean()),
                     "quantiles_deg": {str(q): float(angle.quantile(q)) for q in (0.25, 0.5, 0.75, 0.9)},
                     "mean_sq_frobenius": alignment.mean_sq_frobenius, "hand": alignment.hand},
    }
    path = write_result(args.name, resolve_device("cpu"), result)
    print(f"held-out particles: median error {result['vs_truth']['median_deg']:.1f}° against the truth "
          f"({100 * result['vs_truth']['within_15deg']:.0f} % within 15°), {refined_median:.1f}° against the "
          f"refined poses; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
