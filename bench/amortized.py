"""Benchmark: the amortized networks alone (no ab initio, no refinement) from scratch on the demo (issue 14).

Simulates the built-in adenylate-kinase demo (2000 particles, L = 64, 1.5 Å/px, CTF, shifts) noise
free and/or at SNR −10 dB, trains the cpu preset's encoder and decoder with ``--no-ab-initio
--no-refine`` for ``--max-time`` (optionally on images Fourier-cropped to ``--downsample`` px, what a
CPU user should do: a step is about 3× cheaper at L = 32 than at 64), and records against wall time:

* the encoder's median pose error (°) and mean squared Frobenius error after global alignment, and
  the viewing-direction coverage, of the recent training poses (the run's ``poses`` records);
* the FSC-0.5 (px of the run's box, and Å) of the decoder's map snapshots against the true map;

and at the end the same for ``predict-poses`` on every particle and the decoder's final map, plus a
backprojection from the predicted poses (the map those poses allow: issue 14's target is the decoder
within 2× of its FSC-0.5).

``--variants`` picks the runs: ``all`` (every fix of issue 14 on: the preset), ``none`` (every fix
off), ``no-FIX`` for each fix in :data:`FIXES` (that fix alone removed), and ``headsK`` (every fix, and
a K-head encoder, cryoSPIN's winner-takes-all, ``--pose-heads K``); ``ablation`` = all, each no-FIX,
none. ``--set KEY=VALUE`` (repeatable) changes one setting of every run (a dotted :class:`TrainConfig`
path, e.g. ``--set pip.weight=0.3``; the value read as YAML), for trying a candidate setting beside a
run without it; the settings are recorded in the JSON. Writes ``bench/results/<--name>_<device>.json``
(default ``amortized``).

Targets on the 2-core CPU (issue 14, not timed tests): noise-free median ≤ 10° and coverage ≥ 0.8
within 60 minutes; −10 dB median ≤ 15° within 90 minutes.

    python bench/amortized.py [--max-time 60m] [--snr clean,-10] [--downsample 32] [--variants ablation]
        [--seed N] [--set KEY=VALUE ...] [--name amortized] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from runs import demo_dataset, train_and_score  # noqa: E402

from cryoace.runtime import resolve_device  # noqa: E402
from cryoace.train.config import TrainConfig, parse_duration, preset_config  # noqa: E402

#: each fix of issue 14 and the settings that remove it (dotted TrainConfig path, value)
FIXES: dict[str, tuple[tuple[str, object], ...]] = {
    "band": (("band_start_cyc_px", None), ("band_ramp_steps", 0)),  # coarse-to-fine loss band
    "pip": (("pip.enabled", False),),             # ACE-EM's PIP task (weight from the SNR, amplitude warm-up)
    "pip-band": (("pip.band_limited", False),),   # PIP images rendered inside the band and the Nyquist disc
    "head-batchnorm": (("encoder.head_batchnorm", False),),  # rotation head spread over SO(3) at the start
    "joint-batchnorm": (("pip.joint_batchnorm", False),),    # one BatchNorm pass over real and PIP images
    "group-clip": (("optim.clip_per_group", False),),        # gradient clipping per parameter group
    "amplitude": (("decoder.match_amplitude", False),),      # decoder started at the data's radial amplitude
}
# (the cpu preset no longer matches the amplitude — it slowed the take-off, README — so there its
# ``all`` and ``no-amplitude`` runs are the same configuration)


def set_setting(cfg: TrainConfig, dotted: str, value: object) -> None:
    """Set the :class:`TrainConfig` setting at the dotted path ``dotted`` (e.g. ``pip.weight``)."""
    *parents, last = dotted.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part, None)
    if target is None or not hasattr(target, last):
        raise SystemExit(f"unknown setting {dotted!r}")
    setattr(target, last, value)


def parse_settings(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings to {dotted path: value}, each value read as YAML (``0.3``, ``null``, ``true``)."""
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {item!r}")
        settings[key] = yaml.safe_load(text)
    return settings


def remove_fix(cfg: TrainConfig, fix: str) -> None:
    """Undo one fix of :data:`FIXES` in ``cfg``."""
    for dotted, value in FIXES[fix]:
        set_setting(cfg, dotted, value)


def variant_config(name: str, preset: str, max_time_s: float, downsample: int | None, device: str,
                   seed: int | None = None, settings: dict[str, object] | None = None) -> TrainConfig:
    """The networks-alone configuration of variant ``name`` (``all``, ``none`` or ``no-FIX``); ``seed``:
    the run's (the networks' initialization, batches, PIP draws; default the preset's); ``settings``:
    {dotted path: value} applied last (``--set``)."""
    cfg = preset_config(preset)
    if seed is not None:
        cfg.seed = seed
    cfg.max_time_s, cfg.steps, cfg.epochs = max_time_s, None, None
    cfg.refine.enabled = cfg.refine.ab_initio = False  # --no-ab-initio --no-refine: the networks alone
    cfg.data.downsample = downsample
    cfg.device = device
    cfg.tensorboard = False
    if name == "none":
        for fix in FIXES:
            remove_fix(cfg, fix)
    elif name.startswith("no-") and name[3:] in FIXES:
        remove_fix(cfg, name[3:])
    elif name.startswith("heads") and name[5:].isdigit():  # every fix, and a K-head encoder (cryoSPIN)
        cfg.encoder.n_heads = int(name[5:])
    elif name != "all":
        raise SystemExit(f"unknown variant {name!r}: all, none, headsK or no-FIX with FIX in {', '.join(FIXES)}")
    for dotted, value in (settings or {}).items():
        set_setting(cfg, dotted, value)
    cfg.validate()
    return cfg


def backprojection_fsc(star: Path, poses: Path, truth_map: Path, downsample: int | None, work: Path) -> float | None:
    """FSC-0.5 (px) of a backprojection of the particles with the predicted ``poses`` against the truth,
    after the same global alignment as the poses (the map those poses allow)."""
    from runs import resolution_px

    from cryoace.cli.main import main as cli
    from cryoace.evaluate.truth import compare_maps, evaluate_poses
    from cryoace.io.mrc import read_volume
    from cryoace.io.particles import read_particles

    out = work / "backprojection.mrc"
    argv = ["backproject", str(poses), "-o", str(out)] + (["--downsample", str(downsample)] if downsample else [])
    if cli(argv) != 0:
        return None
    alignment = evaluate_poses(read_particles(poses), read_particles(star)).alignment
    vol, truth = read_volume(out), read_volume(truth_map)
    return resolution_px(compare_maps(vol.data, vol.voxel_size, truth.data, truth.voxel_size, alignment))


def _num(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-time", default="60m", help="training time per run")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--snr", default="clean,-10", help="comma list of 'clean' and/or -10")
    parser.add_argument("--downsample", type=int, default=32, help="Fourier-crop the images (0 = keep L = 64)")
    parser.add_argument("--variants", default="ablation",
                        help="comma list of all, none, no-FIX (FIX: " + ", ".join(FIXES) + "), or 'ablation'")
    parser.add_argument("--snapshots", type=int, default=12, help="map/pose snapshots per run")
    parser.add_argument("--steps-per-s", type=float, default=2.0, help="guess of training steps/s (snapshot spacing)")
    parser.add_argument("--name", default="amortized", help="results file bench/results/NAME_<device>.json")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=None,
                        help="the runs' seed (default the preset's); the simulated data stay the same")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="change a setting of every run (dotted TrainConfig path; value as YAML), repeatable")
    parser.add_argument("--work", type=Path, default=Path("bench_work/amortized"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    variants = (["all", *(f"no-{f}" for f in FIXES), "none"] if args.variants == "ablation"
                else args.variants.split(","))
    downsample = args.downsample or None
    max_time_s = parse_duration(args.max_time)
    settings = parse_settings(args.settings)
    wall0 = time.monotonic()
    runs: dict[str, dict] = {}
    for snr in args.snr.split(","):
        if snr != "clean" and float(snr) != -10.0:
            raise SystemExit("the demo simulation is noise-free or −10 dB")
        star = demo_dataset(args.work / f"data_{snr}", noise_free=snr == "clean")
        truth_map = star.parent / "volume.mrc"
        for name in variants:
            cfg = variant_config(name, args.preset, max_time_s, downsample, str(device), args.seed, settings)
            run_dir = args.work / f"run_{snr}_{name}"
            out = train_and_score(star, truth_map, run_dir, cfg, snapshots=args.snapshots,
                                  steps_per_s_guess=args.steps_per_s)
            voxel = 1.5 * 64 / (downsample or 64)
            out["voxel_size_angst"] = voxel
            out["final"]["fsc05_angst"] = out["final"]["fsc05_px"] * voxel
            out["final"]["backprojection_fsc05_px"] = backprojection_fsc(
                star, run_dir / "poses.star", truth_map, downsample, run_dir)
            out["removed_fixes"] = list(FIXES) if name == "none" else ([name[3:]] if name.startswith("no-") else [])
            runs[f"{snr}/{name}"] = out
            f = out["final"]
            print(f"{snr:>6} {name:>18}: {out['steps']} steps in {out['train_time_s']:.0f} s; predicted poses: "
                  f"median {f['rot_median_deg']:.1f}°, mean ‖ΔR‖² {f['rot_mean_sq_frob']:.2f}, coverage "
                  f"{f['coverage']:.2f}; decoder FSC-0.5 {f['fsc05_px']:.1f} px ({f['fsc05_angst']:.1f} Å), "
                  f"backprojection {f['backprojection_fsc05_px'] or float('nan'):.1f} px", flush=True)
            for c in out["curve"]:
                print(f"        {c['elapsed_s']:7.0f} s  step {c['step']:6d}  FSC {c['fsc05_px']:.1f} px  median "
                      f"{_num(c['rot_median_deg'])}°  ‖ΔR‖² {_num(c['rot_mean_sq_frob'], 2)}  "
                      f"coverage {_num(c['coverage'], 2)}")
    path = write_result(args.name, device, {
        "max_time": args.max_time, "preset": args.preset, "downsample": downsample, "variants": variants,
        "seed": args.seed if args.seed is not None else preset_config(args.preset).seed, "settings": settings,
        "fixes": list(FIXES), "total_wall_s": time.monotonic() - wall0,
        "targets": {"clean": {"rot_median_deg": 10.0, "coverage": 0.8, "within_min": 60},
                    "-10": {"rot_median_deg": 15.0, "within_min": 90},
                    "decoder_vs_backprojection_fsc05": "within 2x"},
        "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
