"""What a single-model run and a ``--halves`` run share: the run directory's checks, the training
dataset (after the contrast check), the gold-standard outputs of two half maps, the closing report,
and the :class:`RunResult` both return.

Its own module so that :mod:`cryoace.pipeline.run` (which dispatches ``--halves`` runs) and
:mod:`cryoace.pipeline.halves` both import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..errors import CryoaceInputError
from ..train.config import TrainConfig

__all__ = ["RunResult", "check_run_dir", "open_training_dataset", "write_run_report", "write_gold_standard"]


@dataclasses.dataclass
class RunResult:
    """What a run wrote and how long it took (training time summed over resumed sessions)."""

    run_dir: Path
    volume: Path
    poses: Path
    config: Path
    steps: int
    epochs: float
    train_time_s: float
    wall_time_s: float
    final_loss: float | None
    voxel_size: float
    image_size: int
    resolution_angst: float | None = None  # the final gold-standard FSC-0.143 resolution (Å), if claimed
    #: the refinement's gold standard (:class:`~cryoace.evaluate.gold_standard.GoldStandard`), None without one
    gold_standard: object | None = None


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that ``--resume`` can continue."""
    # a --halves run keeps its checkpoints in half1/ and half2/ (pipeline.halves)
    return any((Path(run_dir) / sub / "checkpoints" / "last.pt").is_file() for sub in (".", "half1"))


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run needs an empty (or new) directory; ``--resume`` needs one with a checkpoint."""
    has_run = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if resume:
        if not has_checkpoint(run_dir):
            raise CryoaceInputError("nothing to resume: no checkpoints/last.pt in the run directory", run_dir)
    elif has_run:
        raise CryoaceInputError("the directory already holds a run; add --resume to continue it or "
                                "choose another -o", run_dir)
    elif run_dir.exists() and not run_dir.is_dir():
        raise CryoaceInputError("the output exists and is not a directory", run_dir)


def open_training_dataset(table, source, config: TrainConfig, seed: int, resume: bool,
                          log: Callable[[str], None]):
    """The normalized :class:`ParticleDataset` a run trains on; a new run (not a resumed one, which
    keeps the sign it trained with) first passes the contrast check, which may flip
    ``config.data.invert_contrast`` (``--auto-invert``)."""
    from ..io.particles import ParticleDataset

    def open_dataset() -> ParticleDataset:
        return ParticleDataset(table, downsample=config.data.downsample,
                               invert_contrast=config.data.invert_contrast, normalize=True, seed=seed)

    dataset = open_dataset()
    if not resume and config.data.check_contrast and _check_contrast(dataset, source, config, seed, log):
        dataset = open_dataset()
    return dataset


def _check_contrast(dataset, source, config: TrainConfig, seed: int, log: Callable[[str], None]) -> bool:
    """The pre-training contrast check (:func:`cryoace.io.contrast.check_contrast`) on the same seeded
    subset as the normalisation. Inverted particles stop the run with a one-line
    :class:`CryoaceInputError` naming ``source`` — before anything is written — unless
    ``config.data.auto_invert``: then ``config.data.invert_contrast`` is flipped (and so recorded in
    config.yaml) and True returned. "unclear" is only logged."""
    from ..io.contrast import check_contrast

    result = check_contrast(dataset, seed=seed, use_ctf=config.data.use_ctf)
    log(f"contrast check: {result.describe()}")
    if not result.inverted:
        if result.verdict == "unclear":
            log("warning: could not tell whether the particles are white on a dark background; if the map "
                "comes out hollow or negative, rerun with the other --invert-contrast setting")
        return False
    if config.data.auto_invert:
        config.data.invert_contrast = not config.data.invert_contrast
        log(f"--auto-invert: {'inverting' if config.data.invert_contrast else 'no longer inverting'} "
            "the images")
        return True
    fix = ("drop --invert-contrast" if config.data.invert_contrast else "add --invert-contrast")
    raise CryoaceInputError(
        f"the particles look inverted (dark on a light background; centre−background z = "
        f"{result.z_score:+.1f} over {result.n_images} images, expected white particles); {fix}, or "
        "--auto-invert to let cryoace do it (--no-check-contrast skips this check)", source)


def write_run_report(run_dir: Path, log: Callable[[str], None]) -> None:
    """RUN_DIR/report.html (:func:`cryoace.evaluate.report.write_report`). Every output is already
    written, so a failure here is logged, never raised: the run must not be lost to its report."""
    try:
        from ..evaluate.report import write_report

        log(f"wrote the run report {write_report(run_dir)}")
    except Exception as exc:  # noqa: BLE001 - any failure (a plotting bug, a full disk) is only logged
        log(f"warning: could not write the run report ({type(exc).__name__}: {exc}); "
            f"retry with 'cryoace report {run_dir}'")


def write_gold_standard(run_dir: Path, half1, half2, pixel_size: float, start_resolution_px: float,
                        confidence=None, check=None, start_agreement=None,
                        title: str = "gold-standard FSC of the half maps"):
    """Judge two independent half maps (L³, one frame) and write what anyone needs to check it:
    ``volume_half1.mrc``, ``volume_half2.mrc``, ``volume_mask.mrc`` (their soft mask), ``gold_standard.json``
    and ``fsc.png`` (:func:`cryoace.evaluate.gold_standard.assess`; ``confidence``, ``check`` and
    ``start_agreement`` as there). Returns the :class:`~cryoace.evaluate.gold_standard.GoldStandard`."""
    import json

    import torch

    from ..evaluate.gold_standard import assess, mask_from_half_maps
    from ..evaluate.plots import plot_fsc
    from ..io.atomic import atomic_path
    from ..io.mrc import write_mrc

    halves = [torch.as_tensor(h).float().cpu() for h in (half1, half2)]
    for half, name in zip(halves, ("volume_half1.mrc", "volume_half2.mrc"), strict=True):
        write_mrc(run_dir / name, half.numpy(), pixel_size)
    try:
        mask = mask_from_half_maps(halves[0], halves[1], pixel_size)
        write_mrc(run_dir / "volume_mask.mrc", mask.numpy(), pixel_size)
    except ValueError:  # nothing above the threshold in the average: FSC without a mask
        mask = torch.ones_like(halves[0])
    gold = assess(halves[0], halves[1], start_resolution_px, pixel_size, confidence, mask=mask, check=check,
                  start_agreement=start_agreement)
    with atomic_path(run_dir / "gold_standard.json") as tmp:
        tmp.write_text(json.dumps(gold.to_dict(), indent=2, allow_nan=False) + "\n")
    plot_fsc(gold.curves(), run_dir / "fsc.png", title=title + ("" if gold.resolved else " (NOT RESOLVED)"))
    return gold
