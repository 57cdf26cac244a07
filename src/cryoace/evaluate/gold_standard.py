"""The gold-standard resolution of a run's two independent half maps, and whether to believe it.

A refinement that keeps its two half sets apart (:mod:`cryoace.reconstruct.refine`) ends with two
half maps that share nothing finer than their common start's low-pass. :func:`assess` turns them
into what a user needs to judge the result, computed the way ``cryoace fsc`` computes it so anyone
can check it from the files:

* the **unmasked FSC** of the half maps (``cryoace fsc volume_half1.mrc volume_half2.mrc``), whose
  0.143 crossing is **the resolution claimed**: any tool computes it from the two files without a
  mask to choose, and it is the one comparable with an FSC-0.5 against a true map of the same box;
* the **masked FSC with the phase-randomization correction** (Chen et al. 2013) inside a soft mask
  made from the average of the half maps (``cryoace fsc volume_half1.mrc volume_half2.mrc --mask
  volume_mask.mrc``), shown beside it: the particle's resolution once the solvent's noise is masked
  away, as RELION's post-processing reports it. It is not the claim because it is the one that lies
  when the poses are partly wrong: both halves then share the error inside the mask, and the mask
  removes the noise that would have shown it. Measured on simulated panels (64-px boxes, SNR 0.1 and
  0.05): where the map was right the unmasked FSC-0.143 matched the FSC-0.5 against the truth
  within 0.98–1.06× (masked 1.02–1.21× optimistic); where the poses were partly wrong the masked one
  was 1.49–1.65× optimistic, the unmasked 1.18–1.28×;
* a **verdict**: the resolution is only claimed when the data resolved something. It is withheld
  (``resolved`` False, with the reason in words) when the half maps agree no further than the
  start's low-pass (the claimed, unmasked FSC 0.143 not at least ``MIN_GAIN_OVER_START`` = 25 %
  further in frequency; a masked curve that reaches further does not count — on pure noise under a
  short budget it reached 9.2 px where the unmasked stopped at 12.4 px, the start's 12):
  nothing beyond what both halves were given was found — what pure noise gives ("Einstein from
  noise": each half aligns noise to the common start and reproduces it, but nothing finer);
* the particles' median **pose confidence** (the fraction of each particle's best rotations that
  lie near the best one, :func:`cryoace.reconstruct.pose_search.pose_confidence`), shown beside
  the verdict. Its scale depends on the box, the band and the grid (noise-free particles in a 32-px
  box score as low as noise in a 64-px box), so on its own it does not decide anything;
* a **posterior-predictive check** (:class:`PredictiveCheck`): the resolution is also withheld when the
  particles align to the final map clearly less sharply (mean pose confidence below
  ``MIN_CONFIDENCE_RATIO`` = 0.9 of it, by more than twice the standard error) than the map's own
  projections do with the particles' CTFs, shifts and noise. Half maps that agree only prove
  reproducibility: from a wrong start both halves can reproduce the same wrong map; this check
  catches that, since both sides of the comparison share the box, band and grid
  (:mod:`cryoace.reconstruct.predictive_check`). It is also withheld when the map is featureless:
  when even its own projections do not single out their pose (mean confidence below
  ``MIN_EXPECTED_OVER_CHANCE`` = 3 × the chance level, 1 / candidates) — a blob whose half maps
  agree on the particles' rotational average at every shell;
* the **start's agreement**: where the common start came from ab initio runs of the two half sets
  apart (:func:`cryoace.reconstruct.ab_initio.ab_initio_half_sets`), the resolution to which those two
  independent maps agree (FSC 0.5 after aligning them). The resolution is withheld when it is worse
  than ``MAX_START_DISAGREEMENT`` = 1.4 × the ab initio's own band limit: the two halves never found
  the same structure, so the start, which both halves then reproduce, is not confirmed by the data —
  the case that half maps refined from one start cannot reveal (a partly wrong start map gave
  half maps that claimed 3.3 px for a map 10 px from the truth, with the predictive check at 0.92).
  Measured in 64-px boxes (band limit 6.4 px): pairs of right maps agree to 5.6–7.9 px (0.87–1.24×),
  pairs with a wrong map to 9.3–12.9 px (1.45–2.0×); maps that are only blurrier (7.5–8 px against the
  truth) fall between.

The result is saved as ``gold_standard.json`` in the run directory (:meth:`GoldStandard.to_dict`)
and read back by the run report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from .fsc import DEFAULT_THRESHOLDS, FSCResult, MaskedFSC, masked_fsc

__all__ = ["GoldStandard", "PredictiveCheck", "StartAgreement", "assess", "MIN_GAIN_OVER_START", "MIN_CONFIDENCE_RATIO",
           "MIN_EXPECTED_OVER_CHANCE", "MAX_START_DISAGREEMENT", "mask_from_half_maps", "UNRESOLVED_EXIT_CODE"]

#: the half maps must agree this much further in frequency than the start's low-pass
MIN_GAIN_OVER_START = 1.25
#: the particles' mean pose confidence must reach this fraction of what the map's own projections get
MIN_CONFIDENCE_RATIO = 0.9
#: the map's own projections must single out their pose this many times more often than chance
MIN_EXPECTED_OVER_CHANCE = 3.0
#: the half sets' independent ab initio maps must agree (FSC 0.5) within this factor of their band limit
MAX_START_DISAGREEMENT = 1.4
#: exit status of a command whose run finished but resolved nothing (documented in the CLI help)
UNRESOLVED_EXIT_CODE = 4


@dataclasses.dataclass
class PredictiveCheck:
    """Whether the particles align to the final map as sharply as its own projections do
    (:func:`cryoace.reconstruct.predictive_check.predictive_check`).

    observed  : the sampled particles' mean pose confidence against their half's map.
    expected  : the same for the map's projections at random rotations with the particles' CTFs,
                shifts and noise spectrum.
    particles : how many particles were sampled (as many synthetic ones).
    chance    : the confidence of candidates scattered at random (1 / candidates).
    observed_se, expected_se : the standard errors of the two means.

    The check fails when the observed confidence falls below ``MIN_CONFIDENCE_RATIO`` × the expected
    one by more than twice the standard error of that difference (a few hundred particles measure
    the ratio to ±0.02; with fewer, only a clear shortfall counts), or when the map is featureless.
    """

    observed: float
    expected: float
    particles: int
    chance: float = 0.1
    observed_se: float = 0.0
    expected_se: float = 0.0

    @property
    def ratio(self) -> float:
        return self.observed / max(self.expected, 1e-12)

    @property
    def featureless(self) -> bool:
        """Whether even the map's own projections do not single out their pose (expected confidence
        below ``MIN_EXPECTED_OVER_CHANCE`` × the chance level): a blob, whose half maps can agree
        at every shell (the particles' rotational average) without any pose being known."""
        return self.expected < MIN_EXPECTED_OVER_CHANCE * self.chance

    @property
    def shortfall(self) -> bool:
        """Whether the particles align clearly less sharply than the map's own projections."""
        margin = 2 * math.hypot(self.observed_se, MIN_CONFIDENCE_RATIO * self.expected_se)
        return self.observed + margin < MIN_CONFIDENCE_RATIO * self.expected

    @property
    def passed(self) -> bool:
        return not self.shortfall and not self.featureless

    def to_dict(self) -> dict[str, Any]:
        return {"observed": self.observed, "expected": self.expected, "particles": self.particles,
                "chance": self.chance, "observed_se": self.observed_se, "expected_se": self.expected_se,
                "ratio": self.ratio, "min_ratio": MIN_CONFIDENCE_RATIO,
                "featureless": self.featureless, "passed": self.passed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictiveCheck:
        return cls(observed=float(data["observed"]), expected=float(data["expected"]),
                   particles=int(data["particles"]), chance=float(data.get("chance", 0.1)),
                   observed_se=float(data.get("observed_se", 0.0)), expected_se=float(data.get("expected_se", 0.0)))


#: what two start maps that had to agree were built from (:class:`StartAgreement` ``between``)
START_AGREEMENT_KINDS = ("half sets", "runs")


@dataclasses.dataclass(frozen=True)
class StartAgreement:
    """How far two independently built ab initio maps agree after alignment (FSC 0.5, ``px``) and how
    far they had to (``limit_px``): the two half sets' own maps (``between="half sets"``, a gold
    standard from the start), or the kept run's map and the closest of the other runs' on all the
    particles (``between="runs"``: other random batches, the same particles — the same structure found
    again, not a wrong map that one run fell into)."""

    px: float
    limit_px: float
    between: str = "half sets"

    def __post_init__(self) -> None:
        if self.between not in START_AGREEMENT_KINDS:
            raise ValueError(f"between must be one of {START_AGREEMENT_KINDS}, got {self.between!r}")

    @property
    def confirmed(self) -> bool:
        return self.px <= self.limit_px

    @property
    def label(self) -> str:
        """Which ab initio maps had to agree, in words."""
        return ("the kept ab initio run's map and the closest other run's" if self.between == "runs"
                else "the half sets' own ab initio maps")

    def describe(self, pixel_size: float | None) -> str:
        """For the log: how far they agree (Å and px) and whether that confirms the start."""
        return (f"{_text_px(self.px, pixel_size)}, FSC 0.5; "
                + ("confirmed" if self.confirmed else f"NOT confirmed: the limit is {self.limit_px:.2f} px"))

    def to_tensor(self) -> torch.Tensor:
        """(px, limit_px, kind) as float64, for a checkpoint (inverse: :meth:`from_tensor`)."""
        return torch.tensor([self.px, self.limit_px, START_AGREEMENT_KINDS.index(self.between)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values) -> StartAgreement:
        """From :meth:`to_tensor`'s values (two values, from checkpoints that knew only the half sets:
        their agreement)."""
        values = [float(v) for v in values]
        return cls(values[0], values[1], START_AGREEMENT_KINDS[int(values[2])] if len(values) > 2 else "half sets")


@dataclasses.dataclass
class GoldStandard:
    """The half maps' FSCs and the verdict (module docstring).

    fsc                 : the masked FSC with its phase-randomization correction (``fsc.corrected`` is
                          the reported curve; ``fsc.unmasked`` the plain one).
    start_resolution_px : the common start's low-pass (px per cycle).
    confidence_median   : the particles' median pose confidence (None if not measured).
    reasons             : why the resolution is withheld (empty when it is not).
    check               : the posterior-predictive check of the poses (None if not made).
    start_agreement     : how far two independently built ab initio maps agree, and had to
                          (:class:`StartAgreement`; None when not measured).
    """

    fsc: MaskedFSC
    start_resolution_px: float
    confidence_median: float | None
    reasons: list[str]
    check: PredictiveCheck | None = None
    start_agreement: StartAgreement | None = None

    @property
    def resolved(self) -> bool:
        return not self.reasons

    @property
    def pixel_size(self) -> float | None:
        return self.fsc.unmasked.voxel_size

    def resolution(self, masked: bool = False):
        """The FSC-0.143 resolution (:class:`~cryoace.evaluate.fsc.Resolution`) of the unmasked curve
        (the one claimed), or of the corrected masked one."""
        return (self.fsc.corrected if masked else self.fsc.unmasked).resolution(0.143)

    def curves(self) -> dict[str, FSCResult]:
        """The curves to plot, by label: the unmasked one (claimed), the corrected masked one, and where
        the mask needed correcting the plain masked and the phase-randomized ones."""
        curves = {"unmasked (claimed)": self.fsc.unmasked, "masked, corrected": self.fsc.corrected}
        if self.fsc.randomized is not None:
            curves.update({"masked": self.fsc.masked, "phase-randomized (Chen et al. 2013)": self.fsc.randomized})
        return curves

    def summary(self) -> list[str]:
        """The lines a run prints at its end (the verdict first)."""
        unmasked, masked = self.resolution(masked=False), self.resolution(masked=True)
        curves = (f"half maps FSC-0.143: unmasked {_text(unmasked)}, masked (phase-randomization corrected) "
                  f"{_text(masked)}" + ("" if self.confidence_median is None else
                                          f"; median pose confidence {self.confidence_median:.2f}")
                  + ("" if self.check is None else
                     f"; pose confidence {self.check.observed:.2f} vs {self.check.expected:.2f} for the map's "
                     "own projections")
                  + ("" if self.start_agreement is None else
                     f"; {self.start_agreement.label} agree to "
                     f"{_text_px(self.start_agreement.px, self.pixel_size)}"))
        if self.resolved:
            return [f"gold-standard resolution {_text(unmasked)} ({curves}; independent half sets, claimed only "
                    f"beyond {_text_px(self.start_resolution_px, self.pixel_size)}, what they could share without "
                    "the data)"]
        return [f"NOT RESOLVED: no resolution is claimed: {'; '.join(self.reasons)}",
                f"({curves} — not a resolution: the poses or the map are not determined by the data)"]

    def to_dict(self, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
        """JSON-ready: the verdict, the resolutions (px, Å; ``resolution_*`` is the one claimed, the
        unmasked one, also under ``unmasked_resolution_*``) and every curve."""
        unmasked, masked = self.resolution(masked=False), self.resolution(masked=True)
        return {"resolved": self.resolved, "reasons": list(self.reasons),
                "resolution_px": unmasked.px, "resolution_angst": unmasked.angstrom,
                "unmasked_resolution_px": unmasked.px, "unmasked_resolution_angst": unmasked.angstrom,
                "masked_resolution_px": masked.px, "masked_resolution_angst": masked.angstrom,
                "start_resolution_px": self.start_resolution_px, "confidence_median": self.confidence_median,
                "predictive_check": None if self.check is None else self.check.to_dict(),
                **_start_agreement_dict(self.start_agreement),
                "fsc": self.fsc.to_dict(thresholds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GoldStandard:
        """Inverse of :meth:`to_dict` (raises KeyError / TypeError / ValueError on a malformed dict)."""
        curves = data["fsc"]
        randomization = curves["phase_randomization"]
        corrected = FSCResult.from_dict({k: v for k, v in curves.items() if k != "phase_randomization"})
        randomized = randomization.get("randomized")
        masked = MaskedFSC(corrected=corrected, unmasked=FSCResult.from_dict(randomization["unmasked"]),
                           masked=FSCResult.from_dict(randomization["masked"]),
                           randomized=None if randomized is None else FSCResult.from_dict(randomized),
                           randomize_from_shell=randomization.get("randomize_from_shell"))
        confidence = data.get("confidence_median")
        return cls(fsc=masked, start_resolution_px=float(data["start_resolution_px"]),
                   confidence_median=None if confidence is None else float(confidence),
                   reasons=[str(r) for r in data.get("reasons", [])],
                   check=None if data.get("predictive_check") is None else
                   PredictiveCheck.from_dict(data["predictive_check"]),
                   start_agreement=None if data.get("start_agreement_px") is None else StartAgreement(
                       float(data["start_agreement_px"]), float(data["start_agreement_limit_px"]),
                       data.get("start_agreement_between", "half sets")))  # older files: only the half sets'


def _start_agreement_dict(agreement: StartAgreement | None) -> dict[str, Any]:
    """gold_standard.json's flat keys for the start agreement (None values when not measured)."""
    return {"start_agreement_px": None if agreement is None else agreement.px,
            "start_agreement_limit_px": None if agreement is None else agreement.limit_px,
            "start_agreement_between": None if agreement is None else agreement.between}


def _text_px(px: float, pixel_size: float | None) -> str:
    return f"{px * pixel_size:.2f} Å ({px:.2f} px)" if pixel_size else f"{px:.2f} px"


def _text(res) -> str:
    return _text_px(res.px, res.angstrom / res.px if res.angstrom else None)


def mask_from_half_maps(half1: torch.Tensor, half2: torch.Tensor, pixel_size: float | None) -> torch.Tensor:
    """A soft solvent mask (L³, float32) of the half maps' average, as ``cryoace mask`` makes it, from
    the average low-passed to 15 px (so that noise in the half maps does not shape it)."""
    from .mask import make_mask

    average = (half1.double() + half2.double()) / 2
    size = average.shape[-1]
    px = float(pixel_size) if pixel_size else 1.0
    mask, _ = make_mask(average, lowpass_angst=min(15.0, size / 4) * px, voxel_size=px)
    return mask


def assess(half1: torch.Tensor, half2: torch.Tensor, start_resolution_px: float, pixel_size: float | None,
           confidence: torch.Tensor | np.ndarray | None = None, mask: torch.Tensor | None = None,
           seed: int = 0, check: PredictiveCheck | None = None,
           start_agreement: StartAgreement | None = None) -> GoldStandard:
    """The gold standard of two independent half maps (L³, same frame) refined from a common start
    low-passed to ``start_resolution_px`` (px); ``confidence``: the particles' pose confidences;
    ``mask``: default :func:`mask_from_half_maps`. ``seed`` seeds the phase randomization (as
    ``cryoace fsc --seed``); ``check``: the refinement's posterior-predictive check of its poses;
    ``start_agreement``: how far the start's independently built ab initio maps agree, where measured."""
    if mask is None:
        try:
            mask = mask_from_half_maps(half1, half2, pixel_size)
        except ValueError:  # an empty average (no density above the threshold): no mask to apply
            mask = torch.ones_like(half1, dtype=torch.float32)
    curves = masked_fsc(half1, half2, mask, voxel_size=pixel_size, seed=seed)
    reasons = []
    # the claim (unmasked) must reach clearly beyond the start: the mask's gain cannot tell signal from
    # what both halves share, so a masked curve beyond it alone does not count
    claimed_px = curves.unmasked.resolution(0.143).px
    if claimed_px * MIN_GAIN_OVER_START > start_resolution_px:
        reasons.append(f"the half maps agree (FSC 0.143 at {_text_px(claimed_px, pixel_size)}) no further than "
                       f"the common start map's low-pass ({_text_px(start_resolution_px, pixel_size)}), so nothing "
                       "beyond what both halves were given was resolved")
    if check is not None and check.featureless:
        reasons.append(f"the map is featureless at the particles' noise level: even its own projections do not "
                       f"single out their pose (mean pose confidence {check.expected:.2f}, chance "
                       f"{check.chance:.2f}), so half maps that agree show the particles' rotational average, "
                       "not a structure")
    elif check is not None and check.shortfall:
        reasons.append(f"the particles align to the map less sharply than its own projections with the "
                       f"particles' noise do (mean pose confidence {check.observed:.2f} vs {check.expected:.2f}, "
                       f"below {MIN_CONFIDENCE_RATIO:g}×), so the map does not explain them: the poses were not "
                       "found (a wrong or unconverged start, too few rounds, another molecule)")
    if start_agreement is not None and not start_agreement.confirmed:
        found = (f"agree to {_text_px(start_agreement.px, pixel_size)} at FSC 0.5, not to "
                 f"{_text_px(start_agreement.limit_px, pixel_size)}")
        if start_agreement.between == "runs":
            reasons.append(f"no other ab initio run found the map the refinement started from (the closest "
                           f"{found}), so it may be a wrong map that one run fell into, which both half sets then "
                           "reproduce (more --ab-initio-starts, or --ab-initio-halves)")
        else:
            reasons.append(f"the two half sets, each on its own, did not find the same structure ab initio (their "
                           f"maps {found}), so the map they were refined from is not confirmed by the data (more "
                           "particles, more --ab-initio-starts)")
    median = None
    if confidence is not None:
        values = torch.as_tensor(np.asarray(confidence), dtype=torch.float64)
        values = values[~torch.isnan(values)]  # NaN: a pose kept from a local search, its confidence not measured
        median = float(values.median()) if values.numel() else None
    return GoldStandard(fsc=curves, start_resolution_px=float(start_resolution_px), confidence_median=median,
                        reasons=reasons, check=check, start_agreement=start_agreement)
