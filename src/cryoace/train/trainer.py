"""The training loop: encoder → pose, decoder + physics.forward → spectra, loss, Adam; checkpoints.

One step: a batch of normalized images (the dataset's order is a pure function of the data-order
seed and the epoch), :func:`cryoace.train.losses.compute_loss` (symmetric or L2), backward,
gradient clipping (per parameter group — encoder and decoder separately — or global),
``Adam(amsgrad=...)`` over *every* trainable parameter (the encoder with both heads, the decoder —
checked at construction), ``zero_grad(set_to_none=True)``.

With ``compile`` the encoder and the decoder's real-valued network are run through
``torch.compile`` for training steps only (export and pose prediction use the plain modules); if
compiling fails (e.g. no C++ compiler) the step is redone eagerly and training goes on without it.

**Host syncs.** The loss, gradient norm and a non-finite counter are accumulated on the device and
read once every ``log_every`` steps; that read is also where a NaN/Inf loss or gradient is noticed.
Then the run rolls back to the last checkpoint (always written after a clean check; one is written at
step 0), halves the learning rate, logs a ``rollback`` record and goes on; after ``max_rollbacks``
it stops with :class:`TrainingDiverged`.

**Checkpoints** (``RUN_DIR/checkpoints/step_XXXXXX.pt`` and ``last.pt``, written atomically with
``torch.save`` and read back with ``weights_only=True``) hold the encoder, decoder and optimizer
states, the step, epoch and batch-in-epoch, the training time so far, the learning-rate factor, the
RNG states (torch, CUDA, numpy, python) and the configuration. Resuming restores all of it, so on
the CPU ``K steps + resume + (N−K) steps`` gives bit-identical parameters to ``N steps``.

**Scale.** Under torchrun (:mod:`cryoace.train.distributed`) each rank reads its part of every global
batch, gradients are averaged over the ranks after ``backward``, logged metrics are averaged in the
``log_every`` sync, and rank 0 alone writes files. The encoder may run in bf16 autocast and
``channels_last`` (:mod:`cryoace.train.precision`); the data may be preloaded or prefetched
(:mod:`cryoace.io.preload`).

Outputs in RUN_DIR: ``metrics.jsonl`` (one JSON record per log: loss, grad norm, lr, images/s, ...),
TensorBoard scalars in ``tensorboard/`` when tensorboard is installed (otherwise skipped, said once),
``volume_STEP.mrc`` every ``volume_every`` steps, and (by :meth:`Trainer.finalize`) ``volume.mrc``,
``volume.png`` (central slices and projections) and ``loss.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import CryoaceInputError, CryoaceRunError
from ..io.atomic import atomic_path
from ..io.preload import prefetch
from ..runtime import resolve_device
from ..types import Pose
from .config import TrainConfig, spawn_seeds
from .distributed import GradientSync
from .distributed import current as distributed_context
from .losses import HalfDiscGrid, compute_loss
from .monitor import PoseMonitor
from .pip import (
    auto_pip_weight,
    background_noise_std,
    estimate_snr_db,
    pip_pose_loss,
    pip_render,
    pip_weight,
    shuffled_ctf,
)
from .precision import Autocast, resolve_channels_last, resolve_precision, use_channels_last
from .schedules import warmup_multistep_scheduler

__all__ = ["Trainer", "DataInfo", "TrainingDiverged", "build_models", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "cryoace-checkpoint-1"

#: what :meth:`Trainer.train_step` returns, in order: image loss, gradient norm, fraction of images
#: whose 180°-rotated path won, PIP loss, the share of images won by the most-winning head of a
#: multi-head encoder (1 with one head; near 1 with several: the other heads are idle), and whether the
#: step had an image loss / a PIP loss (0/1)
STEP_STATS = ("loss", "grad_norm", "rotated_fraction", "pip_loss", "top_head_fraction", "ipi_step", "pip_step")


class TrainingDiverged(CryoaceRunError):
    """The loss stayed NaN/Inf after every allowed rollback (reported as one line by the CLI)."""


@dataclasses.dataclass
class DataInfo:
    """What the models were trained on (saved with the run; ``predict-poses`` needs it).

    image_size : L of the images the encoder saw (after downsampling).
    pixel_size : their Å/px (the map's voxel size).
    norm_mean, norm_std : the normalization ``(image - mean) / std`` applied to every image.
    n_particles, use_ctf, particles : the training set's size, whether its CTF was applied, its path.
    """

    image_size: int
    pixel_size: float
    norm_mean: float
    norm_std: float
    n_particles: int
    use_ctf: bool
    particles: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_models(config: TrainConfig, image_size: int, pixel_size: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The encoder and decoder of ``config`` for images of ``image_size`` px at ``pixel_size`` Å/px
    (initialised from the current torch RNG state)."""
    from ..models import PoseEncoder, ResNetPoseEncoder, build_decoder

    enc = config.encoder
    common = dict(mlp_hidden=enc.mlp_hidden, head_layers=enc.head_layers, max_shift_angst=enc.max_shift_angst,
                  n_filters=enc.n_filters, filter_size=enc.filter_size, head_batchnorm=enc.head_batchnorm,
                  n_heads=enc.n_heads)
    if enc.name == "resnet18":
        encoder = ResNetPoseEncoder(image_size, pixel_size, widths=resnet_widths(enc.channels), **common)
    else:
        encoder = PoseEncoder(image_size, pixel_size, channels=tuple(enc.channels),
                              convs_per_block=tuple(enc.convs_per_block), pooled_size=enc.pooled_size, **common)
    dec = config.decoder
    kwargs = dict(output_scale=default_output_scale(dec.name, image_size) if dec.output_scale is None
                  else dec.output_scale)
    if dec.name.startswith("voxel"):
        kwargs["size"] = image_size
    else:
        kwargs.update(hidden=dec.hidden, layers=dec.layers)
    if dec.name in ("fouriernet", "siren"):
        kwargs["omega_0"] = dec.omega_0
    elif dec.name == "relu-pe":
        kwargs["max_radius_px"] = image_size / 2
    decoder = build_decoder(dec.name, **kwargs)
    return encoder, decoder


def resnet_widths(channels) -> tuple[int, ...]:
    """ResNet-18 stage widths c·(1, 2, 4, 8) from the VGG widths' first entry c: the paper preset's
    c = 64 gives ResNet-18's 64/128/256/512, the cpu preset's 16 a quarter-width network."""
    c = int(channels[0])
    return (c, 2 * c, 4 * c, 8 * c)


def default_output_scale(decoder: str, image_size: int) -> float:
    """The decoder's constant output factor: values of the normalized images' spectra are about L, so a
    neural field (outputs about 1) gets L; a Fourier grid stores V̂ itself (1) so that Adam at the grid's
    learning rate 1.0 moves a value by about 1/L of its size per step; a real-space grid stores L²·v
    (1/L²), the same relative step for its voxels (a unit-variance image is a sum of about L voxels)."""
    if decoder == "voxel-fourier":
        return 1.0
    if decoder == "voxel-real":
        return 1.0 / image_size ** 2
    return float(image_size)


def _torch_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: "TensorBoard is not installed" is said once per process (both --halves trainers would repeat it)
_TENSORBOARD_SKIP_SAID = False


def open_tensorboard(log_dir: str | Path, log: Callable[[str], None]):
    """A TensorBoard ``SummaryWriter`` on ``log_dir``, or None when tensorboard is not installed (an
    optional extra): then one line through ``log`` — the first time only — says how to enable it."""
    global _TENSORBOARD_SKIP_SAID
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as exc:  # not installed (ImportError) or broken: the run goes on without it
        if not _TENSORBOARD_SKIP_SAID:
            _TENSORBOARD_SKIP_SAID = True
            reason = "not installed" if isinstance(exc, ImportError) else f"unusable ({type(exc).__name__})"
            log(f"TensorBoard scalars are skipped: tensorboard is {reason} (pip install tensorboard, or "
                "pip install -e .[tensorboard]; metrics.jsonl has the same numbers)")
        return None
    return SummaryWriter(log_dir=str(log_dir))


class Trainer:
    """Trains the encoder and decoder of ``config`` on ``dataset`` (a normalized ParticleDataset),
    writing into ``run_dir``. ``fit()`` runs until the budget; ``load_checkpoint()`` resumes."""

    def __init__(self, config: TrainConfig, dataset, run_dir, device: torch.device | str | None = None,
                 data_info: DataInfo | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None):
        config.validate()
        self.config = config
        self.dataset = dataset
        self.run_dir = Path(run_dir)
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self.progress = progress
        self.log = log or (lambda message: print(message, file=sys.stderr))
        self.seeds = spawn_seeds(config.seed)
        self.n_particles = len(dataset)
        self.image_size = int(dataset.image_size)
        self.pixel_size = float(dataset.pixel_size)
        self.use_ctf = bool(config.data.use_ctf and dataset.has_ctf)
        self.data_info = data_info or DataInfo(
            image_size=self.image_size, pixel_size=self.pixel_size, norm_mean=float(dataset.norm_mean),
            norm_std=float(dataset.norm_std), n_particles=self.n_particles, use_ctf=self.use_ctf,
            particles=str(dataset.table.source))
        self.batch_size = min(int(config.batch_size), self.n_particles)
        self.steps_per_epoch = self.n_particles // self.batch_size
        self.symmetric = config.loss in ("symmetric", "gsym")  # poses are chosen between the two 180° paths

        torch.manual_seed(self.seeds["model_init"])
        encoder, decoder = build_models(config, self.image_size, self.pixel_size)
        self.encoder = encoder.to(self.device)
        self.decoder = decoder.to(self.device)
        self.params = [p for m in (self.encoder, self.decoder) for p in m.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self._check_optimizer_covers_models()
        self._sample = self._data_sample()
        self.data_noise_std = background_noise_std(self._sample.images) if self._sample is not None else 0.0
        self.pip_noise_std = self.data_noise_std if config.pip.enabled and config.pip.snr_db is None else 0.0
        self.pip_lambda = self._pip_lambda()
        self._match_decoder_amplitude()
        self._sample = None  # only needed at the start
        self._pip_open = not (config.pip.enabled and config.pip.warmup_amplitude)  # amplitude warm-up passed
        self._pip_shift_pool: torch.Tensor | None = None  # the encoder's shifts on the last batch (Å)
        self.monitor = PoseMonitor(config.pose_window, self.device, self.truth_rotmat_of())
        self._grids: dict[int, HalfDiscGrid] = {}
        self._compiled = None  # (encoder, decoder network) compiled for training steps, built lazily
        self._compile = bool(config.compile)
        # torchrun: this rank's place; the global batch must split evenly (train.distributed)
        self.dist = distributed_context(self.device)
        self.dist.per_rank_batch(self.batch_size)
        self.autocast_dtype = resolve_precision(config.precision, self.device)  # encoder only
        if resolve_channels_last(config.channels_last, self.device):
            use_channels_last(self.encoder)
        self._grad_sync = GradientSync((self.encoder, self.decoder), self.dist)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.elapsed_s = 0.0
        #: the training's wall time (s): ``--max-time``, or the networks' share of it that the pipeline
        #: sets when stages follow them (:mod:`cryoace.pipeline.budget`)
        self.time_limit_s = config.max_time_s
        self.lr_factor = 1.0
        self._scheduler = None  # the learning-rate schedule, started by _apply_lr
        self._scheduler_factor = 1.0
        self.rollbacks = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._until_step: int | None = None  # the end of the chunk fit() was asked for
        self._writer = None
        self.history: list[dict] = []

    # -- optimizer and schedules ---------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        """Adam/AdamW with two parameter groups: the encoder at ``lr`` and the decoder at its own rate
        (``decoder_lr``, else the decoder class's ``default_lr`` — 1.0 for voxel grids — else ``lr``)."""
        opt = self.config.optim
        decoder_lr = opt.decoder_lr or getattr(self.decoder, "default_lr", None) or opt.lr
        groups = [{"params": [p for p in m.parameters() if p.requires_grad], "base_lr": lr, "lr": lr, "name": name}
                  for name, m, lr in (("encoder", self.encoder, opt.lr), ("decoder", self.decoder, decoder_lr))]
        groups = [g for g in groups if g["params"]]
        cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=opt.lr, amsgrad=opt.amsgrad, weight_decay=opt.weight_decay)

    def _apply_lr(self) -> None:
        """Learning rates for the coming step: :func:`~cryoace.train.schedules.warmup_multistep_scheduler`
        on each group's base rate × the rollback factor. The scheduler steps once per training step (here,
        after the previous optimizer step, so a step's records show the rate it used); as the schedule
        is a pure function of the step, it is started afresh at ``self.step`` whenever it is not one
        step behind (first step, resume, rollback), and a resumed run follows the same schedule."""
        scheduler = self._scheduler
        if scheduler is not None and self._scheduler_factor == self.lr_factor:
            if scheduler.last_epoch == self.step - 1:
                scheduler.step()
            if scheduler.last_epoch == self.step:
                return
        opt = self.config.optim
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group.setdefault("base_lr", group["lr"]) * self.lr_factor
        self._scheduler = warmup_multistep_scheduler(self.optimizer, opt.warmup_steps, tuple(opt.milestones),
                                                     opt.gamma, start_step=self.step)
        self._scheduler_factor = self.lr_factor

    # -- ACE-EM: PIP noise, reference poses --------------------------------------------------------
    def _data_sample(self):
        """Up to 512 normalized particles spread over the set (a ParticleBatch), when PIP or the
        amplitude match needs the data's noise level or spectrum; else None."""
        if not (self.config.pip.enabled or self.config.decoder.match_amplitude):
            return None
        rows = np.linspace(0, self.n_particles - 1, min(512, self.n_particles)).astype(np.int64)
        return self.dataset[np.unique(rows)]

    def _pip_lambda(self) -> float:
        """λ of the PIP loss: the configured weight, or ACE-EM's for the data's SNR (weight None)."""
        pip = self.config.pip
        if not pip.enabled:
            return 0.0
        if pip.weight is not None:
            return float(pip.weight)
        snr_db = estimate_snr_db(self._sample.images)
        weight = auto_pip_weight(snr_db)
        self.log(f"PIP weight {weight:.3g} for the data's SNR of {snr_db:.1f} dB")
        return weight

    def _match_decoder_amplitude(self) -> None:
        """Neural fields with ``match_amplitude``: start the decoder at the data's radial amplitude
        (:mod:`cryoace.train.amplitude`; a checkpoint's decoder state replaces it on resume)."""
        if not self.config.decoder.match_amplitude or self.config.decoder.name.startswith("voxel"):
            return
        from .amplitude import match_decoder_amplitude

        sample = self._sample
        ctf = sample.ctf if self.use_ctf else None
        match_decoder_amplitude(self.decoder, sample.images, sample.pixel_size, ctf, self.data_noise_std,
                                seed=self.seeds["model_init"])

    def truth_rotmat_of(self) -> Callable[[np.ndarray], torch.Tensor] | None:
        """rows → the rotations the particle file gives them (simulated truth or an earlier
        refinement), or None when it has no angles. Matrices are made only for the rows asked."""
        table = getattr(self.dataset, "table", None)
        if table is None or not table.has_pose:
            return None
        return lambda rows: table.pose_rows(rows).rotmat

    # -- structure checks ---------------------------------------------------------------------
    def _check_optimizer_covers_models(self) -> None:
        in_opt = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        for name, module in (("encoder", self.encoder), ("decoder", self.decoder)):
            for pname, p in module.named_parameters():
                if p.requires_grad and id(p) not in in_opt:  # pragma: no cover - a programming error
                    raise RuntimeError(f"trainable parameter {name}.{pname} is not in the optimizer")

    # -- budget -------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int | None:
        """The step budget from ``steps`` and ``epochs`` (the smaller), or None for time only."""
        limits = []
        if self.config.steps is not None:
            limits.append(int(self.config.steps))
        if self.config.epochs is not None:
            limits.append(max(1, math.ceil(self.config.epochs * self.steps_per_epoch)))
        return min(limits) if limits else None

    def _should_stop(self) -> bool:
        """The budget, or the end of the chunk :meth:`fit` was asked for."""
        return self.budget_reached() or (self._until_step is not None and self.step >= self._until_step)

    def budget_reached(self) -> bool:
        max_steps = self.max_steps
        if max_steps is not None and self.step >= max_steps:
            return True
        return self.time_limit_s is not None and self.elapsed_s >= self.time_limit_s

    # -- data ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The particle order of ``epoch``: a permutation drawn from (data-order seed, epoch) alone."""
        cache = self._order_cache  # read once: the prefetch thread may call this too
        if cache is None or cache[0] != epoch:
            seed = np.random.SeedSequence([self.seeds["data_order"], int(epoch)]).generate_state(1)[0]
            perm = torch.randperm(self.n_particles, generator=_torch_generator(int(seed))).numpy()
            self._order_cache = cache = (epoch, perm)
        return cache[1]

    def batch_rows(self, epoch: int, index: int) -> np.ndarray:
        order = self.epoch_order(epoch)
        return order[index * self.batch_size:(index + 1) * self.batch_size]

    def _batches(self):
        """Batches from the current (epoch, batch_in_epoch) on, forever (prefetched with workers)."""
        epoch, start = self.epoch, self.batch_in_epoch
        in_memory = getattr(self.dataset, "in_memory", False)  # io.preload: nothing to read ahead
        workers = 0 if in_memory else self.config.data.num_workers
        while True:  # each rank reads its own part of every global batch
            rows = [self.dist.shard(self.batch_rows(epoch, b)) for b in range(start, self.steps_per_epoch)]
            if workers > 0:
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_size=None, sampler=rows, num_workers=workers,
                    pin_memory=self.device.type == "cuda", generator=_torch_generator(0))
                yield from loader
            else:
                batches = (self.dataset[r] for r in rows)
                yield from batches if in_memory else prefetch(batches, pin_memory=self.device.type == "cuda")
            epoch, start = epoch + 1, 0

    # -- the loss band -----------------------------------------------------------------------
    def band_shells(self, step: int | None = None) -> int:
        """Radius of the loss band at ``step`` in Fourier shells (L/2 = Nyquist; see TrainConfig)."""
        return self.config.band_shells(self.step if step is None else step, self.image_size)

    def grid(self, step: int | None = None) -> HalfDiscGrid:
        """The loss grid at ``step`` (cached per band radius)."""
        shells = self.band_shells(step)
        if shells not in self._grids:
            self._grids[shells] = HalfDiscGrid(self.image_size, device=self.device,
                                               radius_cyc_px=shells / self.image_size)
        return self._grids[shells]

    # -- one step -----------------------------------------------------------------------------
    def loss_on(self, batch, encoder=None, decoder=None, extra_images: torch.Tensor | None = None):
        """The model's forward pass and loss on a ParticleBatch (moved to the device); ``extra_images``
        are encoded in the same pass (compute_loss)."""
        images = batch.images.to(self.device, non_blocking=True)
        pixel_size = batch.pixel_size.to(self.device)
        ctf = batch.ctf.to(device=self.device) if self.use_ctf else None
        encoder = self.encoder if encoder is None else encoder
        decoder = self.decoder if decoder is None else decoder
        cfg = self.config
        warmup = self.step < cfg.warmup_label_steps
        sigma = self.encoder.sigmas_px[cfg.warmup_label_filter - 1] if warmup else None
        return compute_loss(encoder, decoder, images, pixel_size, self.grid(), ctf, loss=cfg.loss,
                            target_lowpass_sigma_px=sigma, n_random=cfg.gsym_views, extra_images=extra_images)

    @contextlib.contextmanager
    def _training_modules(self):
        """The encoder and decoder for a training step: with ``compile``, the encoder and the
        decoder's real network (not its complex-valued wrapper) go through ``torch.compile``; the
        modules themselves (and their state) stay the uncompiled ones, used for export/prediction."""
        if not self._compile:
            yield self._autocast(self.encoder), self.decoder
            return
        if self._compiled is None:
            self._compiled = (torch.compile(self.encoder), torch.compile(self.decoder.network))
        self.decoder.network = self._compiled[1]  # shadows the method on this instance only
        try:
            yield self._autocast(self._compiled[0]), self.decoder
        finally:
            del self.decoder.network

    def _autocast(self, encoder):
        """The encoder under bf16 autocast when ``precision`` asks for it (train.precision)."""
        return encoder if self.autocast_dtype is None else Autocast(encoder, self.device.type, self.autocast_dtype)

    def _forward_backward(self, batch) -> torch.Tensor:
        """Loss and backward of one step; returns the step's :data:`STEP_STATS` but the grad norm.

        The image (IPI) loss plus ``shift_l1``·mean |t| (px), plus λ·PIP (``pip_weight``); with PIP in
        ``alternate`` mode a PIP step has no image loss. The PIP images (rendered in the current band,
        with shifts drawn from the encoder's on the previous batch) go through the encoder in the same
        call as the real images (``joint_batchnorm``), so BatchNorm sees both in one batch.
        """
        cfg = self.config
        lam = 0.0
        if cfg.pip.enabled and self._pip_open:
            lam = pip_weight(self.step, self.pip_lambda, cfg.pip.warmup_steps, cfg.pip.mode)
        pip_only = lam > 0 and cfg.pip.mode == "alternate"
        zero = torch.zeros((), device=self.device)
        with self._training_modules() as (encoder, decoder):
            pixel_size = batch.pixel_size.to(self.device)
            target = None
            if lam > 0:
                ctf = batch.ctf.to(device=self.device) if self.use_ctf else None
                target = pip_render(decoder, shuffled_ctf(ctf, self.device), pixel_size, self.image_size,
                                    noise_std=self.pip_noise_std, snr_db=cfg.pip.snr_db,
                                    shift_sigma_angst=cfg.pip.shift_sigma_angst,
                                    shift_pool_angst=self._pip_shift_pool, freeze_decoder=cfg.pip.freeze_decoder,
                                    symmetric=self.symmetric, grid=self.grid(), full_grid=not cfg.pip.band_limited)
            joint = target.images if target is not None and cfg.pip.joint_batchnorm else None
            total, ipi, rotated, top_head, pip_pose = zero, zero, zero, zero, None
            if not pip_only:
                out = self.loss_on(batch, encoder, decoder, extra_images=joint)
                self.monitor.update(batch.index, out.pose.rotmat)
                ipi, shifts, pip_pose = out.loss, out.pose.shift_angst, out.extra_pose
                self._pip_shift_pool = shifts.detach()
                rotated = out.rotated_won.float().mean()
                # scatter_add, not bincount: bincount sizes its output from the data, a host sync on a GPU
                wins = torch.zeros(self.encoder.n_heads, device=self.device).scatter_add_(
                    0, out.head, torch.ones_like(out.head, dtype=torch.float32))
                top_head = wins.max() / out.head.numel()
                total = ipi
                if cfg.shift_l1 > 0:
                    total = total + cfg.shift_l1 * (shifts / pixel_size[:, None]).abs().sum(-1).mean()
                if not self._pip_open:
                    self._check_pip_amplitude(out)
            elif joint is not None:  # a PIP-only step still normalizes over real + PIP images
                images = batch.images.to(self.device, non_blocking=True)
                poses = encoder(torch.cat([images, joint.to(images.dtype)]))
                n = images.shape[0]
                pip_pose = Pose(rotmat=poses.rotmat[n:], shift_angst=poses.shift_angst[n:])
            pip = zero
            if target is not None:
                if pip_pose is None:  # joint_batchnorm off: a pass of its own
                    pip_pose = encoder(target.images)
                pip = pip_pose_loss(pip_pose, target, pixel_size).loss
                total = total + lam * pip
            total.backward()
        flags = torch.tensor([float(not pip_only), float(lam > 0)], device=self.device)
        return torch.cat([torch.stack([ipi.detach().float(), rotated, pip.detach().float(), top_head.float()]),
                          flags])

    def _check_pip_amplitude(self, out) -> None:
        """Open PIP (from the next step) once ``warmup_steps`` have passed and the decoder's rendered
        amplitude in the loss band (RMS over the band) reaches ``warmup_amplitude`` × the data's signal
        amplitude there (from the images' in-band power minus the white noise's, σ² per pixel spread
        over the band's share of the frequencies). One host sync per step, during this warm-up only."""
        cfg = self.config
        if self.step + 1 < cfg.pip.warmup_steps:
            return
        grid = self.grid()
        powers = self.dist.all_reduce_mean(torch.stack([out.predicted_power.mean(), out.observed_power.mean()]))
        predicted, observed = powers.tolist()
        noise = self.data_noise_std ** 2 * self.image_size ** 2 * float(grid.weights.sum())
        signal = max(observed - noise, 1e-6 * observed)
        if math.sqrt(predicted / signal) >= cfg.pip.warmup_amplitude:
            self._pip_open = True
            self.write_record({"kind": "pip_start", "step": self.step + 1, "pip_weight": self.pip_lambda,
                          "predicted_power": predicted, "signal_power": signal})

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradient norm at ``grad_clip`` per parameter group (encoder, decoder: a growing
        decoder gradient must not shrink the encoder's steps) or over all parameters; returns the total
        norm before clipping."""
        clip = self.config.optim.grad_clip
        limit = clip if clip > 0 else float("inf")
        if not self.config.optim.clip_per_group:
            return torch.nn.utils.clip_grad_norm_(self.params, limit)
        norms = [torch.nn.utils.clip_grad_norm_(group["params"], limit) for group in self.optimizer.param_groups]
        return torch.linalg.vector_norm(torch.stack(norms))

    def train_step(self, batch) -> torch.Tensor:
        """One optimizer step; returns its :data:`STEP_STATS` as one tensor on the device (no sync)."""
        self.encoder.train()
        self.decoder.train()
        self._apply_lr()
        self.optimizer.zero_grad(set_to_none=True)
        if self._compile and self._compiled is None:
            try:
                out = self._forward_backward(batch)
            except Exception as exc:  # no C++ compiler, unsupported backend...: train eagerly
                self.log(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                         "training without it")
                self._compile, self._compiled = False, None
                self.optimizer.zero_grad(set_to_none=True)
                out = self._forward_backward(batch)
        else:
            out = self._forward_backward(batch)
        self._grad_sync.average(self.params)  # mean over ranks (no-op in one process)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        return torch.cat([out[:1], grad_norm.detach().float().reshape(1), out[1:]])

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, until_step: int | None = None) -> None:
        """Train until the budget is reached (see :class:`TrainConfig`), or earlier when ``self.step``
        reaches ``until_step`` (so that a caller can drive training in chunks, e.g. two half-set
        models in turn; the chunk ends with a log record and a checkpoint, like the budget)."""
        from tqdm.auto import tqdm

        self._until_step = until_step
        cfg = self.config
        log_every = cfg.log_every
        ckpt_every = _round_up(cfg.checkpoint_every, log_every)
        vol_every = _round_up(cfg.volume_every, log_every) if cfg.volume_every else 0
        every = cfg.eval_every or cfg.volume_every  # pose metrics; by default with the volumes
        eval_every = _round_up(every, log_every) if every else 0
        if not (self.run_dir / "checkpoints" / "last.pt").is_file():
            self.save_checkpoint()  # the rollback target before the first clean log
        self._open_writer()
        bar = tqdm(total=self.max_steps, initial=self.step, unit="step", desc="training",
                   disable=None if self.progress and self.dist.is_main else True, dynamic_ncols=True)
        try:
            while not self._should_stop():
                if self._run_until_rollback_or_budget(bar, log_every, ckpt_every, vol_every, eval_every):
                    continue
                break
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.flush()

    def _run_until_rollback_or_budget(self, bar, log_every: int, ckpt_every: int, vol_every: int,
                                      eval_every: int) -> bool:
        """Steps until the budget (returns False) or a NaN rollback (returns True, to restart)."""
        zeros = torch.zeros(len(STEP_STATS) + 1, device=self.device)  # + the count of non-finite steps
        acc = zeros.clone()
        since_log, log_start = 0, time.monotonic()
        t0, elapsed0 = time.monotonic(), self.elapsed_s
        for batch in self._batches():
            stats = self.train_step(batch)
            acc[:-1] += torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0)
            acc[-1] += (~torch.isfinite(stats)).any().float()
            self.step += 1
            self.batch_in_epoch += 1
            if self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            since_log += 1
            self.elapsed_s = elapsed0 + (time.monotonic() - t0)
            bar.update(1)
            done = self._should_stop()
            if self.step % log_every and not done:
                continue
            means = self.dist.all_reduce_mean(acc).cpu().tolist()  # the sync
            values = dict(zip(STEP_STATS + ("bad",), means, strict=True))
            now = time.monotonic()
            if values["bad"] > 0:
                self._rollback(values["bad"])
                return True
            ipi_steps, pip_steps = values["ipi_step"], values["pip_step"]
            loss_mean = values["loss"] / ipi_steps if ipi_steps else None
            record = {"kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                      "loss": loss_mean, "grad_norm": values["grad_norm"] / since_log,
                      "lr": self.optimizer.param_groups[0]["lr"],
                      "rotated_fraction": values["rotated_fraction"] / ipi_steps if ipi_steps else None,
                      "pip_loss": values["pip_loss"] / pip_steps if pip_steps else None,
                      "top_head_fraction": values["top_head_fraction"] / ipi_steps
                      if ipi_steps and self.encoder.n_heads > 1 else None,
                      "band_cyc_px": self.band_shells() / self.image_size,
                      "images_per_s": since_log * self.batch_size / max(now - log_start, 1e-9),
                      "elapsed_s": self.elapsed_s}
            self.write_record(record)
            if loss_mean is not None:
                bar.set_postfix(loss=f"{loss_mean:.4g}", refresh=False)
            acc = zeros.clone()
            since_log, log_start = 0, now
            if eval_every and (self.step % eval_every == 0 or done) and self.dist.is_main:
                self.record_pose_metrics()
            if done or self.step % ckpt_every == 0:
                self.save_checkpoint()
            if vol_every and self.step % vol_every == 0 and self.dist.is_main:
                self.export_volume(self.run_dir / f"volume_{self.step:06d}.mrc")
            if done:
                return False
        return False  # pragma: no cover - the batch stream is endless

    def _rollback(self, bad_steps: float) -> None:
        path = self.run_dir / "checkpoints" / "last.pt"
        bad_step = self.step
        self.rollbacks += 1
        if self.rollbacks > self.config.max_rollbacks:
            raise TrainingDiverged(f"the loss became NaN/Inf at step {bad_step} and stayed so after "
                                   f"{self.config.max_rollbacks} rollbacks with lower learning rates; "
                                   "try a smaller --lr")
        factor = self.lr_factor * 0.5
        rollbacks = self.rollbacks
        self.load_checkpoint(path)
        self.lr_factor = factor
        self.rollbacks = rollbacks
        self._apply_lr()
        lr = self.optimizer.param_groups[0]["lr"]
        self.log(f"non-finite loss or gradient in {int(bad_steps)} step(s) before step {bad_step}; rolled back "
                 f"to step {self.step} ({path.name}) with learning rate {lr:.3g}")
        self.write_record({"kind": "rollback", "step": bad_step, "to_step": self.step, "lr": lr,
                           "bad_steps": int(bad_steps)})

    # -- logging ------------------------------------------------------------------------------
    def _open_writer(self) -> None:
        if not self.config.tensorboard or self._writer is not None or not self.dist.is_main:
            return
        self._writer = open_tensorboard(self.run_dir / "tensorboard", self.log)

    def write_record(self, record: dict) -> None:
        """Append ``record`` to the history, to metrics.jsonl and (train/poses kinds) to TensorBoard."""
        self.history.append(record)
        if not self.dist.is_main:  # rank 0 alone writes files
            return
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._writer is not None and record["kind"] in ("train", "poses"):
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def record_pose_metrics(self) -> dict:
        """Coverage (and errors against the file's poses) of the recent training poses: a ``poses``
        record in metrics.jsonl and TensorBoard, and ``viewing_directions.png``."""
        summary = self.monitor.summary()
        if not summary:
            return summary
        record = {"kind": "poses", "step": self.step, "elapsed_s": self.elapsed_s, **summary}
        self.write_record(record)
        from ..evaluate.plots import plot_viewing_directions

        _, rotmat = self.monitor.poses()
        plot_viewing_directions(rotmat, self.run_dir / "viewing_directions.png",
                                title=f"predicted viewing directions, step {self.step} "
                                      f"(coverage {summary['coverage']:.2f})")
        return record

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "elapsed_s": self.elapsed_s, "lr_factor": self.lr_factor, "rollbacks": self.rollbacks,
            "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": _rng_state(), "monitor": self.monitor.state_dict(),
            "pip_open": self._pip_open,
            "pip_shift_pool": self._pip_shift_pool.cpu() if self._pip_shift_pool is not None else None,
            "config": self.config.to_dict(), "data": self.data_info.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXX.pt`` and ``checkpoints/last.pt`` atomically; prune old steps."""
        directory = self.run_dir / "checkpoints"
        path = directory / f"step_{self.step:06d}.pt"
        if not self.dist.is_main:  # rank 0 alone writes (the modules are the same on every rank)
            return path
        state = self.state_dict()
        for target in (path, directory / "last.pt"):
            with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                torch.save(state, fh)  # a file object: a full disk then surfaces as an OSError
        keep = self.config.keep_checkpoints
        old = sorted(directory.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for stale in old[:-keep] if len(old) > keep else []:
            stale.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path) -> None:
        """Restore everything a checkpoint holds (models, optimizer, counters, RNG states)."""
        state = load_checkpoint_file(path)
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.elapsed_s = float(state["elapsed_s"])
        self.lr_factor = float(state["lr_factor"])
        self.rollbacks = int(state["rollbacks"])
        if "monitor" in state:
            self.monitor.load_state_dict(state["monitor"])
        self._pip_open = bool(state.get("pip_open", self._pip_open))
        pool = state.get("pip_shift_pool")
        self._pip_shift_pool = pool.to(self.device) if pool is not None else None
        _set_rng_state(state["rng"])

    # -- outputs ------------------------------------------------------------------------------
    def export_volume(self, path) -> torch.Tensor:
        from .export import export_volume

        return export_volume(self.decoder, self.image_size, path, self.pixel_size, self.config.volume_chunk)

    def finalize(self, volume_name: str = "volume.mrc") -> dict[str, Path]:
        """Write the decoder's map (``volume_name``: ``volume.mrc``, or ``volume_decoder.mrc`` when a later
        stage makes the final map), ``volume.png`` and ``loss.png``; return their paths."""
        from .export import plot_loss, plot_volume

        paths = {"volume": self.run_dir / volume_name, "volume_png": self.run_dir / "volume.png",
                 "loss_png": self.run_dir / "loss.png"}
        if not self.dist.is_main:  # rank 0 alone writes files
            return paths
        volume = self.export_volume(paths["volume"])
        plot_volume(volume, paths["volume_png"], self.pixel_size,
                    title=f"cryoace map after {self.step} steps ({self.image_size}³, {self.pixel_size:.4g} Å/voxel)")
        plot_loss(self.run_dir / "metrics.jsonl", paths["loss_png"])
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return paths


def load_checkpoint_file(path) -> dict:
    """Read a checkpoint (CPU tensors, ``weights_only=True``); :class:`CryoaceInputError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CryoaceInputError("checkpoint not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / foreign file
        raise CryoaceInputError(f"not a readable checkpoint ({type(exc).__name__})", path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CryoaceInputError("not a cryoace checkpoint", path)
    return state


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-int(value) // multiple) * multiple)
