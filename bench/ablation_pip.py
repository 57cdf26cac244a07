"""Benchmark: ACE-EM's PIP ablation — the same dataset and budget with and without the pose-image-pose
task, with FourierNet and with a voxel decoder (issue 5).

Each configuration trains on the demo dataset (ADK, 2000 particles, L = 64; −10 dB by default) for
--max-time and is scored against the truth (bench/runs.py): FSC-0.5 resolution (px), mean and median
rotation error (squared Frobenius and degrees) and viewing-direction coverage, plus the curves over
time. Writes bench/results/ablation_pip_<device>.json and prints a table. The paper's expected
direction: PIP raises coverage and cuts the mean rotation error on noisy data.

    python bench/ablation_pip.py [--max-time 5m | --steps N] [--snr -10|clean] [--decoders fouriernet,voxel-fourier]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, train_and_score  # noqa: E402

from cryoace.runtime import resolve_device  # noqa: E402
from cryoace.train.config import parse_duration, preset_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="5m")
    parser.add_argument("--steps", type=int, help="the same number of steps for every run instead of a time budget")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--snr", default="-10", choices=("-10", "clean"))
    parser.add_argument("--decoders", default="fouriernet,voxel-fourier")
    parser.add_argument("--pip-weight", type=float, default=0.1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("bench_work/ablation_pip"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = demo_dataset(args.work / f"data_{args.snr}", noise_free=args.snr == "clean")
    rows = []
    for decoder in args.decoders.split(","):
        for pip in (False, True):
            config = preset_config(args.preset)
            config.max_time_s, config.steps, config.epochs = parse_duration(args.max_time), args.steps, None
            if args.steps:
                config.max_time_s = None
            config.device = str(device)
            config.decoder.name = decoder
            if decoder.startswith("voxel"):  # ACE-EM's voxel setting: AdamW, grid lr 1.0 (class default)
                config.optim.name = "adamw"
            config.pip.enabled, config.pip.weight = pip, args.pip_weight
            name = f"{decoder}{'+pip' if pip else ''}"
            out = train_and_score(data, data.parent / "volume.mrc", args.work / f"run_{name}", config,
                                  steps_per_s_guess=4.0 if decoder.startswith("voxel") else 1.0)
            out["name"] = name
            rows.append(out)
            f = out["final"]
            print(f"{name:22s} FSC-0.5 {f['fsc05_px']:5.2f} px  rot mean {f['rot_mean_sq_frob']:.3g} "
                  f"median {f['rot_median_sq_frob']:.3g} (‖·‖²_F), median {f['rot_median_deg']:.1f}°  "
                  f"coverage {f['coverage']:.2f}  {out['steps']} steps", flush=True)
    path = write_result("ablation_pip", device, {"max_time": None if args.steps else args.max_time,
                                                 "steps": args.steps, "snr": args.snr,
                                                 "preset": args.preset, "runs": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
