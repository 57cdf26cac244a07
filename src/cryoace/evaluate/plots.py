"""Plots of evaluation results (PNG). matplotlib is imported lazily, inside each function, and drawn
with the Agg canvas directly (no pyplot, no global backend state), so this module is cheap to import
and safe on headless machines. Files are written atomically.
"""

from __future__ import annotations

import os
from typing import Mapping

from ..io.atomic import atomic_path
from .fsc import DEFAULT_THRESHOLDS, FSCResult

__all__ = ["plot_fsc"]


def _format_resolution(res, in_angstrom: bool) -> str:
    value = res.angstrom if in_angstrom else res.px
    unit = "Å" if in_angstrom else "px"
    prefix = "" if res.crossed else "≤"
    return f"{prefix}{value:.2f} {unit}"


def plot_fsc(results: Mapping[str, FSCResult] | FSCResult, path: str | os.PathLike,
             thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, title: str | None = None,
             dpi: int = 120) -> None:
    """Plot one or several FSC curves to a PNG at ``path`` (written atomically).

    results    : an :class:`FSCResult`, or a dict ``label -> FSCResult`` for several curves.
    thresholds : horizontal threshold lines; each curve's legend entry lists its resolution at each
                 (``≤`` marks a curve that never drops below, i.e. resolution at Nyquist or better).
    The x-axis is spatial frequency in 1/Å when every result knows its voxel size, else in cycles/px;
    the top axis labels the same ticks with the resolution (Å or px, = 1/frequency).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(results, FSCResult):
        results = {"FSC": results}
    if not results:
        raise ValueError("plot_fsc needs at least one FSCResult")
    in_angstrom = all(r.voxel_size for r in results.values())

    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
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

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
