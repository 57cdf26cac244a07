"""--preload: in-memory batches equal the lazily read ones; ``auto`` picks GPU, RAM or disk from the
free memory; the prefetch thread yields the same batches in order and passes errors on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.io.preload import PreloadedDataset, choose_preload, dataset_nbytes, prefetch, prepare_dataset

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GiB = 2 ** 30


@pytest.fixture(scope="module")
def dataset(simulated_adk) -> ParticleDataset:
    sim = simulated_adk(n=24)
    return ParticleDataset(read_particles(sim.star), downsample=16, invert_contrast=True)


def assert_same_batch(a, b) -> None:
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if dataclasses.is_dataclass(x):
            assert_same_batch(x, y)
        elif x is None:
            assert y is None
        else:
            assert torch.equal(x.cpu(), y.cpu()), field.name


def test_ram_preload_gives_identical_batches(dataset):
    pre = prepare_dataset(dataset, "ram", CPU)
    assert isinstance(pre, PreloadedDataset) and pre.images.shape == (24, 16, 16)
    assert (pre.image_size, pre.pixel_size, pre.norm_std, len(pre)) == \
        (dataset.image_size, dataset.pixel_size, dataset.norm_std, len(dataset))
    rows = np.random.default_rng(0).permutation(24)[:10]
    assert_same_batch(pre[rows], dataset[rows])
    assert_same_batch(pre[3], dataset[3])
    for a, b in zip(pre.batches(7), dataset.batches(7), strict=True):
        assert_same_batch(a, b)
    assert prepare_dataset(dataset, "none", CPU) is dataset


def test_auto_chooses_from_free_memory():
    n = GiB
    assert choose_preload("auto", n, CUDA, free_gpu=4 * GiB, available_ram=0) == "gpu"
    assert choose_preload("auto", n, CUDA, free_gpu=GiB, available_ram=4 * GiB) == "ram"  # GPU: half is for work
    assert choose_preload("auto", n, CUDA, free_gpu=0, available_ram=GiB) == "none"
    assert choose_preload("auto", n, CUDA, free_gpu=0, available_ram=4 * GiB, local_world_size=4) == "none"  # per rank
    # on a CPU reading a batch costs little beside a step: memory stays flat in the number of particles
    assert choose_preload("auto", n, CPU, available_ram=4 * GiB) == "none"
    assert choose_preload("auto", 1000, CPU, available_ram=10 ** 12) == "none"
    assert choose_preload("ram", n, CPU, available_ram=0) == "ram"  # explicit choices are obeyed
    with pytest.raises(CryoaceInputError, match="needs a CUDA device"):
        choose_preload("gpu", n, CPU)
    with pytest.raises(CryoaceInputError, match="--preload"):
        choose_preload("disk", n, CPU)


def test_auto_uses_the_machine_memory(dataset, monkeypatch):
    import cryoace.io.preload as preload

    assert dataset_nbytes(dataset) == 24 * 16 * 16 * 4
    monkeypatch.setattr(preload, "free_gpu_bytes", lambda device: 0)
    monkeypatch.setattr(preload, "available_ram_bytes", lambda: 10 ** 12)
    assert choose_preload("auto", dataset_nbytes(dataset), CUDA) == "ram"
    monkeypatch.setattr(preload, "available_ram_bytes", lambda: 1000)
    assert choose_preload("auto", dataset_nbytes(dataset), CUDA) == "none"
    assert prepare_dataset(dataset, "auto", CPU) is dataset


def test_prefetch_keeps_order_and_passes_errors_on():
    assert list(prefetch(iter(range(20)), depth=3)) == list(range(20))

    def broken():
        yield 1
        raise CryoaceInputError("bad image")

    with pytest.raises(CryoaceInputError, match="bad image"):
        list(prefetch(broken()))
    endless = prefetch(iter(range(10 ** 9)))
    assert next(endless) == 0
    endless.close()  # stops and joins the thread


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_preload_gives_identical_batches(dataset):
    pre = prepare_dataset(dataset, "gpu", CUDA)
    assert pre.images.is_cuda
    rows = np.arange(5, 17)
    batch = pre[rows]
    assert batch.images.is_cuda
    assert_same_batch(batch, dataset[rows])
