"""Fast paths: bf16 autocast of the encoder alone (the decoder and the Fourier math stay float32),
channels_last encoder convolutions, and their device-dependent defaults."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cryoace.errors import CryoaceInputError
from cryoace.io.particles import ParticleDataset, read_particles
from cryoace.train.precision import resolve_channels_last, resolve_precision
from cryoace.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(simulated_adk):
    return ParticleDataset(read_particles(simulated_adk(n=16).star))


def tiny(**changes):
    from helpers import tiny_config

    return dataclasses.replace(tiny_config(steps=3, log_every=3), **changes)


def test_defaults_depend_on_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) is None and resolve_precision("auto", cuda) is torch.bfloat16
    assert resolve_precision("bf16", cpu) is torch.bfloat16 and resolve_precision("fp32", cuda) is None
    assert resolve_channels_last(None, cuda) and not resolve_channels_last(None, cpu)
    assert resolve_channels_last(True, cpu)
    with pytest.raises(CryoaceInputError):
        resolve_precision("fp16", cpu)


def _dtypes_seen(trainer) -> dict[str, torch.dtype]:
    """Output dtypes of the encoder's first convolution and of the decoder's network on one step."""
    seen = {}
    conv = next(m for m in trainer.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    hooks = [conv.register_forward_hook(lambda m, i, o: seen.setdefault("conv", o.dtype) and None),
             trainer.decoder.register_forward_hook(lambda m, i, o: seen.setdefault("decoder", o.dtype) and None)]
    trainer.train_step(trainer.dataset[list(range(8))])
    for h in hooks:
        h.remove()
    return seen


def test_bf16_autocast_on_cpu_trains_the_encoder_in_bf16_and_the_decoder_in_fp32(dataset, tmp_path):
    tr = Trainer(tiny(precision="bf16"), dataset, tmp_path, progress=False)
    assert _dtypes_seen(tr) == {"conv": torch.bfloat16, "decoder": torch.complex64}
    tr.fit()
    losses = [r["loss"] for r in tr.history if r["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in tr.params)  # master weights stay fp32
    fp32 = Trainer(tiny(precision="fp32"), dataset, tmp_path / "fp32", progress=False)
    assert _dtypes_seen(fp32)["conv"] == torch.float32


def test_channels_last_encoder_trains_like_the_default_layout(dataset, tmp_path):
    a = Trainer(tiny(channels_last=True), dataset, tmp_path / "a", progress=False)
    b = Trainer(tiny(channels_last=False), dataset, tmp_path / "b", progress=False)
    conv = next(m for m in a.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    a.fit()
    b.fit()
    for (k, x), y in zip(a.encoder.state_dict().items(), b.encoder.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_bf16_and_channels_last(dataset, tmp_path):
    tr = Trainer(tiny(device="cuda"), dataset, tmp_path, progress=False)
    assert tr.autocast_dtype is torch.bfloat16
    assert _dtypes_seen(tr) == {"conv": torch.bfloat16, "decoder": torch.complex64}
    tr.fit()
    assert all(math.isfinite(r["loss"]) for r in tr.history if r["kind"] == "train")
