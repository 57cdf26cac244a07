"""Benchmark: time to resolution of ab initio reconstruction on the demo dataset (issue 4's targets).

Simulates the built-in adenylate-kinase demo (2000 particles, L = 64, 1.5 Å/px, CTF, 3 Å shifts) noise
free and at SNR −10 dB, reconstructs each with a preset for --max-time, and scores every volume
snapshot against the true map in the truth's frame (bench/runs.py): FSC-0.5 in px over wall time
(training, then each projection-matching refinement round when the preset or --refine enables it),
the final map and poses, and training images/s. Writes bench/results/reconstruct_<device>.json.

Targets on the 2-core CPU (issue 4): noise-free ≤ 3.0 px within 20 minutes; −10 dB ≤ 3.5 px.

    python bench/reconstruct.py [--max-time 20m] [--preset cpu] [--snr clean,-10] [--pip] [--decoder D]
                                [--refine|--no-refine]
        [--refine-rounds N] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, time_to_target, train_and_score  # noqa: E402

from cryoace.runtime import resolve_device  # noqa: E402
from cryoace.train.config import parse_duration, preset_config  # noqa: E402

TARGET_PX = {"clean": 3.0, "-10": 3.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="20m")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--snr", default="clean,-10", help="comma list of 'clean' and/or SNR values in dB")
    parser.add_argument("--pip", action="store_true", help="train with ACE-EM's PIP task")
    parser.add_argument("--pip-weight", type=float, help="λ of the PIP loss (default: the preset's)")
    parser.add_argument("--decoder", help="decoder instead of the preset's (voxel decoders train with AdamW)")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="projection-matching refinement after training (default: the preset's)")
    parser.add_argument("--refine-rounds", type=int, help="refinement rounds (default: the preset's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("bench_work/reconstruct"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    results = {}
    for snr in args.snr.split(","):
        data = demo_dataset(args.work / f"data_{snr}", noise_free=snr == "clean")
        if snr != "clean" and float(snr) != -10.0:
            raise SystemExit("the demo simulation is noise-free or −10 dB")
        config = preset_config(args.preset)
        config.max_time_s, config.steps, config.epochs = parse_duration(args.max_time), None, None
        config.device = str(device)
        config.pip.enabled = args.pip
        if args.pip_weight is not None:
            config.pip.weight = args.pip_weight
        if args.refine is not None:
            config.refine.enabled = args.refine
        if args.refine_rounds is not None:
            config.refine.rounds = args.refine_rounds
        if args.decoder:
            config.decoder.name = args.decoder
            if args.decoder.startswith("voxel"):
                config.optim.name = "adamw"
        out = train_and_score(data, data.parent / "volume.mrc", args.work / f"run_{snr}", config,
                              steps_per_s_guess=4.0 if config.decoder.name.startswith("voxel") else 1.0)
        target = TARGET_PX.get(snr)
        out["target_px"] = target
        out["time_to_target_s"] = time_to_target(out["curve"], target)
        results[snr] = out
        print(f"{snr:>6}: final FSC-0.5 {out['final']['fsc05_px']:.2f} px (target {target} px), median "
              f"rotation error {out['final']['rot_median_deg']:.1f}°, coverage {out['final']['coverage']:.2f}, "
              f"{out['images_per_s'] or 0:.0f} images/s, {out['steps']} steps in {out['train_time_s']:.0f} s")
        for c in out["curve"]:
            where = f"step {c['step']:6d}" if c["stage"] == "train" else f"round {c['round']:5d}"
            print(f"        {c['elapsed_s']:7.0f} s  {where}  {c['fsc05_px']:.2f} px  "
                  f"median {c['rot_median_deg']:.1f}°  coverage {c['coverage']:.2f}")
    name = "reconstruct" + (f"_{args.decoder}" if args.decoder else "") + ("_pip" if args.pip else "")
    name += "_norefine" if args.refine is False else ""
    path = write_result(name, device, {"max_time": args.max_time, "preset": args.preset, "runs": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
