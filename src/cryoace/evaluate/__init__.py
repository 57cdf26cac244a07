"""Evaluation of reconstructions: Fourier shell correlation and its plots.

``evaluate`` reads outputs (maps, poses) and never imports ``train``. Plotting imports matplotlib
lazily, so importing this package stays cheap.
"""

from .fsc import DEFAULT_THRESHOLDS, FSCResult, Resolution, fsc
from .plots import plot_fsc

__all__ = ["DEFAULT_THRESHOLDS", "FSCResult", "Resolution", "fsc", "plot_fsc"]
