"""The typed training configuration, its named presets, and its YAML form with provenance.

A :class:`TrainConfig` holds every setting of a ``cryoace reconstruct`` run (nested dataclasses, units
in the names). It is built from a preset (:func:`preset_config`) and command-line overrides, saved
as ``RUN_DIR/config.yaml`` together with a ``provenance`` block (cryoace version, command line, time,
host, torch version, the per-purpose seeds), and read back by ``--resume`` and ``predict-poses``.

Presets:

* ``tiny``  — CPU seconds: a 3-block encoder (8/16/32 channels), a FourierNet of 32 hidden units,
  batch 16, 40 steps. For tests and smoke runs; does not reconstruct anything useful.
* ``cpu``   — a small encoder (16/32/64/64 channels, one conv per block, MLP 128) and FourierNet
  (64 hidden units, 3 layers per SIREN) for a 2-core CPU at L = 64, batch 32, lr 1e-3 (AMSGrad,
  clip 1.0), 8 minutes of training (about 0.8 s a step on the demo with 2 threads; ``--compile``
  saves about a quarter of that but costs minutes of compiling up front and again for each new batch
  shape), then 10 rounds of projection-matching refinement from the decoder's map (``refine``; about
  6 minutes for the 2000 demo particles).
* ``paper`` — cryoAI's settings: VGG16-like encoder (64/128/256/256/256 channels, 2/2/3/3/3 convs,
  MLP 256), FourierNet with 256 hidden units, batch 64, Adam with AMSGrad at lr 1e-4, gradient
  clipping at 1.0.

Every preset trains coarse to fine (loss band from 0.1 cycles/px, widened linearly to Nyquist over
40 / 2000 / 10000 steps) and clips the encoder's and the decoder's gradients separately; ``cpu`` and
``paper`` add ACE-EM's PIP task with the paper's weight for the data's SNR (0.9 noise-free … 0.07 at
−10 dB) after a warm-up of 100 / 2000 steps and once the decoder renders 0.3 of the data's in-band
amplitude (issue 14: without these the encoder collapses). ``tiny`` and ``paper`` start the decoder at
the data's radial amplitude; ``cpu`` does not, as its PIP would start on that random map after 100
steps (measured slower to find the poses, see :func:`_cpu`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

from ..defaults import DECODER_NAMES, LOSSES, PRECISIONS, PRELOAD_MODES
from ..errors import CryoaceInputError
from ..options import option

__all__ = ["EncoderConfig", "DecoderConfig", "OptimConfig", "DataConfig", "PIPConfig", "RefineConfig", "TrainConfig",
           "PRESETS", "preset_config", "parse_duration", "save_config", "load_config", "spawn_seeds",
           "provenance", "check_centring_radius", "check_false_accept"]

ENCODER_NAMES = ("vgg", "resnet18")
OPTIMIZER_NAMES = ("adam", "adamw")
PIP_MODES = ("joint", "alternate")

#: option groups of ``cryoace reconstruct --help``, in order (the fields' ``option(group=...)``)
OPTION_GROUPS = {
    "budget": "budget (the first reached stops training)",
    "model": "model and optimization",
    "pip": "ACE-EM pose-image-pose (PIP) task",
    "refine": "refinement after training (projection matching; may change on --resume)",
    "halves": "gold standard (half sets)",
    "data": "data",
    "run": "run",
}


def _step_list(text: str) -> tuple[int, ...]:
    """``"1000,2000"`` → (1000, 2000): the --lr-milestones form."""
    return tuple(int(x) for x in text.split(",") if x)


def _duration(text: str) -> float:
    return parse_duration(text)


def _all_when_zero(value: int | None) -> int | None:
    return None if value == 0 else value


def _minutes(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds / 60:g}m"


@dataclasses.dataclass
class EncoderConfig:
    """:class:`cryoace.models.PoseEncoder` widths (see its docstring); ``name`` picks the CNN trunk:
    ``vgg`` (cryoAI; ``channels``/``convs_per_block``) or ``resnet18`` (ACE-EM; ``channels`` are the
    four stage widths, 64/128/256/512 at full size)."""

    name: str = option("vgg", flag="--encoder", group="model", choices=ENCODER_NAMES,
                       help="pose encoder CNN: vgg (cryoAI) or resnet18 (ACE-EM)")
    channels: tuple[int, ...] = (64, 128, 256, 256, 256)
    convs_per_block: tuple[int, ...] = (2, 2, 3, 3, 3)
    mlp_hidden: int = 256
    head_layers: int = 2
    max_shift_angst: float | None = None  # None: 0.15 · L · pixel size
    n_filters: int = 5
    filter_size: int = 11
    pooled_size: int = 2
    head_batchnorm: bool = True  # BatchNorm1d in the rotation head (initial poses spread over SO(3))
    n_heads: int = option(1, flag="--pose-heads", group="model", metavar="K",
                          help="rotation hypotheses per image (cryoSPIN's multi-head encoder): all K are rendered "
                          "and the best-fitting one is trained and predicted; costs K decoder renders per image")


@dataclasses.dataclass
class DecoderConfig:
    """The neural Fourier volume (:func:`cryoace.models.build_decoder`).

    layers / omega_0 : None = the decoder class's default (FourierNet: 3 layers per SIREN).
    output_scale     : constant factor on the decoder's output; None = L (the RMS magnitude of the
                       unnormalized spectrum of a unit-variance image), set when the run starts.
    match_amplitude  : neural fields: at the start of a run, give the decoder the data's radial
                       amplitude (per-shell power / CTF², :mod:`cryoace.train.amplitude`), so that the
                       pose gradients carry signal from the first step.
    """

    name: str = option("fouriernet", flag="--decoder", group="model", choices=DECODER_NAMES,
                       help="volume: fouriernet (cryoAI), siren, relu-pe, or an ACE-EM voxel grid in real "
                       "or Fourier space")
    hidden: int = 256
    layers: int | None = None
    omega_0: float | None = None
    output_scale: float | None = None
    match_amplitude: bool = False


@dataclasses.dataclass
class OptimConfig:
    """Adam (or AdamW) over every trainable parameter (encoder incl. both heads, decoder).

    decoder_lr : the decoder's own learning rate; None = ``lr`` for neural fields and the decoder
                 class's ``default_lr`` for voxel grids (ACE-EM: 1.0 for the grid, 1e-3 encoder).
    warmup_steps, milestones, gamma : the warm-up multi-step schedule (``cryoace.train.schedules``):
                 linear warm-up over ``warmup_steps``, then ×``gamma`` at each milestone step.
    """

    lr: float = option(1e-4, flag="--lr", group="model", help="Adam learning rate")
    amsgrad: bool = option(True, flag="--amsgrad", group="model", kind="both", help="AMSGrad variant of Adam")
    grad_clip: float = option(1.0, flag="--grad-clip", group="model", metavar="NORM",
                              help="clip the global L2 norm of the gradient (0 = off)")
    clip_per_group: bool = True  # clip the encoder's and the decoder's gradients separately (else jointly)
    weight_decay: float = 0.0
    name: str = option("adam", flag="--optimizer", group="model", choices=OPTIMIZER_NAMES,
                       help="adam (cryoAI) or adamw (ACE-EM)")
    decoder_lr: float | None = option(None, flag="--decoder-lr", group="model", metavar="LR",
                                      default_text="--lr; voxel grids 1.0",
                                      help="the decoder's own learning rate")
    warmup_steps: int = option(0, flag="--lr-warmup", group="model", metavar="STEPS",
                               help="linear learning-rate warm-up")
    milestones: tuple[int, ...] = option((), flag="--lr-milestones", group="model", metavar="S1,S2",
                                         type=_step_list,
                                         help="steps where the learning rate is multiplied by --lr-gamma")
    gamma: float = option(0.1, flag="--lr-gamma", group="model", help="learning-rate factor at each milestone")


@dataclasses.dataclass
class DataConfig:
    """How particles are read (the particle file itself is given on the command line)."""

    downsample: int | None = option(None, flag="--downsample", group="data", metavar="L", default_text="as stored",
                                    help="Fourier-crop images to an L×L box")
    invert_contrast: bool = option(False, flag="--invert-contrast", group="data", kind="on",
                                   help="for stacks with dark particles")
    num_workers: int = option(0, flag="--num-workers", group="data", metavar="N", on_resume="free",
                              help="data-loading processes")
    datadir: str | None = option(None, flag="--datadir", group="data", type=Path, convert=str, on_resume="free",
                                 default_text="where the file says",
                                 help="directory holding the image stacks, if not where the file says")
    use_ctf: bool = option(True, flag="--no-ctf", group="data", kind="off", help="ignore the file's CTF columns")
    check_contrast: bool = option(True, flag="--check-contrast", group="data", kind="both", on_resume="ignored",
                                  help="before training, test on up to 1000 particles that they are white on a "
                                  "dark background and stop if they look inverted (io.contrast)")
    auto_invert: bool = option(False, flag="--auto-invert", group="data", kind="on", on_resume="ignored",
                               help="invert the images when the contrast check finds dark particles, instead "
                               "of stopping")
    preload: str = option("auto", flag="--preload", group="data", choices=PRELOAD_MODES, on_resume="free",
                          help="hold the prepared images in GPU memory or RAM (auto: on a GPU, in its memory "
                          "if they fit in half the free GPU memory, else in RAM if they fit in half the "
                          "available RAM, else read from disk; on a CPU, read from disk, so memory does not "
                          "grow with the particles; io.preload)")


@dataclasses.dataclass
class PIPConfig:
    """ACE-EM's pose → image → pose task (:mod:`cryoace.train.pip`).

    weight        : λ of the PIP loss added to the image loss (``joint``), or of the PIP-only steps
                    (``alternate``: after the warm-up, every other step is PIP-only); None = from the
                    data's SNR (:func:`cryoace.train.pip.auto_pip_weight`: ACE-EM's 0.9 on noise-free
                    data, 0.07 at −10 dB).
    warmup_steps  : T, image-loss-only steps before PIP starts.
    warmup_amplitude : PIP also waits until the decoder's rendered amplitude in the loss band (RMS)
                    reaches this fraction of the data's signal amplitude there (None = no such wait).
    band_limited  : render the PIP images only inside the loss band and the Nyquist disc (False: the
                    whole grid, for ablations).
    joint_batchnorm : encode the PIP images in one pass with the real images (one BatchNorm batch).
    snr_db        : noise of the PIP images from this SNR (dB); None = σ from the images' background.
    shift_sigma_angst : σ (Å) of the random shifts; None = resample the encoder's shifts on the batch.
    """

    enabled: bool = option(False, flag="--pip", group="pip", kind="both",
                           help="add the PIP task: random poses -> decoder -> noisy images -> encoder -> pose loss")
    weight: float | None = option(0.1, flag="--pip-weight", group="pip", metavar="LAMBDA",
                                  show=lambda v: "from the data's SNR" if v is None else f"{v:g}",
                                  help="weight of the PIP loss (from the data's SNR: ACE-EM's 0.9 noise-free "
                                  "... 0.07 at -10 dB)")
    warmup_steps: int = option(0, flag="--pip-warmup", group="pip", metavar="T",
                               help="image-loss-only steps before PIP starts (PIP also waits until the decoder "
                               "renders 0.3 of the data's in-band amplitude)")
    warmup_amplitude: float | None = None
    band_limited: bool = True
    joint_batchnorm: bool = True
    mode: str = option("joint", flag="--pip-mode", group="pip", choices=PIP_MODES,
                       help="PIP added to every step (joint) or on alternate steps")
    freeze_decoder: bool = option(True, flag="--pip-freeze-decoder", group="pip", kind="both",
                                  help="PIP does not update the decoder (frozen in the paper)")
    snr_db: float | None = option(None, flag="--pip-snr", group="pip", metavar="DB",
                                  default_text="from the images' background",
                                  help="noise of the PIP images from this SNR in dB")
    shift_sigma_angst: float | None = option(None, flag="--pip-shift-sigma", group="pip", metavar="ANGST",
                                             default_text="the encoder's shifts on the batch",
                                             help="σ of random PIP shifts in Å")


@dataclasses.dataclass
class RefineConfig:
    """Projection-matching refinement after the amortized training (:mod:`cryoace.reconstruct.refine`):
    poses searched against the decoder's map (global over SO(3) on a ``global_step_deg`` grid, then
    local), the map rebuilt from them, for ``rounds`` rounds with a growing band, or as many as fit in
    ``max_time_s`` and what the job's ``--max-time`` leaves them (the last one that fits searches at
    the final band). Its map and poses become ``volume.mrc`` and ``poses.star``.

    With ``ab_initio``, a low-resolution map is first built from a featureless blob by
    ``ab_initio_iterations`` of stochastic EM (:mod:`cryoace.reconstruct.ab_initio`), ``ab_initio_starts``
    times with other random particle batches (at low SNR some starts fall into a wrong map); the
    refinement starts from the one with the lowest search error or the decoder's map, whichever
    explains the images best, and the gold standard claims no resolution unless another run's map
    agrees with the kept one. With ``ab_initio_halves`` the starts run on each half set apart, each
    half's best map is kept, the two are aligned and averaged, and when they do not agree the run
    claims no resolution (and refines each half from its own map).

    Gold standard: the two half sets are refined apart, each against its own half map, from the seed
    map low-passed to ``start_resolution_px`` (px per cycle); their FSC claims a resolution only
    beyond it (:mod:`cryoace.evaluate.gold_standard`)."""

    enabled: bool = option(False, flag="--refine", group="refine", kind="both", on_resume="free",
                           help="after training, search every particle's pose against the decoder's map "
                           "(global over SO(3), then local), rebuild the map from those poses, and repeat "
                           "with a growing band; its map and poses become volume.mrc and poses.star")
    ab_initio: bool = option(True, flag="--ab-initio", group="refine", kind="both", on_resume="free",
                             help="before refining, build a low-resolution map from a featureless blob by "
                             "stochastic EM over poses (robust at low SNR); refinement starts from it or "
                             "the decoder's map, whichever explains the images better")
    ab_initio_iterations: int = option(30, flag="--ab-initio-iterations", group="refine", metavar="N",
                                       on_resume="free", help="stochastic EM iterations of --ab-initio")
    ab_initio_starts: int = option(4, flag="--ab-initio-starts", group="refine", metavar="K", on_resume="free",
                                   help="ab initio runs (other random particle batches), of each half set with "
                                   "--ab-initio-halves; the one that explains the images best (lowest search "
                                   "error) is kept, and no resolution is claimed unless another run found the "
                                   "same map. Under --max-time, as many whole runs as fit in the ab initio's "
                                   "share (two at least)")
    ab_initio_halves: bool = option(False, flag="--ab-initio-halves", group="refine", kind="both", on_resume="free",
                                    help="run the ab initio on each half set apart, align the two maps and claim "
                                    "no resolution unless they agree (FSC 0.5 within 1.4× the ab initio's band "
                                    "limit): a gold standard from the very start, at the cost of maps built "
                                    "from half the particles")
    rounds: int = option(10, flag="--refine-rounds", group="refine", metavar="N", on_resume="free",
                         help="refinement rounds")
    max_time_s: float | None = option(None, flag="--refine-max-time", group="refine", metavar="T", type=str,
                                      convert=_duration, show=_minutes, on_resume="free",
                                      default_text="all rounds",
                                      help="the rounds' wall time (at most what --max-time leaves them): the last "
                                      "round that fits is made the final one, at the full band")
    global_step_deg: float = option(8.0, flag="--refine-step", group="refine", metavar="DEG", on_resume="free",
                                    help="SO(3) grid spacing of the global search in degrees")
    centring_radius: float = option(0.15, flag="--refine-centring", group="refine", metavar="F", on_resume="free",
                                    help="each global search looks for the particle's shift within F × the box "
                                    "around the centre (a coarse search) and searches its shift grid around what "
                                    "it finds as well as around 0 (0: around 0 only, which misses particles "
                                    "more than ~3 px off-centre)")
    false_accept: float = option(0.01, flag="--refine-false-accept", group="refine", metavar="F", on_resume="free",
                                 help="the amortized final pass keeps a particle's local search result where its "
                                 "pose score reaches a threshold, calibrated so that at most F of a sample's kept "
                                 "local results fit their image worse than the global search's pose; the others "
                                 "fall back to the global search (lower F: fewer wrong poses, more global searches)")
    batch_size: int = 128
    start_resolution_px: float = option(12.0, flag="--refine-start-resolution", group="refine", metavar="PX",
                                        on_resume="free",
                                        help="gold standard: the two half sets are refined apart from the "
                                        "seed map low-passed to this resolution (px per cycle); no "
                                        "resolution at or below it is claimed")
    subset: int | None = option(10000, flag="--refine-subset", group="refine", metavar="N", on_resume="fixed",
                                convert=_all_when_zero,
                                help="refinement rounds run on at most N particles (a seeded random draw from "
                                "each half set); every other particle is then searched once (global, then "
                                "local) against its own half's final map and added to it: the cost is N × "
                                "rounds + all particles once, not all particles × rounds (0: every particle "
                                "in every round)")
    teach_time_s: float | None = option(None, flag="--teach-encoder", group="refine", metavar="T", type=str,
                                        convert=_duration, show=_minutes, on_resume="free", default_text="off",
                                        help="teach a pose encoder from the refined map for wall time T (e.g. "
                                        "10m; a fixed budget, whatever the number of particles): "
                                        "checkpoints/encoder_taught.pt, which cryoace predict-poses and refine "
                                        "then use (poses in one forward pass, in the map's frame). With more "
                                        "particles than --refine-subset it is taught from the rounds' map "
                                        "before the final pass, which then searches each other particle "
                                        "locally from its pose and globally only where the local fit is poor "
                                        "(restarted, not resumed, when interrupted)")


def check_centring_radius(flag: str, value: float) -> None:
    """CryoaceInputError (one line naming ``flag``) unless the centring radius is a fraction of the box in [0, 0.5]."""
    if not 0.0 <= value <= 0.5:
        raise CryoaceInputError(f"{flag} must be between 0 and 0.5 (a fraction of the box), got {value:g}")


def check_false_accept(flag: str, value: float) -> None:
    """CryoaceInputError (one line naming ``flag``) unless the false-accept rate is a fraction in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise CryoaceInputError(f"{flag} must be a fraction in [0, 1), got {value:g}")


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a reconstruction run.

    Band: with ``band_start_cyc_px`` the loss (and the decoder's work) is restricted to frequencies
    |k| ≤ r(step), r growing linearly from ``band_start_cyc_px`` to 0.5 cycles/px over
    ``band_ramp_steps`` steps, in whole Fourier shells (coarse to fine: the poses are found on the
    low frequencies, where each step is several times cheaper).

    Budget: training stops at the first of ``steps`` (optimizer steps), ``epochs`` (passes over the
    particles; fractional allowed) and the networks' share of ``max_time_s`` (the whole job's wall
    time, split over the stages when a refinement follows: :mod:`cryoace.pipeline.budget`; summed over
    resumed sessions); None means no limit on that count (at least one must be set).
    """

    preset: str = "custom"
    seed: int = option(0, flag="--seed", group="model", help="run seed")
    batch_size: int = option(64, flag="--batch-size", group="model", metavar="B", help="images per step")
    loss: str = option("symmetric", flag="--loss", group="model", choices=LOSSES,
                       help="symmetric (cryoAI), l2, or gsym (ACE-EM's generalized symmetric loss: also "
                       "random in-plane turns and mirrors; meant for voxel decoders)")
    steps: int | None = option(None, flag="--steps", group="budget", metavar="N", together="budget",
                               on_resume="free", help="optimizer steps")
    epochs: float | None = option(None, flag="--epochs", group="budget", metavar="E", together="budget",
                                  on_resume="free", help="passes over the particles")
    max_time_s: float | None = option(None, flag="--max-time", group="budget", metavar="T", type=str,
                                      convert=_duration, show=_minutes, together="budget", on_resume="free",
                                      help="the whole job's wall time, e.g. 30m, 1.5h, 90s (bare number: "
                                      "minutes): with --refine it is split over the stages (the networks a "
                                      "quarter, the ab initio at most 35 %%, the refinement rounds the rest, "
                                      "ending with a full-band round that leaves time for the final pass over "
                                      "every particle); without, it is the networks' training time")
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    band_start_cyc_px: float | None = option(None, flag="--band-start", group="model", metavar="CYC_PX",
                                             default_text="Nyquist",
                                             help="coarse to fine: fit frequencies up to this radius "
                                             "(cycles/px, <= 0.5) first ...")
    band_ramp_steps: int = option(0, flag="--band-ramp", group="model", metavar="STEPS",
                                  help="... and widen the band linearly to Nyquist over this many steps")
    pip: PIPConfig = dataclasses.field(default_factory=PIPConfig)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)
    warmup_label_steps: int = option(0, flag="--warmup-labels", group="model", metavar="K",
                                     help="ACE-EM warm-up labeling: fit low-pass filtered images for the "
                                     "first K steps")
    warmup_label_filter: int = option(3, flag="--warmup-filter", group="model", metavar="I",
                                      help="which of the encoder's Gaussian filters low-passes the warm-up "
                                      "labels (1-based; 3 = σ 1 px)")
    shift_l1: float = option(0.0, flag="--shift-l1", group="model", metavar="W",
                             help="L1 penalty weight on predicted shifts in px")
    gsym_views: int = option(2, flag="--gsym-views", group="model", metavar="N",
                             help="random turned/mirrored views of --loss gsym")
    eval_every: int | None = option(None, flag="--eval-every", group="run", metavar="N", on_resume="free",
                                    default_text="--volume-every",
                                    help="steps between pose coverage / error records")
    pose_window: int = 2000      # recent training poses the coverage/error checks use
    log_every: int = option(20, flag="--log-every", group="run", metavar="N", on_resume="free",
                            help="steps between loss logs (and NaN checks)")
    checkpoint_every: int = option(500, flag="--checkpoint-every", group="run", metavar="N", on_resume="free",
                                   help="steps between checkpoints (rounded up to a multiple of --log-every)")
    volume_every: int = option(1000, flag="--volume-every", group="run", metavar="N", on_resume="free",
                               help="steps between volume_STEP.mrc (0 = none)")
    keep_checkpoints: int = 3    # step_XXXXXX.pt files kept (the newest); last.pt always
    volume_chunk: int = 2 ** 16  # decoder points per call when exporting the volume
    predict_batch_size: int = 256
    device: str = option("auto", flag="--device", group="run", on_resume="free", help="auto, cpu or cuda")
    compile: bool = option(False, flag="--compile", group="run", kind="both", on_resume="free",
                           help="torch.compile the networks for training (needs a C++ compiler on the CPU, "
                           "falls back to eager mode if compiling fails)")
    precision: str = option("auto", flag="--precision", group="run", choices=PRECISIONS, on_resume="free",
                            help="the encoder's arithmetic: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on "
                            "the CPU; the Fourier/CTF math and the decoder are always fp32)")
    channels_last: bool | None = option(None, flag="--channels-last", group="run", kind="both", on_resume="free",
                                        default_text="on CUDA only",
                                        help="NHWC memory layout for the encoder's convolutions")
    tensorboard: bool = option(True, flag="--no-tensorboard", group="run", kind="off", on_resume="free",
                               help="no TensorBoard event files")
    max_rollbacks: int = 5       # NaN/Inf recoveries before giving up
    halves: bool = option(False, flag="--halves", group="halves", kind="on",
                          help="train two independent models on two halves of the particles (rlnRandomSubset "
                          "when the file has it, else a seeded random split; RUN_DIR/half1, half2), compare "
                          "their aligned maps by FSC every --eval-every steps (0.143 resolution in the log, "
                          "metrics.jsonl/.json, fsc.png, resolution.png); --max-time is shared by the halves")
    halves_patience: int | None = option(None, flag="--halves-patience", group="halves", metavar="N",
                                         on_resume="free", default_text="never",
                                         help="with --halves: stop when the half-map resolution has not "
                                         "improved by more than 1% in N evaluations")
    force_gsym: bool = option(False, flag="--force-gsym", group="model", kind="on",
                              help="allow --loss gsym with a neural-field decoder (refused otherwise: ACE-EM "
                              "reports that it fails there)")

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`CryoaceInputError` (one line) for an impossible setting."""
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise CryoaceInputError(f"{name} must be a positive number, got {value!r}")

        positive("--batch-size", self.batch_size)
        positive("--steps", self.steps, allow_none=True)
        positive("--epochs", self.epochs, allow_none=True)
        positive("--max-time", self.max_time_s, allow_none=True)
        if self.steps is None and self.epochs is None and self.max_time_s is None:
            raise CryoaceInputError("no training budget: give --steps, --epochs or --max-time")
        positive("--lr", self.optim.lr)
        if self.optim.grad_clip < 0:
            raise CryoaceInputError(f"grad_clip must be >= 0, got {self.optim.grad_clip}")
        if self.loss not in LOSSES:
            raise CryoaceInputError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.decoder.name not in DECODER_NAMES:
            raise CryoaceInputError(f"--decoder must be one of {', '.join(DECODER_NAMES)}, "
                                    f"got {self.decoder.name!r}")
        if self.loss == "gsym" and not self.decoder.name.startswith("voxel") and not self.force_gsym:
            raise CryoaceInputError(f"--loss gsym is meant for voxel decoders (ACE-EM reports that it fails "
                                    f"with FourierNet), not --decoder {self.decoder.name}; use "
                                    "--decoder voxel-real/voxel-fourier, or --force-gsym to try it anyway")
        positive("decoder hidden", self.decoder.hidden)
        if self.encoder.name not in ENCODER_NAMES:
            raise CryoaceInputError(f"--encoder must be one of {', '.join(ENCODER_NAMES)}, got {self.encoder.name!r}")
        if self.encoder.n_heads < 1:
            raise CryoaceInputError(f"--pose-heads must be at least 1, got {self.encoder.n_heads}")
        if self.encoder.name == "vgg" and (len(self.encoder.channels) != len(self.encoder.convs_per_block)
                                           or not self.encoder.channels):
            raise CryoaceInputError("encoder channels and convs_per_block must be non-empty and of equal length")
        if self.data.downsample is not None and (self.data.downsample <= 0 or self.data.downsample % 2):
            raise CryoaceInputError(f"--downsample must be a positive even box size, got {self.data.downsample}")
        if self.data.num_workers < 0:
            raise CryoaceInputError(f"--num-workers must be >= 0, got {self.data.num_workers}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise CryoaceInputError(f"--seed must be a non-negative integer, got {self.seed!r}")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "volume_chunk", "predict_batch_size"):
            positive(name, getattr(self, name))
        if self.band_start_cyc_px is not None and not 0 < self.band_start_cyc_px <= 0.5:
            raise CryoaceInputError(f"band_start_cyc_px must be in (0, 0.5], got {self.band_start_cyc_px}")
        if self.band_ramp_steps < 0:
            raise CryoaceInputError(f"band_ramp_steps must be >= 0, got {self.band_ramp_steps}")
        if self.volume_every < 0:
            raise CryoaceInputError(f"volume_every must be >= 0, got {self.volume_every}")
        if self.optim.name not in OPTIMIZER_NAMES:
            raise CryoaceInputError(f"optimizer must be adam or adamw, got {self.optim.name!r}")
        positive("decoder lr", self.optim.decoder_lr, allow_none=True)
        if self.optim.warmup_steps < 0 or not 0 < self.optim.gamma <= 1:
            raise CryoaceInputError("lr warm-up steps must be >= 0 and gamma in (0, 1]")
        if self.pip.mode not in PIP_MODES:
            raise CryoaceInputError(f"--pip-mode must be joint or alternate, got {self.pip.mode!r}")
        positive("--refine-rounds", self.refine.rounds)
        positive("--refine-max-time", self.refine.max_time_s, allow_none=True)
        positive("--teach-encoder", self.refine.teach_time_s, allow_none=True)
        positive("--refine-subset", self.refine.subset, allow_none=True)
        positive("--refine-step", self.refine.global_step_deg)
        check_centring_radius("--refine-centring", self.refine.centring_radius)
        check_false_accept("--refine-false-accept", self.refine.false_accept)
        positive("--ab-initio-iterations", self.refine.ab_initio_iterations)
        positive("--ab-initio-starts", self.refine.ab_initio_starts)
        positive("refine batch size", self.refine.batch_size)
        if not self.refine.start_resolution_px >= 2.0:
            raise CryoaceInputError(f"--refine-start-resolution must be at least 2 px (Nyquist), got "
                                    f"{self.refine.start_resolution_px}")
        if (self.pip.weight is not None and self.pip.weight < 0) or self.pip.warmup_steps < 0:
            raise CryoaceInputError("--pip-weight and --pip-warmup must be >= 0")
        if self.pip.warmup_amplitude is not None and not 0 < self.pip.warmup_amplitude <= 1:
            raise CryoaceInputError(f"pip warmup_amplitude must be in (0, 1], got {self.pip.warmup_amplitude}")
        if self.warmup_label_steps < 0 or self.shift_l1 < 0 or self.gsym_views < 0:
            raise CryoaceInputError("--warmup-labels, --shift-l1 and gsym views must be >= 0")
        if not 1 <= self.warmup_label_filter <= self.encoder.n_filters:
            raise CryoaceInputError(f"--warmup-filter must be 1 … {self.encoder.n_filters} (the encoder's "
                                    f"Gaussian filters), got {self.warmup_label_filter}")
        positive("eval_every", self.eval_every, allow_none=True)
        positive("--halves-patience", self.halves_patience, allow_none=True)
        if self.halves_patience is not None and not self.halves:
            raise CryoaceInputError("--halves-patience needs --halves (it stops on the half-map resolution)")
        positive("pose_window", self.pose_window)
        if self.precision not in PRECISIONS:
            raise CryoaceInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.data.preload not in PRELOAD_MODES:
            raise CryoaceInputError(f"--preload must be one of {', '.join(PRELOAD_MODES)}, got {self.data.preload!r}")

    def band_shells(self, step: int, image_size: int) -> int:
        """Radius of the loss band at ``step`` in whole Fourier shells of an L = ``image_size`` box."""
        import math

        nyquist = image_size // 2
        if self.band_start_cyc_px is None:
            return nyquist
        ramp = self.band_ramp_steps
        frac = 1.0 if ramp <= 0 else min(1.0, step / ramp)
        radius = self.band_start_cyc_px + (0.5 - self.band_start_cyc_px) * frac
        return max(1, min(nyquist, math.ceil(radius * image_size - 1e-9)))

    # -- dict / YAML form ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), ready for YAML/JSON and checkpoints."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | os.PathLike | None = None) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`CryoaceInputError`."""
        return _build(cls, data, source, "")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls, data: Any, source, prefix: str):
    if not isinstance(data, dict):
        raise CryoaceInputError(f"configuration section {prefix or 'root'!r} is not a mapping", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CryoaceInputError(f"unknown configuration key {prefix + unknown[0]!r}", source)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, source, f"{prefix}{name}.")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

#: coarse to fine in every preset (issue 14): with the full band from step 0 the encoder collapses onto
#: one viewing direction; the band starts at 0.1 cycles/px and widens linearly to Nyquist
BAND_START_CYC_PX = 0.1
#: PIP waits until the decoder renders this fraction of the data's in-band signal amplitude (RMS): with
#: poses still wrong a fitted decoder renders about 0.4-0.5 of it (a fifth of the power), a fresh
#: neural field without the amplitude match 0.01-0.1
PIP_WARMUP_AMPLITUDE = 0.3


def _tiny() -> TrainConfig:
    return TrainConfig(
        preset="tiny", batch_size=16, steps=40, log_every=5, checkpoint_every=20, volume_every=20,
        band_start_cyc_px=BAND_START_CYC_PX, band_ramp_steps=40,
        encoder=EncoderConfig(channels=(8, 16, 32), convs_per_block=(1, 1, 1), mlp_hidden=32),
        decoder=DecoderConfig(name="fouriernet", hidden=32, layers=2, match_amplitude=True),
        optim=OptimConfig(lr=1e-3, amsgrad=True, grad_clip=1.0), tensorboard=False)


def _cpu() -> TrainConfig:
    """Small networks for a 2-core CPU, then the refinement stage. The networks alone (bench/amortized.py,
    demo at 32 px, noise-free) predicted poses at a 9.8° median error after 20 minutes (with the amplitude
    match below, since turned off). The decoder is not started at the data's amplitude here: PIP starts
    after 100 steps, and a decoder at full amplitude then is a random map the encoder learns to pose
    (measured: 11.7° / 7.4° instead of 18.3° / 37.9° after 10 minutes noise-free, seeds 0 / 1; 34° instead
    of 51° after 30 minutes at −10 dB). Without it: 5.9° / 8.0° after 10 minutes noise-free (seeds 2 / 3),
    14.9° after 90 minutes at −10 dB (seed 0)."""
    return TrainConfig(
        preset="cpu", batch_size=32, max_time_s=20 * 60, log_every=25, checkpoint_every=200,
        volume_every=1000, refine=RefineConfig(enabled=True, rounds=10),
        band_start_cyc_px=BAND_START_CYC_PX, band_ramp_steps=2000,
        pip=PIPConfig(enabled=True, weight=None, warmup_steps=100, warmup_amplitude=PIP_WARMUP_AMPLITUDE),
        encoder=EncoderConfig(channels=(16, 32, 64, 64), convs_per_block=(1, 1, 1, 1), mlp_hidden=128),
        decoder=DecoderConfig(name="fouriernet", hidden=64, layers=3, match_amplitude=False),
        optim=OptimConfig(lr=1e-3, amsgrad=True, grad_clip=1.0))


def _paper() -> TrainConfig:
    """cryoAI's networks and optimizer (20 epochs): meant for a GPU."""
    return TrainConfig(
        preset="paper", batch_size=64, epochs=20, log_every=50, checkpoint_every=1000, volume_every=2000,
        band_start_cyc_px=BAND_START_CYC_PX, band_ramp_steps=10000,
        pip=PIPConfig(enabled=True, weight=None, warmup_steps=2000, warmup_amplitude=PIP_WARMUP_AMPLITUDE),
        encoder=EncoderConfig(channels=(64, 128, 256, 256, 256), convs_per_block=(2, 2, 3, 3, 3),
                              mlp_hidden=256),
        decoder=DecoderConfig(name="fouriernet", hidden=256, layers=3, match_amplitude=True),
        optim=OptimConfig(lr=1e-4, amsgrad=True, grad_clip=1.0))


PRESETS = {"tiny": _tiny, "cpu": _cpu, "paper": _paper}


def preset_config(name: str) -> TrainConfig:
    """A fresh :class:`TrainConfig` of the preset ``name`` (``tiny``, ``cpu`` or ``paper``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise CryoaceInputError(f"unknown preset {name!r} (known presets: {', '.join(PRESETS)})") from None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([hms]?)")


def parse_duration(text: str | float | int) -> float:
    """``"30m"``, ``"1.5h"``, ``"90s"``, ``"1h30m"`` → seconds; a bare number means minutes."""
    if isinstance(text, (int, float)):
        seconds = float(text) * 60
    else:
        s = str(text).strip().lower().replace(" ", "")
        pos, seconds, matched = 0, 0.0, False
        while pos < len(s):
            m = _DURATION.match(s, pos)
            if not m:
                raise CryoaceInputError(f"cannot read the duration {text!r} (use e.g. 30m, 1.5h, 90s)")
            value, unit = float(m.group(1)), m.group(2) or "m"
            seconds += value * {"h": 3600, "m": 60, "s": 1}[unit]
            pos, matched = m.end(), True
        if not matched:
            raise CryoaceInputError(f"cannot read the duration {text!r} (use e.g. 30m, 1.5h, 90s)")
    if not seconds > 0:
        raise CryoaceInputError(f"the duration must be positive, got {text!r}")
    return seconds


# ---------------------------------------------------------------------------------------------
# Seeds, provenance, YAML
# ---------------------------------------------------------------------------------------------

def spawn_seeds(seed: int) -> dict[str, int]:
    """One seed per purpose (model initialisation, data order, normalisation sample) from the run seed."""
    import numpy as np

    children = np.random.SeedSequence(int(seed)).spawn(3)
    names = ("model_init", "data_order", "normalization")
    return {n: int(c.generate_state(1, dtype=np.uint32)[0]) for n, c in zip(names, children, strict=True)}


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Who/what/when of a run: cryoace and torch versions, command line, UTC time, host, Python."""
    import torch

    from .. import __version__

    argv = sys.argv if argv is None else argv
    return {
        "cryoace_version": __version__,
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "command": " ".join(shlex.quote(str(a)) for a in argv),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cwd": os.getcwd(),
    }


def save_config(path: str | os.PathLike, config: TrainConfig, extra: dict[str, Any] | None = None) -> None:
    """Write ``config`` (plus ``extra`` top-level sections, e.g. provenance, data, seeds) as YAML, atomically."""
    import yaml

    from ..io.atomic import atomic_path

    doc = {"config": config.to_dict()}
    doc.update(extra or {})
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False, allow_unicode=True)


def load_config(path: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a ``config.yaml``: the :class:`TrainConfig` and the other sections as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CryoaceInputError("file not found", path)
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise CryoaceInputError(f"not a readable YAML file ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(doc, dict) or "config" not in doc:
        raise CryoaceInputError("not a cryoace run configuration (no 'config' section)", path)
    config = TrainConfig.from_dict(doc.pop("config"), path)
    return config, doc
