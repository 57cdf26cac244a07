"""Evaluation of a reconstruction against ground truth: predicted poses vs true poses, and the
predicted map vs the true map after the same alignment (what ``cryoace evaluate`` reports).

* :func:`match_particles` pairs rows of a predicted pose file with the truth by image name.
* :func:`evaluate_poses` aligns rotations (both hands, :func:`~cryoace.evaluate.align.align_rotations`)
  and computes rotation / translation errors and pose coverage (:mod:`~cryoace.evaluate.pose_metrics`).
* :func:`compare_maps` carries the predicted map into the truth's frame with that alignment, removes a
  global translation found by cross-correlation (an ab initio map is defined up to one: the
  predicted shifts absorb it), and computes the FSC.

Shifts are compared in pixels of the *truth* file (Å / its pixel size), whatever box the run used.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import CryoaceInputError
from ..io.particles import ParticleTable
from ..physics.fourier import fourier_crop
from ..physics.rotations import rotmat_to_axis_angle
from .align import RotationAlignment, align_rotations, estimate_volume_offset, shift_volume, transform_volume
from .fsc import DEFAULT_THRESHOLDS, FSCResult, fsc
from .pose_metrics import (
    DEFAULT_COVERAGE_BINS,
    RotationErrors,
    expected_uniform_coverage,
    fit_global_offset,
    pose_coverage,
    rotation_errors,
    translation_error,
)

__all__ = ["ParticleMatch", "match_particles", "PoseEvaluation", "evaluate_poses", "MapComparison",
           "compare_maps", "fourier_crop_volume"]

#: relative tolerance on voxel sizes / physical box sizes that must agree
SIZE_RTOL = 1e-3


@dataclasses.dataclass(frozen=True)
class ParticleMatch:
    """Row pairing: predicted row ``pred[i]`` is the particle of truth row ``truth[i]``.

    how : ``"image name"`` (same stack file and index), ``"image name (file basename)"`` (same stack
          file name and index, directories differ) or ``"row order"`` (fallback, same counts).
    """

    pred: np.ndarray
    truth: np.ndarray
    how: str


def _keys(table: ParticleTable, basename: bool) -> pd.Index | None:
    if table.image_paths is None:
        return None
    paths = pd.Series(table.image_paths, dtype=object).astype(str)
    if basename:
        paths = paths.map(os.path.basename)
    else:
        paths = paths.map(os.path.normpath)
    return pd.Index(pd.Series(table.image_indices).astype(str) + "@" + paths)


def match_particles(pred: ParticleTable, truth: ParticleTable) -> ParticleMatch:
    """Pair predicted rows with truth rows by image (``rlnImageName``: stack path and index).

    Every predicted row must find exactly one truth row (the truth may hold more particles). Tried
    in turn: the full stack path, then the stack's file name only; failing both, rows are paired in
    order when the counts are equal (with a warning if the files had names that did not match).
    Raises :class:`CryoaceInputError` when none of these works.
    """
    named = pred.image_paths is not None and truth.image_paths is not None
    if named:
        for basename, how in ((False, "image name"), (True, "image name (file basename)")):
            kp, kt = _keys(pred, basename), _keys(truth, basename)
            if not kt.is_unique or not kp.is_unique:
                continue
            pos = kt.get_indexer(kp)
            if (pos >= 0).all():
                return ParticleMatch(pred=np.arange(len(pred)), truth=pos.astype(np.int64), how=how)
    if len(pred) == len(truth):
        if named:
            warnings.warn("image names of the predicted poses do not match the truth's; pairing rows "
                          "in file order", stacklevel=2)
        n = len(pred)
        return ParticleMatch(pred=np.arange(n), truth=np.arange(n), how="row order")
    why = ("their image names (rlnImageName) do not all match" if named
           else "one of the files has no image names (rlnImageName)")
    raise CryoaceInputError(f"cannot pair the {len(pred)} predicted particles with the {len(truth)} true "
                            f"ones: {why}, and the counts differ", pred.source)


@dataclasses.dataclass
class PoseEvaluation:
    """Predicted poses against the truth (see :func:`evaluate_poses`)."""

    n_particles: int
    matched_by: str
    alignment: RotationAlignment
    errors: RotationErrors
    translation_mean_sq_px: float
    global_offset_px: torch.Tensor
    translation_mean_sq_px_after_offset: float
    coverage_bins: int
    coverage_pred: float
    coverage_truth: float
    coverage_uniform: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain floats, lists, bools)."""
        g = self.alignment.rotation
        rotvec = rotmat_to_axis_angle(g)
        angle = float(torch.linalg.vector_norm(rotvec))
        axis = (rotvec / angle).tolist() if angle > 1e-12 else [0.0, 0.0, 1.0]
        return {
            "n_particles": int(self.n_particles),
            "matched_by": self.matched_by,
            "alignment": {
                "hand": self.alignment.hand,
                "flip_hand": bool(self.alignment.flip_hand),
                "mirror": "diag(1, 1, -1): (x, y, z) -> (x, y, -z)",
                "rotation": [[float(v) for v in row] for row in g.tolist()],
                "rotation_angle_deg": float(np.degrees(angle)),
                "rotation_axis": [float(v) for v in axis],
                "convention": "R_gt ~ H R_pred H G (H = mirror if flip_hand else I); aligned map(r) = "
                              "predicted map(H G r), r = (x, y, z) voxels from index L//2",
                "mean_sq_frobenius": float(self.alignment.mean_sq_frobenius),
                "mean_sq_frobenius_other_hand": float(self.alignment.mean_sq_frobenius_other_hand),
            },
            "rotation_error": self.errors.to_dict(),
            "translation_error": {
                "mean_sq_px": float(self.translation_mean_sq_px),
                "rms_px": float(np.sqrt(self.translation_mean_sq_px)),
                "global_offset_px": [float(v) for v in self.global_offset_px.tolist()],
                "mean_sq_px_after_offset": float(self.translation_mean_sq_px_after_offset),
                "note": "px of the truth particles; global_offset_px: d with aligned map(r) ~ truth(r - d) "
                        "fitted from the shifts (t_pred = t_gt + (R d)_xy)",
            },
            "pose_coverage": {
                "n_bins": int(self.coverage_bins),
                "predicted": float(self.coverage_pred),
                "truth": float(self.coverage_truth),
                "uniform_expected": float(self.coverage_uniform),
                "bins": "equal-area viewing-direction cells (zonal equal-area partition, full sphere)",
            },
        }


def evaluate_poses(pred: ParticleTable, truth: ParticleTable, hands: str = "both",
                   coverage_bins: int = DEFAULT_COVERAGE_BINS, operators: torch.Tensor | None = None
                   ) -> PoseEvaluation:
    """Align predicted rotations to the truth and measure the pose errors.

    Both tables need poses. Rows are paired by :func:`match_particles`. Shifts (Å) are converted to
    pixels with the truth's pixel size. ``operators``: the true map's symmetry operators in its frame
    (:func:`cryoace.evaluate.symmetry.symmetry_frame`); each error is then to the particle's nearest
    symmetry mate (:func:`~cryoace.evaluate.align.align_rotations`).
    """
    for table, what in ((pred, "predicted poses"), (truth, "truth")):
        if not table.has_pose:
            raise CryoaceInputError(f"the {what} file has no angles (rlnAngleRot/Tilt/Psi)", table.source)
    match = match_particles(pred, truth)
    ip, it = torch.as_tensor(match.pred), torch.as_tensor(match.truth)
    rot_pred = pred.pose.rotmat.to(torch.float64)[ip]
    rot_gt = truth.pose.rotmat.to(torch.float64)[it]
    pixel_size = torch.as_tensor(truth.pixel_size[match.truth], dtype=torch.float64)[:, None]
    shift_pred = pred.pose.shift_angst.to(torch.float64)[ip] / pixel_size
    shift_gt = truth.pose.shift_angst.to(torch.float64)[it] / pixel_size
    alignment = align_rotations(rot_pred, rot_gt, hands=hands, operators=operators)
    offset, after = fit_global_offset(alignment.aligned, shift_pred, shift_gt)
    n = len(match.pred)
    return PoseEvaluation(
        n_particles=n, matched_by=match.how, alignment=alignment,
        errors=rotation_errors(alignment.aligned, alignment.reference),
        translation_mean_sq_px=translation_error(shift_pred, shift_gt),
        global_offset_px=offset, translation_mean_sq_px_after_offset=after,
        coverage_bins=int(coverage_bins),
        coverage_pred=pose_coverage(alignment.aligned, coverage_bins),
        coverage_truth=pose_coverage(rot_gt, coverage_bins),
        coverage_uniform=expected_uniform_coverage(n, coverage_bins),
    )


def fourier_crop_volume(volume: torch.Tensor, new_size: int) -> torch.Tensor:
    """Downsample a real (L, L, L) map to (new_size,)³ by cropping its centred spectrum (in float64;
    values keep their scale)."""
    return fourier_crop(volume.to(torch.float64), new_size, ndim=3).to(volume.dtype)


@dataclasses.dataclass
class MapComparison:
    """The aligned predicted map against the truth (see :func:`compare_maps`).

    aligned    : the predicted map in the truth's frame and hand (and centred on it when asked).
    truth      : the truth map as compared (Fourier-cropped to the predicted box if it was larger).
    offset_px  : (x, y, z) voxels: the aligned map was the truth translated by this before centring
                 (zeros when not centred).
    centered   : whether the offset was removed.
    fsc        : the FSC of ``aligned`` against ``truth``.
    truth_cropped_from : the truth's original box when it was Fourier-cropped, else None.
    """

    aligned: torch.Tensor
    truth: torch.Tensor
    offset_px: torch.Tensor
    centered: bool
    fsc: FSCResult
    truth_cropped_from: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.fsc.to_dict(DEFAULT_THRESHOLDS)
        vs = self.fsc.voxel_size
        d.update({
            "centered": bool(self.centered),
            "offset_px": [float(v) for v in self.offset_px.tolist()],
            "offset_angst": None if not vs else [float(v) * vs for v in self.offset_px.tolist()],
            "truth_cropped_from": self.truth_cropped_from,
        })
        return d


def _as_map(x) -> torch.Tensor:
    """float32 (the resampling works on an oversampled copy; float32 halves its memory)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32)
    return torch.from_numpy(np.array(x, dtype=np.float32))  # a copy: memmaps may be read-only


def compare_maps(volume, voxel_size: float, truth, truth_voxel_size: float,
                 alignment: RotationAlignment, center: bool = True, oversample: int = 2,
                 volume_path=None, truth_path=None) -> MapComparison:
    """FSC of a predicted map against the true map after the pose alignment.

    volume, truth       : real cubic maps (arrays or tensors, (z, y, x)); voxel sizes in Å/px (0 or
                          None = unknown: taken from the other map).
    The boxes must agree, or describe the same physical box with the truth larger (a run on
    downsampled particles): the truth is then Fourier-cropped to the predicted box. Anything else
    raises :class:`CryoaceInputError` (``volume_path`` / ``truth_path`` name the files).
    ``center``: remove the global translation found by :func:`estimate_volume_offset` first.
    """
    v, t = _as_map(volume), _as_map(truth)
    lp, lt = v.shape[-1], t.shape[-1]
    vp = float(voxel_size or 0.0)
    vt = float(truth_voxel_size or 0.0)
    if vp <= 0 and vt > 0:
        vp = vt * lt / lp
    if vt <= 0 and vp > 0:
        vt = vp * lp / lt
    cropped_from = None
    if lp != lt:
        same_extent = vp > 0 and abs(vp * lp - vt * lt) <= SIZE_RTOL * vt * lt
        if lp > lt or not same_extent:
            raise CryoaceInputError(
                f"box {lp} px at {vp:g} Å/px does not match the true map's {lt} px at {vt:g} Å/px "
                "(the maps must cover the same box; resample one of them)", volume_path)
        t = fourier_crop_volume(t, lp)
        cropped_from = lt
    elif vp > 0 and vt > 0 and abs(vp - vt) > SIZE_RTOL * max(vp, vt):
        raise CryoaceInputError(f"voxel size {vp:g} Å differs from the true map's {vt:g} Å "
                                "(same box size): the maps do not cover the same volume", volume_path)
    aligned = transform_volume(v, alignment.rotation, alignment.flip_hand, oversample=oversample)
    offset = torch.zeros(3, dtype=torch.float64)
    if center:
        offset = estimate_volume_offset(aligned, t)
        aligned = shift_volume(aligned, -offset)
    result = fsc(aligned, t, voxel_size=vp if vp > 0 else None)
    return MapComparison(aligned=aligned, truth=t, offset_px=offset, centered=bool(center), fsc=result,
                         truth_cropped_from=cropped_from)
