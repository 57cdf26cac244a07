"""``cryoace reconstruct`` and ``cryoace predict-poses`` end to end on a small simulated set (tiny
preset, CPU): the loss falls, every output exists and reads back, predict-poses reproduces the run's
poses.star, --resume equals an uninterrupted run bit for bit, and bad input is one line, exit 2."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import starfile
import torch

from cryoace.cli.main import main as cli
from cryoace.evaluate.gold_standard import UNRESOLVED_EXIT_CODE
from cryoace.evaluate.plots import read_metrics
from cryoace.io.mrc import open_mrc
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.train.config import load_config, preset_config
from cryoace.train.trainer import load_checkpoint_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def particles(simulated_adk):
    """200 noise-free adenylate-kinase particles at L=32, 3 Å/px, with CTF and shifts."""
    return simulated_adk(n=200, seed=1).star


def _train_losses(run):
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_tiny_run_writes_every_output(particles, tmp_path, capsys):
    run = tmp_path / "run"
    # the full band from the start (the presets widen it, and the loss with it): losses comparable
    assert cli(["reconstruct", str(particles), "-o", str(run), "--preset", "tiny", "--steps", "40",
                "--quiet", "--device", "cpu", "--volume-every", "20", "--band-start", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "trained 40 steps" in out and "volume.mrc" in out
    losses = _train_losses(run)
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])  # the loss falls
    config, extra = load_config(run / "config.yaml")
    assert config.preset == "tiny" and config.steps == 40 and config.device == "cpu"
    assert extra["provenance"]["cryoace_version"] and extra["seeds"]["data_order"] >= 0
    assert extra["data"]["image_size"] == 32 and extra["data"]["pixel_size"] == 3.0
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 40 and "optimizer" in ckpt and "rng" in ckpt
    assert (run / "checkpoints" / "step_000040.pt").is_file()
    for name in ("volume.mrc", "volume_000020.mrc", "volume_000040.mrc"):
        mrc = open_mrc(run / name, mmap=False)
        assert mrc.data.shape == (32, 32, 32) and mrc.voxel_size == pytest.approx(3.0)
        assert np.isfinite(mrc.data).all() and mrc.data.std() > 0
    for name in ("volume.png", "loss.png"):
        assert matplotlib.image.imread(run / name).ndim == 3
    table = read_particles(run / "poses.star")
    source = read_particles(particles)
    assert len(table) == len(source) == 200 and table.pose is not None
    assert torch.allclose(torch.linalg.det(table.pose.rotmat), torch.ones(200, dtype=torch.float64), atol=1e-6)
    raw = starfile.read(run / "poses.star", always_dict=True)["particles"]
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
            "rlnRandomSubset", "rlnDefocusU"} <= set(raw.columns)
    assert np.allclose(table.ctf.defocus_u.numpy(), source.ctf.defocus_u.numpy())
    # the predicted poses are not the simulated ones (they were overwritten, not passed through)
    assert not torch.allclose(table.pose.rotmat, source.pose.rotmat, atol=1e-3)

    # predict-poses: the same function over the same model gives the same poses
    pred = tmp_path / "pred.star"
    assert cli(["predict-poses", str(run), str(particles), "-o", str(pred), "--device", "cpu", "--quiet",
                "--batch-size", "64"]) == 0
    again = read_particles(pred)
    assert torch.allclose(again.pose.rotmat, table.pose.rotmat, atol=1e-5)
    assert torch.allclose(again.pose.shift_angst, table.pose.shift_angst, atol=1e-4)
    # predicted and written in chunks of ~7 particles: the same poses, every input column and value kept
    chunked = tmp_path / "pred7.star"
    assert cli(["predict-poses", str(run), str(particles), "-o", str(chunked), "--device", "cpu", "--quiet",
                "--batch-size", "64", "--chunk-rows", "7"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic: no temp left
    small = read_particles(chunked)
    assert torch.allclose(small.pose.rotmat, again.pose.rotmat, atol=1e-5)
    given = starfile.read(particles, always_dict=True)["particles"]
    written = starfile.read(chunked, always_dict=True)["particles"]
    assert set(given.columns) <= set(written.columns)
    for col in ("rlnRandomSubset", "rlnDefocusU", "rlnDefocusAngle"):
        assert written[col].tolist() == given[col].tolist(), col
    assert list(small.image_paths) == list(source.image_paths)


def test_resume_via_cli_equals_uninterrupted(particles, tmp_path):
    common = ["--preset", "tiny", "--quiet", "--device", "cpu", "--batch-size", "8", "--log-every", "3",
              "--volume-every", "0"]
    assert cli(["reconstruct", str(particles), "-o", str(tmp_path / "full"), "--steps", "14", *common]) == 0
    assert cli(["reconstruct", str(particles), "-o", str(tmp_path / "part"), "--steps", "8", *common]) == 0
    assert cli(["reconstruct", str(particles), "-o", str(tmp_path / "part"), "--resume", "--steps", "14",
                "--quiet", "--device", "cpu"]) == 0
    a = load_checkpoint_file(tmp_path / "full" / "checkpoints" / "last.pt")
    b = load_checkpoint_file(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 14
    for part in ("encoder", "decoder"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    _, extra = load_config(tmp_path / "part" / "config.yaml")
    assert len(extra["resumed"]) == 1 and extra["provenance"]["arguments"]["steps"] == 8


def _one_line_error(capsys, argv, *fragments):
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cryoace "), err
    for f in fragments:
        assert f in err, err
    return err


def test_bad_input_is_one_line_exit_2(particles, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["reconstruct", str(particles), "-o", str(out), "--quiet", "--device", "cpu"]
    _one_line_error(capsys, [*base, "--preset", "huge"], "unknown preset 'huge'")
    _one_line_error(capsys, [*base, "--preset", "tiny", "--max-time", "soon"], "duration")
    _one_line_error(capsys, [*base, "--preset", "tiny", "--batch-size", "0"], "--batch-size")
    _one_line_error(capsys, [*base, "--preset", "tiny", "--ab-initio-starts", "0"], "--ab-initio-starts")
    _one_line_error(capsys, [*base, "--preset", "tiny", "--pose-heads", "0"], "--pose-heads")
    _one_line_error(capsys, [*base, "--preset", "tiny", "--resume"], "nothing to resume")
    # a star file that references no images
    blocks = starfile.read(particles, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnImageName"])
    no_images = tmp_path / "no_images.star"
    starfile.write(blocks, no_images)
    _one_line_error(capsys, ["reconstruct", str(no_images), "-o", str(out), "--preset", "tiny", "--quiet"],
                    "no_images.star", "references no particle images")
    _one_line_error(capsys, ["reconstruct", str(tmp_path / "nope.star"), "-o", str(out), "--preset", "tiny"],
                    "nope.star", "not found")
    assert not out.exists()  # nothing left behind
    _one_line_error(capsys, ["predict-poses", str(tmp_path), str(particles), "-o", str(tmp_path / "p.star")],
                    "no checkpoint")
    _one_line_error(capsys, ["predict-poses", str(tmp_path), str(particles), "-o", str(tmp_path / "p.star"),
                             "--chunk-rows", "0"], "--chunk-rows must be positive")
    # an existing run: a new run refuses it, a resume must keep its settings
    (out / "checkpoints").mkdir(parents=True)
    _one_line_error(capsys, [*base, "--preset", "tiny"], "already holds a run")


def test_demo_smoke(tmp_path, capsys):
    """The demo's whole path (simulate → reconstruct → align and FSC vs truth), for seconds."""
    out = tmp_path / "demo"
    assert cli(["demo", "-o", str(out), "--preset", "tiny", "--max-time", "2s", "-n", "40", "--quiet",
                "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "FSC vs truth" in text and "open in ChimeraX" in text and "volume_aligned.mrc" in text
    evaluation = json.loads((out / "run" / "evaluation.json").read_text())
    assert evaluation["fsc_vs_truth"] is not None and evaluation["n_particles"] == 40
    assert (out / "run" / "volume_aligned.mrc").is_file() and (out / "dataset" / "volume.mrc").is_file()


# -- ACE-EM options, each end to end on the tiny preset ------------------------------------------

ACE_EM_OPTIONS = {
    "pip": ["--pip", "--pip-weight", "0.5", "--pip-warmup", "4"],
    "pip-alternate-unfrozen-snr": ["--pip", "--pip-mode", "alternate", "--no-pip-freeze-decoder",
                                   "--pip-snr", "-10", "--pip-shift-sigma", "2"],
    "voxel-real": ["--decoder", "voxel-real", "--optimizer", "adamw"],
    "voxel-fourier-gsym": ["--decoder", "voxel-fourier", "--loss", "gsym", "--gsym-views", "2"],
    "warmup-labels-shift-l1-schedule": ["--warmup-labels", "6", "--warmup-filter", "4", "--shift-l1", "0.01",
                                        "--lr-warmup", "4", "--lr-milestones", "8", "--lr-gamma", "0.5"],
    "resnet18": ["--encoder", "resnet18"],
    "multihead-pip": ["--pose-heads", "3", "--pip", "--pip-weight", "0.5", "--pip-warmup", "4"],
}


def _built(checkpoint: dict) -> dict:
    """What a checkpoint's models are: the decoder's parameter shapes (not its constant output scales),
    the encoder's trunk, and the decoder's own learning rate."""
    decoder_group = next(g for g in checkpoint["optimizer"]["param_groups"] if g["name"] == "decoder")
    scales = ("output_scale", "shell_scale")
    rotation_layers = [k for k in checkpoint["encoder"] if k.startswith("rotation_head.") and k.endswith(".weight")]
    last = max(rotation_layers, key=lambda k: int(k.split(".")[1]))
    return {"decoder": {k: tuple(v.shape) for k, v in checkpoint["decoder"].items() if k not in scales},
            "resnet": any(k.startswith("cnn.stem.") for k in checkpoint["encoder"]),
            "decoder_lr": decoder_group["base_lr"], "rotation_outputs": checkpoint["encoder"][last].shape[0]}


@pytest.mark.parametrize("name", sorted(ACE_EM_OPTIONS))
def test_ace_em_options_run_end_to_end(particles, tmp_path, name):
    """Each option builds what it names (checked in the checkpoint) and trains: over 32 steps (2.5
    epochs of the 200 particles at batch 16) the loss of the last 12 steps is below the first epoch's
    (after the warm-up labels, whose low-passed targets are easier to fit)."""
    run = tmp_path / "run"
    # the full band from the start, so that the losses compared are over the same band
    assert cli(["reconstruct", str(particles), "-o", str(run), "--preset", "tiny", "--steps", "32",
                "--log-every", "4", "--eval-every", "4", "--quiet", "--device", "cpu", "--volume-every", "0",
                "--band-start", "0.5", *ACE_EM_OPTIONS[name]]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(4, 33, 4))
    assert all(np.isfinite(r["grad_norm"]) for r in train)
    assert [r["step"] for r in records if r["kind"] == "poses"] == list(range(4, 33, 4))
    config, _ = load_config(run / "config.yaml")
    first_epoch = [r["loss"] for r in train if config.warmup_label_steps < r["step"] - 4 and r["step"] <= 16
                   or config.warmup_label_steps == 0 and r["step"] <= 12]
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean(first_epoch)  # the loss falls
    built = _built(load_checkpoint_file(run / "checkpoints" / "last.pt"))
    decoder = built["decoder"]
    if name == "voxel-real":
        assert decoder == {"volume": (32, 32, 32)} and built["decoder_lr"] == 1.0  # the grid's own rate
    elif name == "voxel-fourier-gsym":
        assert decoder == {"grid": (2, 17, 33, 33)} and built["decoder_lr"] == 1.0 and config.loss == "gsym"
    else:  # FourierNet: two SIRENs of the tiny preset's 32 hidden units
        assert decoder["modulant.body.0.linear.weight"] == (32, 3) and decoder["envelope.body.0.linear.weight"]
        assert built["decoder_lr"] == config.optim.lr
    assert built["resnet"] == (name == "resnet18")
    heads = config.encoder.n_heads
    assert heads == (3 if name == "multihead-pip" else 1) and built["rotation_outputs"] == 6 * heads
    for r in train:  # the most-winning head's share of the images: at least 1/K, only with several heads
        assert r["top_head_fraction"] is None if heads == 1 else 1 / heads <= r["top_head_fraction"] <= 1
    if "--pip" in ACE_EM_OPTIONS[name]:
        assert config.pip.enabled and any(r["pip_loss"] for r in train)
    if name == "warmup-labels-shift-l1-schedule":
        assert config.warmup_label_steps == 6 and config.optim.milestones == (8,)
        lrs = [r["lr"] for r in train]  # warm-up to the full rate by step 4, halved after step 8
        assert lrs[1] == pytest.approx(config.optim.lr) and lrs[2] == pytest.approx(0.5 * config.optim.lr)
    vol = open_mrc(run / "volume.mrc", mmap=False)
    assert vol.data.shape == (32, 32, 32) and np.isfinite(vol.data).all()
    assert len(starfile.read(run / "poses.star")["particles"]) == 200


#: a finished run's exit status: 0, or 4 when its half maps resolved nothing — what a few seconds of
#: training, ab initio and refinement on 200 particles honestly give (the poses are not yet found)
FINISHED = (0, UNRESOLVED_EXIT_CODE)


def test_refinement_stage_writes_refined_map_and_poses(particles, tmp_path, capsys):
    """--refine: the encoder's poses and decoder's map are kept aside, each round leaves a map and a
    record (with errors against the simulated poses), and the refined poses are closer to the truth."""
    run = tmp_path / "run"
    assert cli(["reconstruct", str(particles), "-o", str(run), "--preset", "tiny", "--steps", "10",
                "--quiet", "--device", "cpu", "--volume-every", "0", "--refine", "--refine-rounds", "2",
                "--refine-step", "15", "--ab-initio-iterations", "4", "--teach-encoder", "3s"]) in FINISHED
    for name in ("volume.mrc", "volume_decoder.mrc", "volume_abinitio.mrc", "volume_refine_00.mrc",
                 "volume_refine_01.mrc"):
        mrc = open_mrc(run / name, mmap=False)
        assert mrc.data.shape == (32, 32, 32) and np.isfinite(mrc.data).all() and mrc.voxel_size == pytest.approx(3.0)
    assert np.allclose(open_mrc(run / "volume.mrc", mmap=False).data,
                       open_mrc(run / "volume_refine_01.mrc", mmap=False).data)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["kind"] == "refine"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["local_shells"] > rounds[0]["local_shells"]
    assert [r["round"] for r in read_metrics(run / "metrics.jsonl", kind="refine")] == [0, 1]  # same step, both kept
    # the ab initio stage ran (each start's 4 iterations recorded) and the start map was chosen by search
    # error: the best ab initio start, then ab initio or the decoder's map
    # (more runs, up to twice as many, while no other run has found the best map)
    starts = preset_config("tiny").refine.ab_initio_starts
    (seed,) = [r for r in records if r["kind"] == "refine_seed"]
    runs = len(seed["search_error_ab_initio_starts"])
    assert starts <= runs <= 2 * starts and starts > 1
    assert runs == 2 * starts or seed["start_agreement_px"] <= seed["start_agreement_limit_px"]  # stopped: confirmed
    assert [(r["start"], r["iteration"]) for r in read_metrics(run / "metrics.jsonl", kind="ab_initio")] == [
        (k, i) for k in range(runs) for i in range(4)]
    errors = {k: seed[f"search_error_{k}"] for k in ("decoder", "ab_initio")}
    assert all(np.isfinite(v) and v > 0 for v in errors.values()) and seed["chosen"] == min(errors, key=errors.get)
    assert seed["search_error_ab_initio"] == min(seed["search_error_ab_initio_starts"])
    assert seed["ab_initio_start"] == int(np.argmin(seed["search_error_ab_initio_starts"]))
    assert not (run / "volume_abinitio_half1.mrc").exists()
    # the kept start's map compared with the other runs' (all particles): how far the closest agrees
    assert seed["start_agreement_between"] == "runs" and 2.0 <= seed["start_agreement_px"] <= 32
    assert seed["start_agreement_limit_px"] > 0
    assert rounds[0]["elapsed_s"] > seed["elapsed_s"]  # the rounds' clock includes the ab initio stage
    assert all(np.isfinite(r["rot_median_deg"]) and len(r["align_rotation"]) == 3 for r in rounds)
    assert rounds[0]["pose_change_median_deg"] is None and rounds[1]["pose_change_median_deg"] >= 0
    assert all(2.0 <= r["half_fsc0143_px"] <= 32 and r["half_fsc0143_angst"] == pytest.approx(3 * r["half_fsc0143_px"])
               for r in rounds)
    assert matplotlib.image.imread(run / "refine.png").ndim == 3
    config, _ = load_config(run / "config.yaml")
    assert config.refine.enabled and config.refine.rounds == 2 and config.refine.global_step_deg == 15
    assert config.refine.ab_initio and config.refine.ab_initio_iterations == 4
    truth = read_particles(particles)
    encoder, refined = read_particles(run / "poses_encoder.star"), read_particles(run / "poses.star")
    assert len(encoder) == len(refined) == 200
    assert not torch.allclose(encoder.pose.rotmat, refined.pose.rotmat, atol=1e-3)
    from cryoace.evaluate.truth import evaluate_poses

    assert (evaluate_poses(refined, truth).errors.median_angle_deg
            < evaluate_poses(encoder, truth).errors.median_angle_deg)
    # gold standard: the file's own half sets (rlnRandomSubset) were refined apart, and poses.star says so
    assert np.array_equal(refined.extra_column("rlnRandomSubset"), truth.extra_column("rlnRandomSubset"))
    assert set(np.unique(truth.extra_column("rlnRandomSubset")).tolist()) == {1, 2}
    for name in ("volume_half1.mrc", "volume_half2.mrc", "volume_mask.mrc", "gold_standard.json", "fsc.png"):
        assert (run / name).is_file()
    # --teach-encoder: an encoder taught from the final map for 3 s is saved, its checks recorded, and
    # predict-poses uses it by default (its poses in the map's frame), the network's on request
    from cryoace.train.teach import load_taught_encoder, pose_agreement

    teach = read_metrics(run / "metrics.jsonl", kind="teach")
    assert teach and all(0 <= r["median_deg"] <= 180 and r["iteration"] >= 1 for r in teach)
    assert config.refine.teach_time_s == 3.0
    report = (run / "report.html").read_text()
    assert "Encoder taught from the map" in report and f"median {teach[-1]['median_deg']:.1f}°" in report
    taught = load_taught_encoder(run / "checkpoints" / "encoder_taught.pt")
    capsys.readouterr()
    out = tmp_path / "taught.star"
    assert cli(["predict-poses", str(run), str(particles), "-o", str(out), "--quiet", "--device", "cpu"]) == 0
    assert "taught from the run's map" in capsys.readouterr().out
    predicted = read_particles(out).pose.rotmat
    expected = taught.predict(ParticleDataset(truth, normalize=True)[np.arange(200)].images).rotmat
    assert pose_agreement(predicted, expected)[0] < 0.01
    assert cli(["predict-poses", str(run), str(particles), "-o", str(out), "--quiet", "--device", "cpu",
                "--encoder", "network"]) == 0
    assert "step 10" in capsys.readouterr().out
    assert torch.allclose(read_particles(out).pose.rotmat, encoder.pose.rotmat, atol=1e-4)
    # cryoace refine: 120 of the particles posed again against the run's half maps, from the taught encoder's
    # poses, into half maps of their own (their half sets from rlnRandomSubset), with a gold standard
    new = tmp_path / "refined_new"
    assert cli(["refine", str(run), str(particles), "-o", str(new), "--first", "120", "--quiet",
                "--device", "cpu"]) in FINISHED
    text = capsys.readouterr().out
    assert "taught from the run's map: its poses were within" in text and "(120 particles)" in text
    posed = read_particles(new / "poses.star")
    assert len(posed) == 120 and np.array_equal(posed.extra_column("rlnRandomSubset"),
                                                truth.extra_column("rlnRandomSubset")[:120])
    confidence = posed.extra_column("cryoacePoseConfidence")
    search = json.loads((new / "search.json").read_text())  # how the local-first search went
    plan = search["local_first"]
    assert search["particles"] == 120 and plan["sample"] == 120
    assert plan["particles"] == (120 if plan["threshold"] is not None else 0)  # (0: every particle globally)
    kept = np.isnan(confidence)  # kept from a local search: no global search measured a confidence
    assert int(kept.sum()) == plan["particles"] - plan["fell_back"]
    assert np.all((confidence[~kept] >= 0) & (confidence[~kept] <= 1))
    assert np.isfinite(posed.extra_column("cryoacePoseScore")).all()
    for name in ("volume.mrc", "volume_half1.mrc", "volume_half2.mrc", "gold_standard.json", "fsc.png"):
        assert (new / name).is_file()
    # --no-local-first: every particle searched globally, so every confidence is measured
    assert cli(["refine", str(run), str(particles), "-o", str(tmp_path / "global"), "--first", "120", "--quiet",
                "--device", "cpu", "--no-local-first"]) in FINISHED
    assert not np.isnan(read_particles(tmp_path / "global" / "poses.star").extra_column("cryoacePoseConfidence")).any()
    assert json.loads((tmp_path / "global" / "search.json").read_text())["local_first"] is None
    # --false-accept: the calibration keeps at most that fraction of wrong local results
    assert cli(["refine", str(run), str(particles), "-o", str(tmp_path / "strict"), "--first", "120", "--quiet",
                "--device", "cpu", "--false-accept", "0"]) in FINISHED
    strict = json.loads((tmp_path / "strict" / "search.json").read_text())["local_first"]
    assert strict["max_false_accept"] == 0 and plan["max_false_accept"] == config.refine.false_accept == 0.01
    assert strict["sample_false_accept"] == 0 and strict["sample_accepted"] <= plan["sample_accepted"]
    assert open_mrc(new / "volume_half1.mrc", mmap=False).data.shape == (32, 32, 32)
    gold = json.loads((new / "gold_standard.json").read_text())
    assert gold["start_resolution_px"] == config.refine.start_resolution_px
    # the same output again is refused (one line, exit 2), as is a run without half maps
    assert cli(["refine", str(run), str(particles), "-o", str(new), "--quiet", "--device", "cpu"]) == 2
    assert "already holds a refinement" in capsys.readouterr().err
    assert cli(["refine", str(run), str(particles), "-o", str(tmp_path / "other"), "--centring", "0.8"]) == 2
    assert "--centring must be between 0 and 0.5" in capsys.readouterr().err
    assert cli(["refine", str(run), str(particles), "-o", str(tmp_path / "other"), "--false-accept", "1"]) == 2
    assert "--false-accept must be a fraction in [0, 1)" in capsys.readouterr().err
    (run / "volume_half2.mrc").unlink()
    assert cli(["refine", str(run), str(particles), "-o", str(tmp_path / "other"), "--quiet", "--device", "cpu"]) == 2
    assert "has no volume_half2.mrc" in capsys.readouterr().err


def test_refinement_rounds_on_a_subset_then_every_particle_once(particles, tmp_path, capsys):
    """--refine-subset 100 of 200 particles: the rounds run on 100 (50 per half set), an encoder is
    taught from their map (--teach-encoder) and poses every particle, then the other 100 are searched
    once against their own half's map — locally from the encoder's poses where the calibration on the
    subset allows it; poses.star and the half maps hold all 200."""
    run = tmp_path / "run"
    status = cli(["reconstruct", str(particles), "-o", str(run), "--preset", "tiny", "--steps", "10", "--quiet",
                  "--device", "cpu", "--volume-every", "0", "--refine", "--refine-rounds", "2", "--refine-step", "15",
                  "--ab-initio-iterations", "4", "--refine-subset", "100", "--teach-encoder", "3s"])
    assert status in FINISHED
    (record,) = read_metrics(run / "metrics.jsonl", kind="refine_all")
    assert record["particles"] == 200 and record["searched"] == 100 and 2.0 <= record["half_fsc0143_px"] <= 32
    # taught from the rounds' map before the final pass, which calibrated its local search on the subset
    stages = [r["stage"] for r in read_metrics(run / "metrics.jsonl", kind="stage")]
    assert stages.index("teach") < stages.index("final_pass") and stages.count("teach") == 1
    plan = record["local_first"]
    assert plan["sample"] == 100 and 0.0 <= plan["reachable"] <= 1.0
    assert (run / "checkpoints" / "encoder_taught.pt").is_file()
    refined, truth = read_particles(run / "poses.star"), read_particles(particles)
    assert len(refined) == 200
    confidence = refined.extra_column("cryoacePoseConfidence")
    measured = ~np.isnan(confidence)  # NaN: kept from a local search, no global search measured it
    assert (confidence[measured] > 0).all() and int((~measured).sum()) == plan["particles"] - plan["fell_back"]
    assert np.isfinite(refined.extra_column("cryoacePoseScore")).all()
    searched = plan["fell_back"] if plan["threshold"] is not None else 100
    assert f"100 particles, {searched} of them searched globally" in (run / "report.html").read_text()
    # the file's half sets are kept for every particle
    assert np.array_equal(refined.extra_column("rlnRandomSubset"), truth.extra_column("rlnRandomSubset"))
    config, _ = load_config(run / "config.yaml")
    assert config.refine.subset == 100
    # more particles than the subset: no pass of the networks' encoder over every particle
    assert not (run / "poses_encoder.star").exists()
    assert "encoder_poses" not in {r["stage"] for r in read_metrics(run / "metrics.jsonl", kind="stage")}
    gold = json.loads((run / "gold_standard.json").read_text())
    assert gold["unmasked_resolution_px"] == pytest.approx(record["half_fsc0143_px"])


def test_interrupted_refinement_resumes_where_it_stopped(particles, tmp_path):
    """A run stopped after refinement round 1 and resumed (with the round count raised) goes on from
    the saved state: no second ab initio, no repeated round, and the same map and poses as a run
    that was never interrupted (CPU runs are deterministic)."""
    common = ["--preset", "tiny", "--steps", "10", "--quiet", "--device", "cpu", "--volume-every", "0",
              "--refine", "--refine-step", "15", "--ab-initio-iterations", "3", "--ab-initio-halves"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli(["reconstruct", str(particles), "-o", str(full), *common, "--refine-rounds", "2"]) in FINISHED
    assert cli(["reconstruct", str(particles), "-o", str(cut), *common, "--refine-rounds", "1"]) in FINISHED
    assert (cut / "checkpoints" / "refine.pt").is_file()
    assert cli(["reconstruct", str(particles), "-o", str(cut), "--resume", "--refine-rounds", "2",
                "--quiet"]) in FINISHED
    records = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    starts = preset_config("tiny").refine.ab_initio_starts
    assert [(r["half"], r["start"], r["iteration"]) for r in records if r["kind"] == "ab_initio"] == [
        (h, k, i) for h in (1, 2) for k in range(starts) for i in range(3)]
    assert [r["round"] for r in records if r["kind"] == "refine"] == [0, 1]
    refine_times = [r["elapsed_s"] for r in records if r["kind"] == "refine"]
    assert refine_times[1] > refine_times[0]  # the stage's clock went on from the saved state
    assert np.allclose(open_mrc(cut / "volume.mrc", mmap=False).data, open_mrc(full / "volume.mrc", mmap=False).data,
                       atol=1e-6)
    resumed, uninterrupted = read_particles(cut / "poses.star"), read_particles(full / "poses.star")
    assert torch.allclose(resumed.pose.rotmat, uninterrupted.pose.rotmat, atol=1e-5)
    assert torch.allclose(resumed.pose.shift_angst, uninterrupted.pose.shift_angst, atol=1e-4)
    # --ab-initio-halves: each half set's own ab initio maps (each start's 3 iterations recorded), the
    # kept ones by search error on their half, and how far they agree — measured before the
    # interruption and still judged after it
    (seed,) = [r for r in records if r["kind"] == "refine_seed"]
    assert [len(e) for e in seed["search_error_ab_initio_starts"]] == [starts, starts]
    assert seed["ab_initio_start"] == [int(np.argmin(e)) for e in seed["search_error_ab_initio_starts"]]
    assert 2.0 <= seed["start_agreement_px"] <= 16 and seed["start_agreement_limit_px"] > 0
    for name in ("volume_abinitio_half1.mrc", "volume_abinitio_half2.mrc"):
        assert (cut / name).is_file()
    golds = [json.loads((d / "gold_standard.json").read_text()) for d in (cut, full)]
    if seed["chosen"] == "ab_initio":
        assert golds[0]["start_agreement_px"] == golds[1]["start_agreement_px"] == seed["start_agreement_px"]
    assert golds[0]["resolved"] == golds[1]["resolved"]
