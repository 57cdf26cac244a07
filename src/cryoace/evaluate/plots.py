"""Plots of runs and evaluation results (PNG): FSC curves, loss curves, maps (central slices and
projections), viewing-direction coverage and resolution over time, and the reader of a run's
``metrics.jsonl``.

matplotlib is imported lazily, inside each function, and drawn with the Agg canvas directly (no
pyplot, no global backend state), so this module is cheap to import and safe on headless machines.
Every plot goes to a path (written atomically) or to a binary file object (e.g. ``io.BytesIO``, for
images embedded in the run report).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..io.atomic import atomic_path
from .fsc import DEFAULT_THRESHOLDS, FSCResult

__all__ = ["plot_fsc", "plot_loss", "plot_volume", "plot_viewing_directions", "plot_resolution_history",
           "plot_refinement", "read_metrics"]

def _save_png(fig, target, dpi: int) -> None:
    """Write ``fig`` as PNG to a path (atomically) or into a binary file object."""
    if hasattr(target, "write"):
        fig.savefig(target, dpi=dpi, format="png")
        return
    with atomic_path(Path(target)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def _figure(width_in: float, height_in: float):
    """A constrained-layout figure on an Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _format_resolution(res, in_angstrom: bool) -> str:
    value = res.angstrom if in_angstrom else res.px
    unit = "Å" if in_angstrom else "px"
    prefix = "" if res.crossed else "≤"
    return f"{prefix}{value:.2f} {unit}"


def plot_fsc(results: Mapping[str, FSCResult] | FSCResult, path: str | os.PathLike | BinaryIO,
             thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, title: str | None = None,
             dpi: int = 120) -> None:
    """Plot one or several FSC curves to a PNG at ``path`` (written atomically, or a binary file).

    results    : an :class:`FSCResult`, or a dict ``label -> FSCResult`` for several curves.
    thresholds : horizontal threshold lines; each curve's legend entry lists its resolution at each
                 (``≤`` marks a curve that never drops below, i.e. resolution at Nyquist or better).
    The x-axis is spatial frequency in 1/Å when every result knows its voxel size, else in cycles/px;
    the top axis labels the same ticks with the resolution (Å or px, = 1/frequency).
    """
    if isinstance(results, FSCResult):
        results = {"FSC": results}
    if not results:
        raise ValueError("plot_fsc needs at least one FSCResult")
    in_angstrom = all(r.voxel_size for r in results.values())

    fig = _figure(7.0, 4.5)
    ax = fig.add_subplot()
    x_max = 0.0
    colors = [f"C{i}" for i in range(10)]
    for i, (label, result) in enumerate(results.items()):
        x = result.freq_per_angstrom if in_angstrom else result.freq_cyc_px
        color = colors[i % len(colors)]
        res_text = ", ".join(f"{t:g}: {_format_resolution(result.resolution(t), in_angstrom)}"
                             for t in thresholds)
        ax.plot(x, result.curve, color=color, lw=1.6, label=f"{label} ({res_text})")
        for t in thresholds:
            res = result.resolution(t)
            if res.crossed:
                xr = res.freq_cyc_px / result.voxel_size if in_angstrom else res.freq_cyc_px
                ax.axvline(xr, color=color, ls=":", lw=0.8)
        x_max = max(x_max, float(x[-1]))
    for t in thresholds:
        ax.axhline(t, color="0.35", ls="--", lw=0.9)
        ax.annotate(f"{t:g}", xy=(1.0, t), xycoords=("axes fraction", "data"),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                    color="0.35", annotation_clip=False)
    ax.axhline(0.0, color="0.8", lw=0.6)
    ax.set_xlim(0.0, x_max)
    y_min = min(float(min(r.curve.min() for r in results.values())), 0.0)
    ax.set_ylim(max(y_min - 0.05, -1.05), 1.05)
    ax.set_xlabel("spatial frequency (1/Å)" if in_angstrom else "spatial frequency (cycles/px)")
    ax.set_ylabel("FSC")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)

    # top axis: the same tick positions, labelled with the resolution 1/frequency
    top = ax.secondary_xaxis("top", functions=(lambda v: v, lambda v: v))
    ticks = [float(t) for t in ax.get_xticks() if 0.0 < t <= x_max * (1 + 1e-9)]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1.0 / t:.3g}" for t in ticks])
    top.set_xlabel("resolution (Å)" if in_angstrom else "resolution (px)")
    if title:
        fig.suptitle(title)
    _save_png(fig, path, dpi)


# ---------------------------------------------------------------------------------------------
# Runs: metrics, loss, maps, poses
# ---------------------------------------------------------------------------------------------

def read_metrics(path: str | os.PathLike, kind: str = "train") -> list[dict]:
    """The ``metrics.jsonl`` records of one ``kind`` ("train": the loss records; "halves": half-map
    FSCs; "rollback"; "refine": one per refinement round, "ab_initio": one per iteration of each
    start of each half set, all at the last training step; "teach": one per measurement of the encoder
    taught from the map, its optimizer step as ``iteration``; "stage": one per stage of the run, with
    its start ``started_s``), sorted by step (and half set, start, round or iteration, and start time).
    Where a step (and round) was logged twice (a rollback or resume re-ran it), the later record
    wins. A missing file gives ``[]``; a line cut by a crash is skipped."""
    by_step: dict[tuple[int, int, int, int, float], dict] = {}
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
                continue
            if isinstance(rec, dict) and rec.get("kind") == kind and "step" in rec:
                by_step[int(rec["step"]), int(rec.get("half", 0)), int(rec.get("start", 0)),
                        int(rec.get("round", rec.get("iteration", 0))), float(rec.get("started_s", 0.0))] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics_path: str | os.PathLike, path: str | os.PathLike | BinaryIO, dpi: int = 100) -> None:
    """PNG of the training loss (log scale) against steps, from ``metrics.jsonl``."""
    records = read_metrics(metrics_path)
    fig = _figure(7.0, 4.2)
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
    _save_png(fig, path, dpi)


def plot_volume(volume, path: str | os.PathLike | BinaryIO, voxel_size: float | None = None,
                title: str | None = None, dpi: int = 100) -> None:
    """PNG of a map's (z, y, x) three central slices (top row) and three projections (bottom row);
    ``volume`` is a tensor or array, ``voxel_size`` in Å (for the title)."""
    v = np.asarray(volume.numpy() if hasattr(volume, "numpy") else volume, dtype=np.float32)
    c = v.shape[0] // 2
    slices = [("central slice z (xy)", v[c]), ("central slice y (xz)", v[:, c]),
              ("central slice x (yz)", v[:, :, c])]
    projections = [("projection along z", v.sum(0)), ("projection along y", v.sum(1)),
                   ("projection along x", v.sum(2))]
    fig = _figure(9.0, 6.4)
    axes = fig.subplots(2, 3)
    for ax, (label, img) in zip(axes.ravel(), slices + projections, strict=True):
        ax.imshow(img, cmap="gray", origin="lower")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    suffix = f", {voxel_size:.4g} Å/voxel" if voxel_size else ""
    fig.suptitle(title or f"map {v.shape[0]}³{suffix}", fontsize=10)
    _save_png(fig, path, dpi)


def plot_viewing_directions(rotmat, path: str | os.PathLike | BinaryIO, title: str | None = None,
                            dpi: int = 100) -> None:
    """PNG of where poses look from: a Mollweide (equal-area) histogram of the viewing directions
    (:func:`~cryoace.evaluate.pose_metrics.viewing_directions`, volume frame; longitude
    atan2(y, x), latitude asin(z)). ``rotmat`` (N, 3, 3). Bins are equal in longitude and in
    sin(latitude), hence of equal area: colour ∝ density of views, white = never seen; there are
    about N/20 of them (between 6 × 12 and 36 × 72), so uniform poses give a readable map. The title
    gives the coverage (:func:`~cryoace.evaluate.pose_metrics.pose_coverage`) and what N uniform
    poses would reach."""
    from .pose_metrics import DEFAULT_COVERAGE_BINS, expected_uniform_coverage, pose_coverage, viewing_directions

    d = viewing_directions(rotmat).cpu().numpy()
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    lon = np.arctan2(d[:, 1], d[:, 0])
    sin_lat = np.clip(d[:, 2], -1.0, 1.0)
    n = len(d)
    n_lat = int(np.clip(round(math.sqrt(n / 40)), 6, 36))  # 2·n_lat² cells ≈ n / 20
    lon_edges = np.linspace(-math.pi, math.pi, 2 * n_lat + 1)
    sin_edges = np.linspace(-1.0, 1.0, n_lat + 1)          # equal area per band
    counts, _, _ = np.histogram2d(lon, sin_lat, bins=(lon_edges, sin_edges))
    fig = _figure(8.0, 4.6)
    ax = fig.add_subplot(projection="mollweide")
    masked = np.ma.masked_equal(counts.T, 0)
    mesh = ax.pcolormesh(lon_edges, np.arcsin(sin_edges), masked, cmap="viridis", shading="flat",
                         vmin=0, vmax=max(1.0, float(counts.max())))
    fig.colorbar(mesh, ax=ax, shrink=0.7, label="particles per cell")
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
    cov, uniform = pose_coverage(rotmat), expected_uniform_coverage(n)
    fig.suptitle(title or f"viewing directions of {n:,} poses: coverage {cov:.3f} of "
                 f"{DEFAULT_COVERAGE_BINS} equal-area cells (uniform poses: {uniform:.3f})", fontsize=10)
    _save_png(fig, path, dpi)


def plot_pose_confidence(confidence, path: str | os.PathLike | BinaryIO, dpi: int = 100) -> None:
    """PNG histogram of the particles' pose confidences (poses.star ``cryoacePoseConfidence``, in
    [0, 1]: the fraction of a particle's best rotations near the best one; near 1 when its pose is
    determined, near 1/candidates when its best matches are scattered over SO(3)). NaN values — poses
    kept from a local search, which measures no confidence — are counted in the title, not drawn."""
    values = np.asarray(confidence, dtype=np.float64)
    unmeasured = int(np.isnan(values).sum())
    values = np.clip(values[~np.isnan(values)], 0.0, 1.0)
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    ax.hist(values, bins=np.linspace(0.0, 1.0, 21), color="#4477aa", edgecolor="white")
    ax.set_xlabel("pose confidence (fraction of the best rotations near the best one)")
    ax.set_ylabel("particles")
    ax.set_xlim(0.0, 1.0)
    title = (f"pose confidence of {len(values):,} particles: median {np.median(values):.2f}, "
             f"{100 * np.mean(values < 0.3):.0f} % below 0.3 (unresolved)" if len(values) else "no pose confidence")
    if unmeasured:
        title += f"\n({unmeasured:,} more kept from a local search: not measured)"
    ax.set_title(title, fontsize=10)
    _save_png(fig, path, dpi)


def plot_resolution_history(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                            path: str | os.PathLike | BinaryIO, xlabel: str = "training time (min)",
                            dpi: int = 100) -> None:
    """PNG of resolution (Å, lower is better: the axis points down) against time or step, one line
    per ``label -> (x, resolution_angst)``."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    for i, (label, (x, res)) in enumerate(series.items()):
        ax.plot(np.asarray(x, dtype=np.float64), np.asarray(res, dtype=np.float64), "o-", ms=3, lw=1.4,
                color=f"C{i % 10}", label=label)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("resolution (Å)")
    ax.grid(alpha=0.25)
    if series:
        ax.legend(loc="best", fontsize=8)
    _save_png(fig, path, dpi)


def plot_refinement(records: Sequence[Mapping], path: str | os.PathLike | BinaryIO, dpi: int = 100) -> None:
    """PNG of a projection-matching refinement, from its ``refine`` metrics records: the median angle
    the poses moved per round (convergence, no ground truth needed) and, when the records have them,
    the median rotation error against the particle file's poses."""
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    rounds = [int(r["round"]) + 1 for r in records]
    moved = [(k, r["pose_change_median_deg"]) for k, r in zip(rounds, records, strict=True)
             if r.get("pose_change_median_deg") is not None]
    if moved:
        ax.plot(*zip(*moved, strict=True), "o-", ms=3, lw=1.4, color="C0",
                label="pose change since last round (median)")
    truth = [(k, r["rot_median_deg"]) for k, r in zip(rounds, records, strict=True)
             if r.get("rot_median_deg") is not None]
    if truth:
        ax.plot(*zip(*truth, strict=True), "s-", ms=3, lw=1.4, color="C3", label="error vs the file's poses (median)")
    if moved or truth:
        ax.set_yscale("log")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("refinement round")
    ax.set_ylabel("angle (°)")
    ax.grid(alpha=0.25, which="both")
    _save_png(fig, path, dpi)
