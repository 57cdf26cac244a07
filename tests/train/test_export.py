"""Export of a Fourier volume to a real-space map: a known volume round-trips exactly, with the voxel
size in the header; the Nyquist sphere bounds what is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoace.io.mrc import open_mrc
from cryoace.physics.forward import VoxelFourierVolume
from cryoace.physics.fourier import circular_mask, fft3_centered, ifft3_centered
from cryoace.train.export import decoder_volume, export_volume, plot_loss, plot_volume, read_metrics


def _band_limited(size: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(size, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return ifft3_centered(fft3_centered(v) * circular_mask(size, size / 2 - 1, 3)).real


def test_known_fourier_volume_round_trips_to_real_space(tmp_path):
    size = 16
    v = _band_limited(size)
    decoder = VoxelFourierVolume(fft3_centered(v))  # samples exactly on the grid
    out = decoder_volume(decoder, size, chunk=1000)  # chunked evaluation
    assert out.shape == (size,) * 3 and out.dtype == torch.float32
    assert torch.allclose(out.double(), v, atol=1e-5 * v.abs().max())
    export_volume(decoder, size, tmp_path / "map.mrc", voxel_size=2.5)
    mrc = open_mrc(tmp_path / "map.mrc", mmap=False)
    assert mrc.voxel_size == pytest.approx(2.5)
    np.testing.assert_allclose(mrc.data, out.numpy())


def test_values_beyond_nyquist_are_dropped():
    size = 16
    v = torch.randn(size, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spectrum = fft3_centered(v)
    out = decoder_volume(VoxelFourierVolume(spectrum), size)
    kept = fft3_centered(out.double())
    outside = ~circular_mask(size, size / 2, 3)
    assert kept[outside].abs().max() < 1e-3 * spectrum.abs().max()


def test_plots_write_pngs(tmp_path):
    import matplotlib.image

    plot_volume(_band_limited(16).float(), tmp_path / "v.png", voxel_size=1.5)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "step": 5, "loss": 1.0}\n{"kind": "train", "step": 10, "loss": 0.5}\n'
                       '{"kind": "rollback", "step": 10, "to_step": 5}\n{"kind": "train", "step": 10, "loss": 0.4}\n'
                       '{"kind": "tra')  # a line cut by a crash
    assert [r["loss"] for r in read_metrics(metrics)] == [1.0, 0.4]  # the re-run step wins
    plot_loss(metrics, tmp_path / "loss.png")
    for name in ("v.png", "loss.png"):
        assert matplotlib.image.imread(tmp_path / name).ndim == 3
