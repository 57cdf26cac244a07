"""Shared by the reconstruction benchmarks: simulate the demo dataset, train, and score every volume
snapshot of a run against the truth (time-to-resolution curves).

Scoring a snapshot: the run's ``poses`` records (written every ``eval_every`` steps, with
``eval_every = volume_every``) hold the global rotation and hand that align the recent training poses
to the file's true poses; the snapshot ``volume_STEP.mrc`` is carried into the truth's frame by that
transform and re-centred (:func:`cryoace.evaluate.truth.compare_maps`), and its FSC-0.5 against the
true map is the resolution at that step's wall time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cryoace.evaluate.align import RotationAlignment
from cryoace.evaluate.plots import read_metrics
from cryoace.evaluate.truth import compare_maps, evaluate_poses
from cryoace.io.mrc import read_volume
from cryoace.io.particles import read_particles
from cryoace.pipeline.run import run_reconstruction
from cryoace.train.config import TrainConfig


def demo_dataset(directory: Path, noise_free: bool, n: int | None = None, seed: int = 0) -> Path:
    """The demo simulation (ADK, L=64, 1.5 Å/px; SNR −10 dB or noise-free) in ``directory``, reused if
    already there; returns the star file."""
    from cryoace.cli.demo import simulate_demo

    star = directory / "particles.star"
    if not star.is_file():
        simulate_demo(directory, noise_free=noise_free, n=n, seed=seed, device="cpu", progress=False)
    return star


def truth_fsc05_px(volume, truth: Path, voxel_size: float | None = None) -> float:
    """FSC-0.5 (px) against the true map ``truth`` of a map — a file, or an array of ``voxel_size``
    (default the truth's) — after aligning it (rotation, hand, translation)."""
    from cryoace.evaluate.fsc import fsc
    from cryoace.evaluate.map_align import align_maps

    reference = read_volume(truth)
    if isinstance(volume, (str, Path)):
        moving = read_volume(volume)
        volume, voxel_size = moving.data, moving.voxel_size
    voxel_size = reference.voxel_size if voxel_size is None else voxel_size
    aligned = align_maps(volume, reference.data, voxel_size, reference.voxel_size).aligned
    return float(fsc(aligned, reference.data, voxel_size=reference.voxel_size).resolution(0.5).px)


def resolution_px(result) -> float:
    """FSC-0.5 resolution in px of a map comparison (2.0 = Nyquist, also when it never crosses)."""
    return float(result.fsc.resolution(0.5).px)


def _alignment(record: dict) -> RotationAlignment:
    return RotationAlignment(rotation=torch.tensor(record["align_rotation"], dtype=torch.float64),
                             flip_hand=bool(record["align_flip_hand"]), aligned=torch.empty(0, 3, 3),
                             mean_sq_frobenius=float("nan"), mean_sq_frobenius_other_hand=float("nan"))


def score_snapshots(run_dir: Path, truth_map: Path) -> list[dict]:
    """(stage, step or round, elapsed_s, FSC-0.5 px, median rotation error °, coverage) for every
    training snapshot ``volume_STEP.mrc`` and every refinement round ``volume_refine_RR.mrc``."""
    truth = read_volume(truth_map)
    poses = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl", kind="poses") if "align_rotation" in r}
    rounds = {r["round"]: r for r in read_metrics(run_dir / "metrics.jsonl", kind="refine") if "align_rotation" in r}
    snapshots = []
    for path in sorted(run_dir.glob("volume_*.mrc")):
        stem = path.stem.split("_")
        if stem[1].isdigit() and int(stem[1]) in poses:
            snapshots.append(("train", int(stem[1]), path, poses[int(stem[1])]))
        elif stem[1] == "refine" and int(stem[2]) in rounds:
            snapshots.append(("refine", int(stem[2]), path, rounds[int(stem[2])]))
    curve = []
    for stage, number, path, rec in snapshots:
        vol = read_volume(path)
        comparison = compare_maps(vol.data, vol.voxel_size, truth.data, truth.voxel_size, _alignment(rec))
        curve.append({"stage": stage, ("step" if stage == "train" else "round"): number,
                      "elapsed_s": rec["elapsed_s"], "fsc05_px": resolution_px(comparison),
                      "rot_median_deg": rec.get("rot_median_deg"), "rot_mean_sq_frob": rec.get("rot_mean_sq_frob"),
                      "coverage": rec.get("coverage")})
    return sorted(curve, key=lambda point: point["elapsed_s"])


def time_to_target(curve: list[dict], target_px: float | None) -> float | None:
    """Wall time (s) of the first snapshot at or below ``target_px`` FSC-0.5 resolution, or None."""
    reached = [c for c in curve if target_px is not None and c["fsc05_px"] <= target_px]
    return reached[0]["elapsed_s"] if reached else None


def train_and_score(star: Path, truth_map: Path, run_dir: Path, config: TrainConfig, snapshots: int = 10,
                    steps_per_s_guess: float = 1.0) -> dict:
    """Train ``config`` on ``star`` into ``run_dir`` (replaced), with about ``snapshots`` volume
    snapshots over its time budget, and score the run: the time-to-resolution curve, the final map
    and poses against the truth, images/s."""
    import shutil

    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget_steps = config.steps or int((config.max_time_s or 600) * steps_per_s_guess)
    every = max(config.log_every, budget_steps // snapshots // config.log_every * config.log_every)
    config.volume_every = config.eval_every = every
    wall0 = time.monotonic()
    result = run_reconstruction(star, run_dir, config, progress=False)
    wall = time.monotonic() - wall0
    truth_table = read_particles(star)
    pred = read_particles(result.poses)
    poses = evaluate_poses(pred, truth_table)
    truth = read_volume(truth_map)
    vol = read_volume(result.volume)
    final = compare_maps(vol.data, vol.voxel_size, truth.data, truth.voxel_size, poses.alignment)
    rates = [r["images_per_s"] for r in read_metrics(run_dir / "metrics.jsonl")][1:]  # the first: warm-up
    return {
        "config": {"preset": config.preset, "decoder": config.decoder.name, "encoder": config.encoder.name,
                   "loss": config.loss, "pip": config.pip.enabled, "pip_weight": config.pip.weight,
                   "refine": config.refine.enabled, "refine_rounds": config.refine.rounds,
                   "batch_size": config.batch_size, "lr": config.optim.lr},
        "steps": result.steps, "train_time_s": result.train_time_s, "wall_time_s": wall,
        "images_per_s": sum(rates) / len(rates) if rates else None,
        "final": {"fsc05_px": resolution_px(final), "rot_median_deg": poses.errors.median_angle_deg,
                  "rot_mean_sq_frob": poses.errors.mean_sq_frobenius,
                  "rot_median_sq_frob": poses.errors.median_sq_frobenius,
                  "coverage": poses.coverage_pred, "coverage_truth": poses.coverage_truth},
        "curve": score_snapshots(run_dir, truth_map),
    }


def dump(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
