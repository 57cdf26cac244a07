"""From a trained decoder to files: the real-space map (.mrc) and PNGs of it and of the loss.

:func:`decoder_volume` evaluates the decoder on the full centred 3D frequency grid in chunks
(:func:`cryoace.models.evaluate_grid`), zeroes everything beyond the Nyquist sphere (|k| > 0.5
cycles/px: the training slices never reach there, so the decoder's values are unconstrained), and
inverts with :func:`cryoace.physics.fourier.ifft3_centered` (DC at L//2 → real-space centre at L//2),
keeping the real part. Because the FFTs are unnormalized and the decoder models ``fft3_centered`` of
the map, the map's projections equal the (normalized) images the model was trained on.

The PNG helpers (:func:`plot_volume`, :func:`plot_loss`) and :func:`read_metrics` are
:mod:`cryoace.evaluate.plots`'s, re-exported.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# the generic plots and the metrics reader live in evaluate (the run report needs them and evaluate
# never imports train); re-exported here under their old names
from ..evaluate.plots import plot_loss, plot_volume, read_metrics
from ..io.mrc import write_mrc
from ..physics.fourier import circular_mask, ifft3_centered

__all__ = ["decoder_volume", "export_volume", "plot_volume", "plot_loss", "read_metrics"]


def decoder_volume(decoder: Callable[[torch.Tensor], torch.Tensor], size: int,
                   chunk: int = 2 ** 16) -> torch.Tensor:
    """The decoder's real-space map (size, size, size) float32 on the CPU, axes (z, y, x)."""
    from ..models import evaluate_grid

    was_training = getattr(decoder, "training", False)
    if isinstance(decoder, torch.nn.Module):
        decoder.eval()
    try:
        spectrum = evaluate_grid(decoder, size, chunk)
    finally:
        if isinstance(decoder, torch.nn.Module):
            decoder.train(was_training)
    inside = circular_mask(size, ndim=3, device=spectrum.device)
    spectrum = torch.where(inside, spectrum, torch.zeros_like(spectrum))
    return ifft3_centered(spectrum).real.float().cpu()


def export_volume(decoder, size: int, path: str | os.PathLike, voxel_size: float,
                  chunk: int = 2 ** 16) -> torch.Tensor:
    """Write the decoder's map to ``path`` (.mrc, atomically) with ``voxel_size`` Å; return the map."""
    volume = decoder_volume(decoder, size, chunk)
    write_mrc(path, volume.numpy(), float(voxel_size))
    return volume
