"""Gold-standard (half-set) training, ``cryoace reconstruct --halves`` (tiny preset, L = 32, CPU):
the split honours rlnRandomSubset and is disjoint and complete; the two halves start from different
initialisations; every evaluation records the half-map FSC; the half-map resolution agrees with the
FSC of the averaged map against the true map; half 2's poses are carried into half 1's frame
correctly; the CLI writes every output, resumes both halves and stops early with --halves-patience."""

from __future__ import annotations

import dataclasses
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from cryoace.cli.main import main as cli
from cryoace.evaluate.align import shift_volume, transform_volume
from cryoace.evaluate.fsc import fsc
from cryoace.evaluate.gold_standard import UNRESOLVED_EXIT_CODE
from cryoace.evaluate.map_align import MapAlignment, align_maps
from cryoace.evaluate.plots import read_metrics
from cryoace.io.mrc import open_mrc, read_volume
from cryoace.io.particles import read_particles
from cryoace.physics.forward import VoxelFourierVolume, render_images
from cryoace.physics.rotations import axis_angle_to_rotmat, random_rotmat
from cryoace.pipeline.halves import (
    HALF_NAMES,
    evaluations_without_gain,
    half_seeds,
    pose_in_reference_frame,
    split_particles,
)
from cryoace.pipeline.run import run_reconstruction
from cryoace.train.config import load_config, preset_config
from cryoace.train.trainer import load_checkpoint_file
from cryoace.types import Pose

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sim(simulated_adk):
    """160 noise-free adenylate-kinase particles (L=32, 3 Å/px, CTF, shifts; rlnRandomSubset 1, 2, ...)."""
    return simulated_adk(n=160, seed=1)


@pytest.fixture(scope="module")
def run(sim, tmp_path_factory):
    """A --halves run through the Python API: 90 steps per half, an evaluation every 30."""
    cfg = preset_config("tiny")
    cfg.device, cfg.halves, cfg.steps, cfg.batch_size, cfg.volume_every = "cpu", True, 90, 8, 30
    cfg.keep_checkpoints = 10  # keep step 0: the two initialisations are compared
    run_dir = tmp_path_factory.mktemp("halves") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before the function-scoped one_thread
    try:
        result = run_reconstruction(sim.star, run_dir, cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return run_dir, result


# -- the split -------------------------------------------------------------------------------------

def test_split_honours_rlnRandomSubset_else_seeded_random(sim):
    table = read_particles(sim.star)
    subset = table.extra["rlnRandomSubset"].to_numpy()
    (a, b), how = split_particles(table, seed=3)
    assert how == "rlnRandomSubset"
    assert (subset[a] == 1).all() and (subset[b] == 2).all()
    assert len(np.intersect1d(a, b)) == 0 and np.array_equal(np.sort(np.r_[a, b]), np.arange(len(table)))

    # an uneven column is followed exactly
    table.extra["rlnRandomSubset"] = np.where(np.arange(len(table)) < 50, 1, 2)
    (a, b), how = split_particles(table, seed=3)
    assert how == "rlnRandomSubset" and np.array_equal(a, np.arange(50))

    # no column (or one that leaves a half empty): a seeded random split into two nearly equal halves
    for extra in (table.extra.drop(columns="rlnRandomSubset"), table.extra.assign(rlnRandomSubset=1)):
        t = dataclasses.replace(table, extra=extra)
        (a, b), how = split_particles(t, seed=3)
        assert how == "random" and abs(len(a) - len(b)) <= 1
        assert len(np.intersect1d(a, b)) == 0 and np.array_equal(np.sort(np.r_[a, b]), np.arange(len(table)))
        (a2, _), _ = split_particles(t, seed=3)
        (a3, _), _ = split_particles(t, seed=4)
        assert np.array_equal(a, a2) and not np.array_equal(a, a3)


def test_half_seeds_are_distinct_and_reproducible():
    s = half_seeds(0)
    assert len({s["split"], s["half1"], s["half2"]}) == 3 and s == half_seeds(0) and s != half_seeds(1)


def test_evaluations_without_gain():
    assert evaluations_without_gain([]) == 0
    assert evaluations_without_gain([20.0, 15.0, 12.0]) == 0
    assert evaluations_without_gain([20.0, 15.0, 14.9, 15.5]) == 2  # 0.7 % is no gain
    # a slow creep counts once it adds up to more than 1 % of the best
    assert evaluations_without_gain([20.0, 19.9, 19.85, 19.7]) == 0
    assert evaluations_without_gain([20.0, 19.9, 19.85]) == 2


# -- half 2's poses in half 1's frame ---------------------------------------------------------------

def _blobs(size: int = 32) -> torch.Tensor:
    """A smooth, chiral test map: four Gaussian blobs (σ 2 px) at asymmetric positions."""
    c = torch.arange(size, dtype=torch.float64) - size // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(size, size, size, dtype=torch.float64)
    for (px, py, pz), w in (((0, 0, 0), 1.0), ((5, 1, -2), 0.8), ((-2, 6, 1), 0.6), ((1, -3, 7), 0.4)):
        vol += w * torch.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * 2.0 ** 2))
    return vol


@pytest.mark.parametrize("flip", [False, True])
def test_pose_in_reference_frame_renders_the_same_images(flip):
    """A map moved by a known G, hand and shift, ``aligned(r) = moving(H G (r − s))``: the transformed
    poses render from ``aligned`` the images the original poses render from ``moving``."""
    size, pixel_size = 32, 2.0
    moving = _blobs(size)
    g = axis_angle_to_rotmat(torch.tensor([0.4, -0.9, 0.3], dtype=torch.float64))
    shift_px = torch.tensor([1.5, -2.0, 1.0], dtype=torch.float64)
    aligned = shift_volume(transform_volume(moving, g, flip), shift_px)
    alignment = MapAlignment(rotation=g, flip_hand=flip, shift_px=shift_px, voxel_size=pixel_size,
                             correlation=1.0, correlation_other_hand=None, aligned=aligned.float())
    n = 6
    pose = Pose(rotmat=random_rotmat(n, torch.Generator().manual_seed(0), dtype=torch.float64),
                shift_angst=torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3)
    moved = pose_in_reference_frame(pose, alignment)
    assert torch.allclose(torch.linalg.det(moved.rotmat), torch.ones(n, dtype=torch.float64))

    def render(volume, p):
        return render_images(VoxelFourierVolume.from_real(volume, pad_factor=2), p, pixel_size, size)

    want = render(moving, pose)
    got = render(aligned, moved)
    rel = float((got - want).norm() / want.norm())
    assert rel < 0.03, rel
    # the rotation alone is not enough: the map's shift moves the images
    unshifted = render(aligned, Pose(rotmat=moved.rotmat, shift_angst=pose.shift_angst))
    assert float((unshifted - want).norm() / want.norm()) > 5 * rel
    # ... and the rotation must be H R H G (G on the right: a change of the map's frame)
    wrong = render(aligned, Pose(rotmat=pose.rotmat @ g.T, shift_angst=moved.shift_angst))
    assert float((wrong - want).norm() / want.norm()) > 5 * rel


# -- a whole run --------------------------------------------------------------------------------------

def test_run_writes_halves_records_and_every_output(run, sim):
    run_dir, result = run
    records = read_metrics(run_dir / "metrics.jsonl", "halves")
    assert [r["step"] for r in records] == [30, 60, 90]
    for r in records:
        assert r["kind"] == "halves" and r["elapsed_s"] > 0 and 6.0 <= r["resolution_angst"] <= 96.0
        assert len(r["freq_cyc_angst"]) == len(r["fsc"]) == 17  # shells 0 .. L/2
        assert r["freq_cyc_angst"][-1] == pytest.approx(0.5 / 3.0) and r["fsc"][0] == pytest.approx(1.0)
    assert records[-1]["elapsed_s"] > records[0]["elapsed_s"]
    summary = json.loads((run_dir / "metrics.json").read_text())["halves"]
    assert summary["step"] == 90 and summary["resolution_angst"] == pytest.approx(records[-1]["resolution_angst"])
    assert summary["fsc"]["curve"] == pytest.approx(records[-1]["fsc"])
    assert summary["best_resolution_angst"] == pytest.approx(min(r["resolution_angst"] for r in records))
    assert result.steps == 90
    # the verdict as a refinement's (gold_standard.json): its unmasked FSC is the last record's, and the
    # resolution claimed is the masked, phase-randomization corrected one
    gold = result.gold_standard
    assert result.resolution_angst == (pytest.approx(gold.resolution().angstrom) if gold.resolved else None)
    assert gold.resolution(masked=False).angstrom == pytest.approx(records[-1]["resolution_angst"], rel=1e-4)
    saved = json.loads((run_dir / "gold_standard.json").read_text())
    assert saved["resolved"] is gold.resolved and saved["predictive_check"]["particles"] == 160
    assert (run_dir / "volume_mask.mrc").is_file()

    for name in ("volume.mrc", "volume_half1.mrc", "volume_half2.mrc"):
        mrc = open_mrc(run_dir / name, mmap=False)
        assert mrc.data.shape == (32, 32, 32) and mrc.voxel_size == pytest.approx(3.0)
        assert np.isfinite(mrc.data).all() and mrc.data.std() > 0
    halves = [read_volume(run_dir / f"volume_{n}.mrc").data for n in HALF_NAMES]
    assert np.allclose(read_volume(run_dir / "volume.mrc").data, 0.5 * (halves[0] + halves[1]), atol=1e-5)
    # the saved half 2 is already in half 1's frame: its FSC with half 1 is the recorded one
    again = fsc(torch.tensor(halves[0]), torch.tensor(halves[1]), voxel_size=3.0)
    assert np.allclose(again.curve, records[-1]["fsc"], atol=1e-4)
    for name in ("fsc.png", "resolution.png", "volume.png"):
        assert matplotlib.image.imread(run_dir / name).ndim == 3

    table, source = read_particles(run_dir / "poses.star"), read_particles(sim.star)
    assert len(table) == 160 and table.pose is not None
    assert np.array_equal(table.extra["rlnRandomSubset"].to_numpy(), source.extra["rlnRandomSubset"].to_numpy())
    assert not torch.allclose(table.pose.rotmat, source.pose.rotmat, atol=1e-3)


def test_poses_star_holds_each_particles_pose_from_its_own_half(run, sim):
    """poses.star (written chunk by chunk) gives every particle the pose its own half's model predicts
    for it — half 2's carried into half 1's frame with the last recorded alignment."""
    from cryoace.train.predict import load_run, open_particles, predict_poses

    run_dir, _ = run
    table = read_particles(run_dir / "poses.star")
    subset = table.extra_column("rlnRandomSubset")
    saved = json.loads((run_dir / "metrics.json").read_text())["halves"]["alignment"]
    alignment = MapAlignment(rotation=torch.tensor(saved["rotation"], dtype=torch.float64),
                             flip_hand=saved["flip_hand"],
                             shift_px=torch.tensor(saved["shift_px"], dtype=torch.float64),
                             voxel_size=saved["voxel_size"], correlation=saved["correlation"],
                             correlation_other_hand=None, aligned=torch.zeros(1))
    for k, name in enumerate(HALF_NAMES):
        half = load_run(run_dir / name)
        rows = np.flatnonzero(subset == k + 1)
        assert len(rows) == 80
        size = half.data.image_size
        pose = predict_poses(half.encoder, half.decoder, open_particles(sim.star, half.data).subset(rows),
                             symmetric=half.config.loss == "symmetric", use_ctf=half.data.use_ctf,
                             radius_cyc_px=half.config.band_shells(half.step, size) / size)
        if k == 1:
            pose = pose_in_reference_frame(pose, alignment)
        written = table.pose_rows(rows)
        torch.testing.assert_close(written.rotmat, pose.rotmat, atol=1e-5, rtol=0)
        torch.testing.assert_close(written.shift_angst, pose.shift_angst, atol=1e-4, rtol=0)


def test_two_independent_halves(run):
    run_dir, _ = run
    configs = [load_config(run_dir / n / "config.yaml")[0] for n in HALF_NAMES]
    assert configs[0].seed != configs[1].seed
    starts = [load_checkpoint_file(run_dir / n / "checkpoints" / "step_000000.pt") for n in HALF_NAMES]
    lasts = [load_checkpoint_file(run_dir / n / "checkpoints" / "last.pt") for n in HALF_NAMES]
    for part in ("encoder", "decoder"):
        differ = [k for k in starts[0][part] if starts[0][part][k].is_floating_point()
                  and not torch.equal(starts[0][part][k], starts[1][part][k])]
        assert differ, f"the two {part}s start from the same initialisation"
    assert lasts[0]["step"] == lasts[1]["step"] == 90  # equal training
    assert lasts[0]["data"]["n_particles"] == lasts[1]["data"]["n_particles"] == 80
    _, extra = load_config(run_dir / "config.yaml")
    assert extra["halves"]["split"] == "rlnRandomSubset" and extra["halves"]["n_particles"] == [80, 80]


def test_half_map_resolution_agrees_with_the_fsc_against_the_truth(run, sim):
    """On noise-free data the half maps' 0.143 resolution should match what the averaged map reaches
    against the true map: between its 0.143 and its 0.5 resolution (a gold-standard FSC is, if anything,
    optimistic: both halves share the model's biases), within a factor 1.5 each way for a tiny run."""
    run_dir, result = run
    truth = read_volume(sim.volume).data
    average = read_volume(run_dir / "volume.mrc").data
    alignment = align_maps(average, truth, 3.0, 3.0)
    vs_truth = fsc(torch.from_numpy(np.array(truth)), alignment.aligned, voxel_size=3.0)
    res_05, res_0143 = vs_truth.resolution(0.5).angstrom, vs_truth.resolution(0.143).angstrom
    half = read_metrics(run_dir / "metrics.jsonl", "halves")[-1]["resolution_angst"]
    assert res_0143 / 1.5 <= half <= res_05 * 1.5, (half, res_0143, res_05)
    assert half > 2 * 3.0 * 1.05 and res_05 < 32 * 3.0  # the band is real: neither at Nyquist nor the box


# -- the command line ---------------------------------------------------------------------------------

def test_cli_halves_resume_and_patience(sim, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["--quiet", "--device", "cpu"]
    assert cli(["reconstruct", str(sim.star), "-o", str(run_dir), "--preset", "tiny", "--halves", "--steps", "20",
                "--eval-every", "10", "--batch-size", "8", "--volume-every", "0", *common]) in (0, UNRESOLVED_EXIT_CODE)
    out = capsys.readouterr().out
    assert "trained 20 steps" in out and ("gold-standard resolution" in out or "NOT RESOLVED" in out)
    for name in ("config.yaml", "metrics.json", "metrics.jsonl", "fsc.png", "resolution.png", "poses.star",
                 "volume.mrc", "volume_half1.mrc", "volume_half2.mrc", "volume.png", "report.html",
                 "half1/checkpoints/last.pt", "half2/checkpoints/last.pt", "half1/config.yaml"):
        assert (run_dir / name).is_file(), name
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl", "halves")] == [10, 20]
    config, _ = load_config(run_dir / "config.yaml")
    assert config.halves and config.halves_patience is None

    # resume both halves with a larger budget and a patience of one evaluation: the history goes on
    # from step 20 and the run stops at the first evaluation that gains no more than 1 %
    assert cli(["reconstruct", str(sim.star), "-o", str(run_dir), "--resume", "--steps", "400",
                "--halves-patience", "1", *common]) in (0, UNRESOLVED_EXIT_CODE)
    records = read_metrics(run_dir / "metrics.jsonl", "halves")
    steps = [r["step"] for r in records]
    assert steps[:2] == [10, 20] and steps == list(range(10, 10 * len(steps) + 1, 10)) and steps[-1] < 400
    res = [r["resolution_angst"] for r in records]
    assert evaluations_without_gain(res) == 1 and evaluations_without_gain(res[:-1]) == 0
    for name in HALF_NAMES:
        assert load_checkpoint_file(run_dir / name / "checkpoints" / "last.pt")["step"] == steps[-1]
    config, extra = load_config(run_dir / "config.yaml")
    assert config.halves_patience == 1 and len(extra["resumed"]) == 1
    assert math.isclose(json.loads((run_dir / "metrics.json").read_text())["halves"]["resolution_angst"], res[-1])
