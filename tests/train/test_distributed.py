"""Data-parallel training under torchrun (2 CPU processes, gloo): the result equals a single-process
run with the same global batch, the checkpoint resumes on another world size, rank 0 alone writes,
and ``torchrun -m cryoace reconstruct`` runs end to end.

BatchNorm: ``SyncBatchNorm`` refuses CPU tensors, so on gloo each rank normalizes with its own half
of the batch (see cryoace.train.distributed). The exact comparison therefore runs with BatchNorm on
running statistics (eval mode), where per-image gradients do not depend on the batch split.

This file is also the worker script: ``python -m torch.distributed.run ... test_distributed.py ARGS``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

STEPS, RESUMED_STEPS, GLOBAL_BATCH = 4, 6, 8


def config(steps: int):
    from cryoace.train.config import preset_config

    cfg = preset_config("tiny")
    return dataclasses.replace(cfg, batch_size=GLOBAL_BATCH, steps=steps, log_every=2, checkpoint_every=2,
                               volume_every=0, device="cpu", keep_checkpoints=5)


def freeze_batchnorm(module: torch.nn.Module) -> None:
    """BatchNorm on running statistics even in ``train()`` (the batch-split-independent mode)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, m=m: m  # Trainer.train_step calls encoder.train()


def params(state: dict) -> dict[str, torch.Tensor]:
    return {**{f"encoder.{k}": v for k, v in state["encoder"].items()},
            **{f"decoder.{k}": v for k, v in state["decoder"].items()}}


def trainer(star: Path, run_dir: Path, steps: int):
    from cryoace.io.particles import ParticleDataset, read_particles
    from cryoace.train.trainer import Trainer

    tr = Trainer(config(steps), ParticleDataset(read_particles(star)), run_dir, progress=False)
    freeze_batchnorm(tr.encoder)
    return tr


def worker(star: str, run_dir: str) -> None:
    """One torchrun rank: train STEPS steps into the shared run_dir."""
    from cryoace.train import distributed

    context = distributed.init_distributed("cpu")
    assert context.world_size == 2
    torch.set_num_threads(1)
    tr = trainer(Path(star), Path(run_dir), STEPS)
    assert tr.dist.rank == context.rank
    tr.fit()
    distributed.cleanup()


@pytest.fixture(scope="module")
def star(simulated_adk) -> Path:
    return simulated_adk(n=32).star


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_processes_equal_one_with_the_same_global_batch_and_resume_on_one(star, tmp_path, one_thread):
    from cryoace.train.trainer import load_checkpoint_file

    from helpers import torchrun  # (not at the top: this file is also the workers' script)

    torchrun([__file__, str(star), str(tmp_path / "ddp")], cwd=tmp_path)
    ddp = load_checkpoint_file(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ddp["step"] == STEPS

    single = trainer(star, tmp_path / "single", RESUMED_STEPS)
    single.fit()
    reference = load_checkpoint_file(tmp_path / "single" / "checkpoints" / f"step_{STEPS:06d}.pt")
    assert_close(params(ddp), params(reference))
    # rank 0 alone logged: one record per log step, with the mean loss over the ranks
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    ref_train = [r for r in single.history if r["kind"] == "train"][:2]
    for r, s in zip(train, ref_train, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4)

    # the 2-process checkpoint resumes in one process and ends where the one-process run did
    resumed = trainer(star, tmp_path / "ddp", RESUMED_STEPS)
    resumed.load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    resumed.fit()
    assert_close(params(resumed.state_dict()), params(single.state_dict()))


def test_torchrun_m_cryoace_reconstruct(star, tmp_path):
    from helpers import torchrun

    run = tmp_path / "run"
    proc = torchrun(["-m", "cryoace", "reconstruct", str(star), "-o", str(run), "--preset", "tiny",
                     "--steps", "4", "--batch-size", "8", "--log-every", "2", "--volume-every", "0",
                     "--device", "cpu", "--no-check-contrast", "--preload", "ram"], cwd=tmp_path)
    assert proc.stdout.count("trained 4 steps") == 2  # each rank reports; rank 0 wrote the files
    for name in ("config.yaml", "volume.mrc", "poses.star", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["kind"] == "train"] == [2, 4]


def test_torchrun_m_cryoace_refine_equals_one_process(star, tmp_path):
    """``cryoace refine`` (new particles against a run's half maps) split over 2 processes: each
    predicts and searches every other particle, the Fourier sums and poses are summed — the same
    poses.star and maps as one process (up to the order of the float sums)."""
    import numpy as np

    from cryoace.cli.main import main as cli
    from cryoace.io.mrc import read_volume
    from cryoace.io.particles import read_particles

    from helpers import torchrun

    run = tmp_path / "run"
    assert cli(["reconstruct", str(star), "-o", str(run), "--preset", "tiny", "--steps", "2", "--device", "cpu",
                "--quiet", "--refine", "--refine-rounds", "1", "--refine-step", "30", "--no-ab-initio",
                "--no-check-contrast"]) in (0, 4)
    status = cli(["refine", str(run), str(star), "-o", str(tmp_path / "one"), "--device", "cpu", "--quiet"])
    assert status in (0, 4)  # (32 particles and 2 training steps: the verdict may be NOT RESOLVED)
    proc = torchrun(["-m", "cryoace", "refine", str(run), str(star), "-o", str(tmp_path / "two"), "--device", "cpu",
                     "--quiet"], cwd=tmp_path, timeout=300, worker_exits=(status,))
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes
    one, two = read_particles(tmp_path / "one" / "poses.star"), read_particles(tmp_path / "two" / "poses.star")
    assert torch.allclose(one.pose.rotmat, two.pose.rotmat, atol=1e-5)
    assert torch.allclose(one.pose.shift_angst, two.pose.shift_angst, atol=1e-4)
    for column in ("rlnRandomSubset", "cryoacePoseConfidence", "cryoacePoseScore"):
        assert np.allclose(one.extra_column(column), two.extra_column(column), atol=1e-5, equal_nan=True), column
    for name in ("volume.mrc", "volume_half1.mrc", "volume_half2.mrc"):
        a, b = read_volume(tmp_path / "one" / name).data, read_volume(tmp_path / "two" / name).data
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()), name


def test_torchrun_reconstruct_shares_the_final_pass(star, tmp_path):
    """``torchrun -m cryoace reconstruct --refine --refine-subset 16 --teach-encoder 2s`` on 32
    particles: rank 0 refines the subset and teaches an encoder from its map, both ranks pose their
    particles with it and search the other 16 (every other one each), calibrated together, and
    poses.star equals what one process's final pass gives from the same rounds (checkpoints/refine.pt)
    and encoder."""
    import numpy as np

    from cryoace.evaluate.fsc import fsc
    from cryoace.evaluate.plots import read_metrics
    from cryoace.io.particles import read_particles
    from cryoace.pipeline.refine_stage import (
        TAUGHT_ENCODER,
        encoder_starts,
        half_sets_of,
        rounds_subset,
        stage_settings,
    )
    from cryoace.reconstruct.refine import RefineResult, extend_refinement
    from cryoace.train.predict import load_run, open_particles
    from cryoace.train.teach import load_taught_encoder
    from cryoace.types import Pose

    from helpers import torchrun

    run = tmp_path / "run"
    args = ["-m", "cryoace", "reconstruct", str(star), "-o", str(run), "--preset", "tiny", "--steps", "4",
            "--batch-size", "8", "--volume-every", "0", "--device", "cpu", "--no-check-contrast", "--refine",
            "--refine-rounds", "1", "--refine-step", "30", "--no-ab-initio", "--refine-subset", "16",
            "--teach-encoder", "2s"]
    # (4 training steps and one round on 16 particles: the verdict may honestly be NOT RESOLVED)
    proc = torchrun(args, cwd=tmp_path, timeout=300, worker_exits=(0, 4))
    assert "shared by 2 processes" in proc.stderr + proc.stdout
    (record,) = read_metrics(run / "metrics.jsonl", kind="refine_all")
    assert record["particles"] == 32 and record["searched"] == 16
    # one process's final pass from the same rounds
    trained = load_run(run)
    table = read_particles(star)
    dataset = open_particles(star, trained.data, table=table)
    saved = torch.load(run / "checkpoints" / "refine.pt", weights_only=True)
    halves = half_sets_of(table, len(table), trained.config.seed)
    rows, sub_halves = rounds_subset(halves, 16, trained.config.seed)
    rounds = RefineResult(pose=Pose(saved["rotmat"], saved["shift_angst"]), volume=saved["volume"], rounds=[],
                          half_volumes=saved["half_volumes"], half_rows=(rows[sub_halves[0]], rows[sub_halves[1]]),
                          confidence=saved["confidence"], start_resolution_px=trained.config.refine.start_resolution_px,
                          half_map_fsc=fsc(saved["half_volumes"][0], saved["half_volumes"][1]), rows=rows)
    # the encoder taught from the rounds' map (rank 0 sent it to rank 1) gives the final pass's starts
    taught = load_taught_encoder(run / TAUGHT_ENCODER)
    starts = encoder_starts(lambda rows: taught.predict_particles(dataset.subset(rows)), len(table), None)
    alone = extend_refinement(dataset, rounds, np.arange(len(table)), halves, stage_settings(trained.config),
                              progress=False, initial=starts)
    assert record["local_first"] == alone.local_first.to_dict()
    posed = read_particles(run / "poses.star")
    assert torch.allclose(posed.pose.rotmat, alone.pose.rotmat, atol=1e-4)
    assert np.allclose(posed.extra_column("cryoacePoseConfidence"), alone.confidence.numpy(), atol=1e-6,
                       equal_nan=True)
    assert np.allclose(posed.extra_column("cryoacePoseScore"), alone.score.numpy(), atol=1e-4)


def test_global_batch_must_split_evenly():
    from cryoace.errors import CryoaceInputError
    from cryoace.train.distributed import DistContext

    ctx = DistContext(world_size=4, rank=1)
    assert list(ctx.shard(torch.arange(8).numpy())) == [2, 3]
    with pytest.raises(CryoaceInputError, match="multiple of 4"):
        ctx.per_rank_batch(6)
    assert DistContext().shard(torch.arange(3).numpy()).tolist() == [0, 1, 2]


if __name__ == "__main__":
    worker(*sys.argv[1:])
