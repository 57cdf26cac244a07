"""Evaluation of reconstructions: Fourier shell correlation and its plots, alignment of an ab initio
result to ground truth (poses and map, both hands), pose metrics, and the comparison with the truth
that ``cryoace evaluate`` reports.

``evaluate`` reads outputs (maps, poses) and never imports ``train``. Plotting imports matplotlib
lazily, so importing this package stays cheap.
"""

from .align import RotationAlignment, align_rotations, transform_volume
from .fsc import DEFAULT_THRESHOLDS, FSCResult, Resolution, fsc
from .plots import plot_fsc
from .pose_metrics import RotationErrors, pose_coverage, rotation_errors, translation_error

__all__ = ["DEFAULT_THRESHOLDS", "FSCResult", "Resolution", "fsc", "plot_fsc", "RotationAlignment",
           "align_rotations", "transform_volume", "RotationErrors", "rotation_errors",
           "translation_error", "pose_coverage"]
