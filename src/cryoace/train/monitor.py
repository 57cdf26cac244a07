"""Pose metrics during training (ACE-EM's coverage and rotation errors), from the poses the encoder
predicted on recent training batches — no extra forward passes.

The last ``window`` predicted rotations (with their particle rows) are kept in a ring buffer on the
training device; :meth:`PoseMonitor.summary` (called every ``eval_every`` steps, outside the
training step, so the one device→host copy is not a sync inside a step) reports the fraction of
equal-area viewing-direction bins they reach and, when the particle file carries poses (simulated
data, or a refinement to compare with), the mean/median squared Frobenius rotation error and the
median angle after the global alignment over both hands (:func:`cryoace.evaluate.align`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..evaluate.align import align_rotations
from ..evaluate.pose_metrics import pose_coverage, rotation_errors

__all__ = ["PoseMonitor"]


class PoseMonitor:
    """Ring buffer of recent training poses and the metrics over them.

    window         : poses kept.
    truth_rotmat_of: dataset rows (int64 array) → their (n, 3, 3) reference rotations (RELION's
                     matrix), or None. A function, not an (N, 3, 3) array, so that the reference
                     costs nothing per particle: only the rows held are turned into matrices, at
                     :meth:`summary` (e.g. ``lambda rows: table.pose_rows(rows).rotmat``).
    """

    def __init__(self, window: int, device,
                 truth_rotmat_of: Callable[[np.ndarray], torch.Tensor] | None = None):
        self.window = int(window)
        self.rotmat = torch.zeros(self.window, 3, 3, device=device)
        self.rows = torch.full((self.window,), -1, dtype=torch.long, device=device)
        self.position = 0
        self.filled = 0
        self.truth_rotmat_of = truth_rotmat_of

    def update(self, rows, rotmat: torch.Tensor) -> None:
        """Record the predicted rotations (B, 3, 3) of dataset rows (B,) (no host sync)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long).to(self.rows.device, non_blocking=True)
        rotmat = rotmat.detach().to(self.rotmat.dtype)
        n = min(rotmat.shape[0], self.window)
        rows, rotmat = rows[-n:], rotmat[-n:]
        slots = (self.position + torch.arange(n, device=self.rows.device)) % self.window
        self.rotmat[slots] = rotmat
        self.rows[slots] = rows
        self.position = (self.position + n) % self.window
        self.filled = min(self.window, self.filled + n)

    def poses(self) -> tuple[np.ndarray, torch.Tensor]:
        """(rows, rotmat float64 on the CPU) of the poses held, newest last."""
        rows = self.rows[:self.filled].cpu().numpy()
        return rows, self.rotmat[:self.filled].double().cpu()

    def summary(self) -> dict[str, float]:
        """``coverage`` and, with a reference, ``rot_mean_sq_frob``, ``rot_median_sq_frob``,
        ``rot_median_deg`` over the poses held, and the alignment to the reference
        (``align_rotation`` G, ``align_flip_hand``; see :func:`cryoace.evaluate.align.align_rotations`)
        (empty dict before any)."""
        if self.filled == 0:
            return {}
        rows, rotmat = self.poses()
        out = {"coverage": float(pose_coverage(rotmat)), "poses": int(self.filled)}
        if self.truth_rotmat_of is not None:
            truth = torch.as_tensor(self.truth_rotmat_of(rows)).detach().to(torch.float64).cpu()
            alignment = align_rotations(rotmat, truth, hands="both")
            errors = rotation_errors(alignment.aligned, truth)
            out.update(rot_mean_sq_frob=float(errors.mean_sq_frobenius),
                       rot_median_sq_frob=float(errors.median_sq_frobenius),
                       rot_median_deg=float(errors.median_angle_deg),
                       # the global frame and hand of the map at this step (for scoring snapshots)
                       align_rotation=alignment.rotation.tolist(), align_flip_hand=bool(alignment.flip_hand))
        return out

    def state_dict(self) -> dict:
        return {"rotmat": self.rotmat.cpu(), "rows": self.rows.cpu(), "position": self.position,
                "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.rotmat.copy_(state["rotmat"])
        self.rows.copy_(state["rows"])
        self.position, self.filled = int(state["position"]), int(state["filled"])
