"""Benchmark: time to resolution of ab initio reconstruction on the demo dataset.

Simulates the built-in adenylate-kinase demo (2000 particles, L = 64, 1.5 Å/px, CTF, 3 Å shifts) noise
free and at SNR −10 dB, reconstructs each with a preset for --max-time (the whole job), and scores every
volume snapshot against the true map in the truth's frame (bench/runs.py): FSC-0.5 in px over wall time
(training, then each projection-matching refinement round when the preset or --refine enables it),
the final map and poses, and training images/s. Writes bench/results/reconstruct_<device>.json.

``--pipelines`` runs each dataset once per pipeline, side by side in one run:

* ``old``: every particle in every refinement round (``--refine-subset 0``), no taught encoder;
* ``new``: the rounds on ``--subset`` particles, an encoder taught from their map for ``--teach``,
  then every other particle posed by it and searched locally first (global only where its score is
  poor). At the demo's 2000 particles the default job *is* the old pipeline (its ``--refine-subset``,
  10000, exceeds N); ``new`` forces the amortized path onto the particles beyond ``--subset`` to show
  what it costs in quality within the same budget.
* ``preset``: the preset as it is (the default).

Targets on the 2-core CPU within 20 minutes (issue "amortization that pays"): noise-free FSC-0.5 ≤ 2.2 px,
median pose error ≤ 1°, mean squared Frobenius error ≤ 0.05; −10 dB ≤ 3.0 px and median ≤ 3°.

    python bench/reconstruct.py [--max-time 20m] [--preset cpu] [--snr clean,-10] [--[no-]pip] [--decoder D]
                                [--refine|--no-refine] [--refine-rounds N] [--work DIR]
                                [--pipelines preset|old,new] [--subset 1000] [--teach 3m]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, time_to_target, train_and_score  # noqa: E402

from cryoace.runtime import resolve_device  # noqa: E402
from cryoace.train.config import TrainConfig, parse_duration, preset_config  # noqa: E402

#: (FSC-0.5 px, median pose error °, mean squared Frobenius error or None) to reach within 20 minutes
TARGETS = {"clean": (2.2, 1.0, 0.05), "-10": (3.0, 3.0, None)}
PIPELINES = ("preset", "old", "new")


def bench_config(args: argparse.Namespace, pipeline: str) -> TrainConfig:
    """The preset's config with the options of the command line and ``pipeline``'s refinement settings."""
    config = preset_config(args.preset)
    config.max_time_s, config.steps, config.epochs = parse_duration(args.max_time), None, None
    if args.pip is not None:
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
    if pipeline == "old":
        config.refine.subset, config.refine.teach_time_s = None, None
    elif pipeline == "new":
        config.refine.subset, config.refine.teach_time_s = args.subset, parse_duration(args.teach)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="20m")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--snr", default="clean,-10", help="comma list of 'clean' and/or SNR values in dB")
    parser.add_argument("--pip", action=argparse.BooleanOptionalAction, default=None,
                        help="train with ACE-EM's PIP task (default: the preset's)")
    parser.add_argument("--pip-weight", type=float, help="λ of the PIP loss (default: the preset's)")
    parser.add_argument("--decoder", help="decoder instead of the preset's (voxel decoders train with AdamW)")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="projection-matching refinement after training (default: the preset's)")
    parser.add_argument("--refine-rounds", type=int, help="refinement rounds (default: the preset's)")
    parser.add_argument("--pipelines", default="preset", help=f"comma list of {', '.join(PIPELINES)}")
    parser.add_argument("--subset", type=int, default=1000, help="the new pipeline's --refine-subset")
    parser.add_argument("--teach", default="3m", help="the new pipeline's --teach-encoder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("bench_work/reconstruct"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    pipelines = args.pipelines.split(",")
    if not set(pipelines) <= set(PIPELINES):
        raise SystemExit(f"--pipelines: choose from {', '.join(PIPELINES)}")
    results = {}
    for snr in args.snr.split(","):
        data = demo_dataset(args.work / f"data_{snr}", noise_free=snr == "clean")
        if snr != "clean" and float(snr) != -10.0:
            raise SystemExit("the demo simulation is noise-free or −10 dB")
        for pipeline in pipelines:
            config = bench_config(args, pipeline)
            config.device = str(device)
            # the preset's runs keep their historical names (run_<snr>, key <snr>: rescore_reconstruct.py)
            key = snr if pipeline == "preset" else f"{snr}_{pipeline}"
            run_dir = args.work / f"run_{key}"
            out = train_and_score(data, data.parent / "volume.mrc", run_dir, config,
                                  steps_per_s_guess=4.0 if config.decoder.name.startswith("voxel") else 1.0)
            target_px, target_deg, target_frob = TARGETS["clean" if snr == "clean" else "-10"]
            final = out["final"]
            out |= {"pipeline": pipeline, "run_dir": str(run_dir), "target_px": target_px,
                    "time_to_target_s": time_to_target(out["curve"], target_px),
                    "targets": {"fsc05_px": target_px, "rot_median_deg": target_deg, "rot_mean_sq_frob": target_frob},
                    "met": final["fsc05_px"] <= target_px and final["rot_median_deg"] <= target_deg
                    and (target_frob is None or final["rot_mean_sq_frob"] <= target_frob)}
            results[key] = out
            print(f"{snr:>6} {pipeline:>6}: final FSC-0.5 {final['fsc05_px']:.2f} px (target {target_px} px), "
                  f"median rotation error {final['rot_median_deg']:.1f}° (target {target_deg}°), mean squared "
                  f"Frobenius {final['rot_mean_sq_frob']:.3f}, coverage {final['coverage']:.2f}, "
                  f"{out['wall_time_s'] / 60:.1f} min, {out['images_per_s'] or 0:.0f} images/s, "
                  f"{out['steps']} steps in {out['train_time_s']:.0f} s", flush=True)
            for c in out["curve"]:
                where = f"step {c['step']:6d}" if c["stage"] == "train" else f"round {c['round']:5d}"
                print(f"        {c['elapsed_s']:7.0f} s  {where}  {c['fsc05_px']:.2f} px  "
                      f"median {c['rot_median_deg']:.1f}°  coverage {c['coverage']:.2f}")
    name = "reconstruct" + (f"_{args.decoder}" if args.decoder else "")
    name += {True: "_pip", False: "_nopip", None: ""}[args.pip]
    name += "_norefine" if args.refine is False else ""
    name += "" if pipelines == ["preset"] else "_" + "_".join(pipelines)
    name += "" if args.snr == parser.get_default("snr") else "_" + args.snr.replace(",", "_")
    path = write_result(name, device, {"max_time": args.max_time, "preset": args.preset,
                                       "pipelines": pipelines, "subset": args.subset, "teach": args.teach,
                                       "runs": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
