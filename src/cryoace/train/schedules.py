"""Learning-rate schedules: ACE-EM's "WarmupMultiStepLR" (linear warm-up, then steps by ``gamma``).

``lr(step) = base_lr · lr_factor(step)`` per parameter group, with

    lr_factor(step) = w(step) · gamma ** (number of milestones ≤ step)
    w(step) = start + (1 − start) · step / warmup_steps   for step < warmup_steps, else 1

(``start = warmup_start_factor``, 1e-3 by default — the Detectron convention the paper's schedule
name comes from). Steps are optimizer steps counted from 0 and milestones are absolute step numbers,
so a milestone inside the warm-up multiplies the ramp too. Because the factor multiplies each
group's own initial learning rate, one scheduler serves a voxel grid at lr 1.0 and an encoder at
1e-3 together.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import torch

__all__ = ["lr_factor", "warmup_multistep_scheduler"]


def _check(warmup_steps: int, milestones: Sequence[int], gamma: float, warmup_start_factor: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be non-decreasing, got {list(milestones)}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if not 0 <= warmup_start_factor <= 1:
        raise ValueError(f"warmup_start_factor must be in [0, 1], got {warmup_start_factor}")


def lr_factor(step: int, warmup_steps: int = 0, milestones: Sequence[int] = (), gamma: float = 0.1,
              warmup_start_factor: float = 1e-3) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (module docstring).

    Linear warm-up from ``warmup_start_factor`` at step 0 to 1 at ``warmup_steps`` (no warm-up
    for 0), then × ``gamma`` at each milestone reached (a milestone listed twice counts twice).
    """
    _check(warmup_steps, milestones, gamma, warmup_start_factor)
    warm = 1.0
    if step < warmup_steps:
        alpha = max(step, 0) / warmup_steps
        warm = warmup_start_factor + (1.0 - warmup_start_factor) * alpha
    return warm * gamma ** bisect.bisect_right(list(milestones), step)


def warmup_multistep_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 0,
                               milestones: Sequence[int] = (), gamma: float = 0.1,
                               warmup_start_factor: float = 1e-3, start_step: int = 0,
                               ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group of ``optimizer``.

    Call ``scheduler.step()`` after each ``optimizer.step()``. Construction already sets the
    factor of step ``start_step`` (0: a new run). Its ``state_dict()`` holds the step count (the
    lambda is rebuilt from the arguments on resume), so checkpoint it with the optimizer — or, as the
    schedule depends on the step alone, start a new one at the resumed step: with ``start_step > 0``
    every group needs its base rate in ``"initial_lr"`` (PyTorch's convention).
    """
    _check(warmup_steps, milestones, gamma, warmup_start_factor)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    # a partial of a module-level function (not a lambda): picklable, and the arguments are frozen
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, milestones=tuple(milestones),
                               gamma=gamma, warmup_start_factor=warmup_start_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)
