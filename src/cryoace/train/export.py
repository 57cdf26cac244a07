"""From a trained decoder to files: the real-space map (.mrc) and PNGs of it and of the loss.

:func:`decoder_volume` evaluates the decoder on the full centred 3D frequency grid in chunks
(:func:`cryoace.models.evaluate_grid`), zeroes everything beyond the Nyquist sphere (|k| > 0.5
cycles/px: the training slices never reach there, so the decoder's values are unconstrained), and
inverts with :func:`cryoace.physics.fourier.ifft3_centered` (DC at L//2 → real-space centre at L//2),
keeping the real part. Because the FFTs are unnormalized and the decoder models ``fft3_centered`` of
the map, the map's projections equal the (normalized) images the model was trained on.

matplotlib is imported lazily and drawn on an Agg canvas (no pyplot); files are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io.atomic import atomic_path
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


def plot_volume(volume: torch.Tensor | np.ndarray, path: str | os.PathLike, voxel_size: float | None = None,
                title: str | None = None, dpi: int = 100) -> None:
    """PNG of a map's three central slices (top row) and three projections (bottom row)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v = np.asarray(volume.numpy() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    c = v.shape[0] // 2
    slices = [("central slice z (xy)", v[c]), ("central slice y (xz)", v[:, c]),
              ("central slice x (yz)", v[:, :, c])]
    projections = [("projection along z", v.sum(0)), ("projection along y", v.sum(1)),
                   ("projection along x", v.sum(2))]
    fig = Figure(figsize=(9.0, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, (label, img) in zip(axes.ravel(), slices + projections):
        ax.imshow(img, cmap="gray", origin="lower")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    suffix = f", {voxel_size:.4g} Å/voxel" if voxel_size else ""
    fig.suptitle(title or f"map {v.shape[0]}³{suffix}", fontsize=10)
    _save(fig, path, dpi)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The ``metrics.jsonl`` loss records (``"kind": "train"``), one per step: where a step was logged
    twice (a rollback or resume re-ran it), the later record wins."""
    by_step: dict[int, dict] = {}
    path = Path(path)
    if not path.is_file():
        return []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("kind") == "train":
                by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics_path: str | os.PathLike, path: str | os.PathLike, dpi: int = 100) -> None:
    """PNG of the training loss (log scale) against steps, from ``metrics.jsonl``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if records:
        steps = np.array([r["step"] for r in records])
        loss = np.array([r["loss"] for r in records], dtype=np.float64)
        ax.plot(steps, loss, lw=1.4, color="C0", label="training loss")
        if np.all(loss[np.isfinite(loss)] > 0):
            ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean squared error per pixel)")
    ax.grid(alpha=0.25, which="both")
    _save(fig, path, dpi)


def _save(fig, path, dpi: int) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
