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
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEPS, RESUMED_STEPS, GLOBAL_BATCH = 4, 6, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on the loopback interface, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


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
    run = tmp_path / "run"
    proc = torchrun(["-m", "cryoace", "reconstruct", str(star), "-o", str(run), "--preset", "tiny",
                     "--steps", "4", "--batch-size", "8", "--log-every", "2", "--volume-every", "0",
                     "--device", "cpu", "--no-check-contrast", "--preload", "ram"], cwd=tmp_path)
    assert proc.stdout.count("trained 4 steps") == 2  # each rank reports; rank 0 wrote the files
    for name in ("config.yaml", "volume.mrc", "poses.star", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["kind"] == "train"] == [2, 4]


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
