"""Map → particle dataset: random poses, shifts, CTFs and white noise, written in constant memory.

Image formation is :func:`cryoace.physics.forward.render_images` on
``VoxelFourierVolume.from_real(volume, pad_factor=2)`` — the same path every decoder uses:

    image = IFFT2[ CTF(k) · exp(+2πi k·t) · V̂(Rᵀk) ] + noise

(docs/conventions.md §1: ``R`` is RELION's matrix, ``t`` RELION's origin in Å, the CTF RELION's with
``CTF(0) = +w``, particles white on a dark background). ``projector="real"`` instead rotates and sums
the real-space volume (:func:`cryoace.physics.projector.project_real_space`) and then applies the same
shift and CTF functions in Fourier space — a second, independent projector for model-mismatch studies.

Randomness (docs/conventions.md §1): the run seed spawns one seed per purpose with
``numpy.random.SeedSequence(seed).spawn`` — ``poses`` (Haar-uniform rotations), ``shifts``
(N(0, σ) Å per axis), ``defocus`` (log-normal defocus, astigmatism, its angle) and ``noise``. The noise
of particles ``[256·b, 256·(b+1))`` comes from a generator seeded with ``SeedSequence([noise, b])``,
so a dataset does not depend on how it was chunked. All of them are recorded in ``simulation.yaml``.

Noise: ``SNR = var(clean) / σ²`` (docs/conventions.md §1: ``var(clean)`` is the mean over the dataset of each
noise-free, CTF-modulated, shifted image's variance over the whole box — cryoDRGN's definition, not
ASPIRE's disc energy). ``var(clean)`` is estimated from the first ``pilot`` images (up to 1000), which
are rendered first and kept, so every image is rendered once and written once.

Outputs (in ``out_dir``): ``particles.mrcs`` (or ``particles_000.mrcs``, ``particles_001.mrcs``… with
at most ``stack_size`` images each), ``particles.star`` (RELION 3.1: optics + particles with the true
poses, CTF and ``rlnRandomSubset`` alternating 1, 2), ``volume.mrc`` (the ground-truth map) and
``simulation.yaml`` (every parameter, the seeds, the noise σ, the cryoace version). Stacks are
written chunk by chunk (:class:`cryoace.io.mrc.MrcStackWriter`: sequential writes after the header),
so memory does not grow with N; every file is written under a temporary name and renamed when
complete, and a failed run removes what it wrote.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CryoaceInputError
from ..physics.ctf import compute_ctf, electron_wavelength_angst
from ..physics.forward import VoxelFourierVolume, render_images
from ..physics.fourier import fft2_centered, freq_grid_2d, ifft2_centered
from ..physics.projector import project_real_space
from ..physics.rotations import random_rotmat
from ..physics.shift import phase_ramp
from ..types import CTFParams, Pose

__all__ = ["SimulationConfig", "SimulationResult", "ParticleRenderer", "spawn_seeds", "draw_poses",
           "draw_ctf", "noise_images", "simulate_dataset", "output_paths", "SEED_PURPOSES",
           "NOISE_BLOCK"]

SEED_PURPOSES = ("poses", "shifts", "defocus", "noise")
#: particles per independently seeded block of noise (so chunking never changes the noise)
NOISE_BLOCK = 256
#: at most this many images (and about 256 MiB) estimate the signal variance for the SNR
PILOT_IMAGES = 1000
SNR_DEFINITION = ("SNR = var(clean) / sigma^2; var(clean) = mean over images of the variance over the "
                  "whole box of the noise-free, CTF-modulated, shifted image (docs/conventions.md §1, cryoDRGN's "
                  "definition)")


@dataclasses.dataclass
class SimulationConfig:
    """Every parameter of a simulation (units in the names; defocus, shifts in Å).

    n                  : number of particles.
    snr_db             : 10·log10(SNR) of the added white Gaussian noise; None = noise-free.
    shift_std_angst    : σ (Å) of the normal shift along x and along y (ignored with given poses).
    ctf                : False = no CTF (images are plain projections).
    defocus_median     : Å, median of the log-normal mean defocus (ΔfU + ΔfV)/2.
    defocus_spread     : σ of ln(defocus) (0.2 ≈ ±20 %); 0 = every particle at the median.
    astigmatism        : Å, ΔfU − ΔfV drawn uniformly in [0, astigmatism]; angle uniform in [0°, 180°).
    voltage_kv, cs_mm, amplitude_contrast, bfactor : microscope (bfactor Å², envelope exp(−B s²/4)).
    invert_contrast    : multiply the final images by −1 (dark particles on a light background).
    projector          : "fourier" (physics.forward, pad 2) or "real" (real-space rotate and sum).
    seed               : the run seed (non-negative); per-purpose seeds are spawned from it.
    stack_size         : most images per .mrcs file.
    batch_size         : images rendered at once (None: about 4 Mi pixels per batch).
    pad_factor         : zero-padding of the Fourier volume (2, as the decoders use).
    """

    n: int
    snr_db: float | None = None
    shift_std_angst: float = 0.0
    ctf: bool = True
    defocus_median: float = 15000.0
    defocus_spread: float = 0.2
    astigmatism: float = 0.0
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float = 0.0
    invert_contrast: bool = False
    projector: str = "fourier"
    seed: int = 0
    stack_size: int = 100_000
    batch_size: int | None = None
    pad_factor: int = 2

    def validate(self) -> None:
        """Raise :class:`CryoaceInputError` (one line) for any impossible value."""
        def finite(name, value):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise CryoaceInputError(f"{name} must be a finite number, got {value!r}")

        if not isinstance(self.n, (int, np.integer)) or self.n <= 0:
            raise CryoaceInputError(f"the number of particles must be a positive integer, got {self.n}")
        if self.snr_db is not None:
            finite("--snr-db", self.snr_db)
        finite("--shift-std", self.shift_std_angst)
        if self.shift_std_angst < 0:
            raise CryoaceInputError(f"--shift-std must be >= 0 Å, got {self.shift_std_angst:g}")
        for name, value in (("--defocus-median", self.defocus_median), ("--defocus-spread", self.defocus_spread),
                            ("--astigmatism", self.astigmatism), ("--voltage", self.voltage_kv),
                            ("--cs", self.cs_mm), ("--amplitude-contrast", self.amplitude_contrast),
                            ("--bfactor", self.bfactor)):
            finite(name, value)
        if self.ctf:
            if self.defocus_median <= 0:
                raise CryoaceInputError(f"--defocus-median must be > 0 Å (underfocus), got {self.defocus_median:g}")
            if self.defocus_spread < 0:
                raise CryoaceInputError(f"--defocus-spread must be >= 0, got {self.defocus_spread:g}")
            if not 0 <= self.astigmatism < self.defocus_median:
                raise CryoaceInputError(f"--astigmatism must be in [0, defocus median) Å, got {self.astigmatism:g}")
            if self.voltage_kv <= 0:
                raise CryoaceInputError(f"--voltage must be > 0 kV, got {self.voltage_kv:g}")
            if self.cs_mm < 0:
                raise CryoaceInputError(f"--cs must be >= 0 mm, got {self.cs_mm:g}")
            if not 0 <= self.amplitude_contrast <= 1:
                raise CryoaceInputError(f"--amplitude-contrast must be in [0, 1], got {self.amplitude_contrast:g}")
        if self.projector not in ("fourier", "real"):
            raise CryoaceInputError(f"--projector must be 'fourier' or 'real', got {self.projector!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise CryoaceInputError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.stack_size <= 0:
            raise CryoaceInputError(f"--stack-size must be positive, got {self.stack_size}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise CryoaceInputError(f"--batch-size must be positive, got {self.batch_size}")
        if self.pad_factor < 1:
            raise CryoaceInputError(f"pad factor must be >= 1, got {self.pad_factor}")


@dataclasses.dataclass
class SimulationResult:
    """What :func:`simulate_dataset` wrote, and the noise it used."""

    out_dir: Path
    star: Path
    stacks: list[Path]
    volume: Path
    config_yaml: Path
    n: int
    box_size: int
    pixel_size: float
    noise_sigma: float
    signal_variance: float
    seeds: dict[str, int]


# ---------------------------------------------------------------------------------------------
# Random parameters
# ---------------------------------------------------------------------------------------------

def _seed_int(seq: np.random.SeedSequence) -> int:
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))  # 63 bits: YAML/torch friendly


def spawn_seeds(seed: int) -> dict[str, int]:
    """One integer seed per purpose (``SEED_PURPOSES``) spawned from the run seed."""
    children = np.random.SeedSequence(int(seed)).spawn(len(SEED_PURPOSES))
    return {purpose: _seed_int(child) for purpose, child in zip(SEED_PURPOSES, children, strict=True)}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def draw_poses(n: int, shift_std_angst: float, seeds: dict[str, int]) -> Pose:
    """Haar-uniform rotations (seed ``poses``) and N(0, σ²) shifts in Å per axis (seed ``shifts``), float64."""
    rotmat = random_rotmat(n, generator=_generator(seeds["poses"]), dtype=torch.float64)
    shift = torch.randn(n, 2, generator=_generator(seeds["shifts"]), dtype=torch.float64) * shift_std_angst
    return Pose(rotmat=rotmat, shift_angst=shift)


def draw_ctf(n: int, cfg: SimulationConfig, seed: int) -> CTFParams:
    """Per-particle RELION CTF parameters (float64): log-normal mean defocus, uniform astigmatism
    amplitude in [0, ``astigmatism``] split symmetrically (ΔfU ≥ ΔfV) and a uniform angle in [0, π)."""
    g = _generator(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    mean = cfg.defocus_median * torch.exp(cfg.defocus_spread * z)
    astig = u[:, 0] * cfg.astigmatism
    return CTFParams.create(defocus_u=mean + astig / 2, defocus_v=mean - astig / 2,
                            defocus_angle=u[:, 1] * math.pi, voltage_kv=cfg.voltage_kv, cs_mm=cfg.cs_mm,
                            amplitude_contrast=cfg.amplitude_contrast, phase_shift=0.0,
                            bfactor=cfg.bfactor, dtype=torch.float64)


def _block_generator(noise_seed: int, block: int) -> torch.Generator:
    return _generator(_seed_int(np.random.SeedSequence([int(noise_seed), int(block)])))


def noise_images(noise_seed: int, start: int, stop: int, size: int) -> torch.Tensor:
    """Standard normal noise (stop − start, size, size) float32 for particles [start, stop).

    Particle i's noise depends only on (noise_seed, i): blocks of ``NOISE_BLOCK`` particles each have
    their own generator, so any chunking of the dataset gives the same noise.
    """
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    blocks = [torch.randn(NOISE_BLOCK, size, size, generator=_block_generator(noise_seed, b))
              for b in range(first, last + 1)]
    noise = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    offset = first * NOISE_BLOCK
    return noise[start - offset:stop - offset]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

class ParticleRenderer:
    """Clean (noise-free) particle images of one volume: ``renderer(pose, ctf) -> (B, L, L)`` float32.

    volume     : real map (L, L, L), (z, y, x), centre at voxel L//2.
    pixel_size : Å/px (converts shifts and the CTF).
    projector  : "fourier" — ``render_images`` on ``VoxelFourierVolume.from_real(volume, pad_factor)``;
                 "real" — ``project_real_space`` then the same ``phase_ramp`` and ``compute_ctf`` on the
                 image's Fourier grid.
    """

    def __init__(self, volume: torch.Tensor, pixel_size: float, projector: str = "fourier",
                 pad_factor: int = 2, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.size = int(volume.shape[-1])
        self.pixel_size = float(pixel_size)
        self.projector = projector
        volume = torch.as_tensor(volume, dtype=torch.float32).to(self.device)
        if projector == "fourier":
            self.fourier_volume = VoxelFourierVolume.from_real(volume, pad_factor=pad_factor)
        elif projector == "real":
            self.volume = volume
            self.freq = freq_grid_2d(self.size, device=self.device, dtype=torch.float32)
        else:
            raise CryoaceInputError(f"unknown projector {projector!r} (fourier or real)")

    def __call__(self, pose: Pose, ctf: CTFParams | None) -> torch.Tensor:
        pose = pose.to(self.device, torch.float32)
        ctf = None if ctf is None else ctf.to(self.device, torch.float32)
        with torch.no_grad():
            if self.projector == "fourier":
                return render_images(self.fourier_volume, pose, self.pixel_size, self.size, ctf)
            spectra = fft2_centered(project_real_space(self.volume, pose.rotmat))
            spectra = spectra * phase_ramp(self.freq, pose.shift_angst / self.pixel_size)
            if ctf is not None:
                spectra = spectra * compute_ctf(ctf, self.freq, self.pixel_size)
            return ifft2_centered(spectra).real


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def output_paths(out_dir: Path, n: int, stack_size: int) -> tuple[list[Path], list[tuple[int, int]]]:
    """Stack files and their particle ranges: one ``particles.mrcs`` or ``particles_000.mrcs``…"""
    n_stacks = -(-n // stack_size)
    ranges = [(s * stack_size, min(n, (s + 1) * stack_size)) for s in range(n_stacks)]
    if n_stacks == 1:
        return [out_dir / "particles.mrcs"], ranges
    width = max(3, len(str(n_stacks - 1)))
    return [out_dir / f"particles_{s:0{width}d}.mrcs" for s in range(n_stacks)], ranges


def _existing_outputs(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    names = {"particles.star", "particles.mrcs", "volume.mrc", "simulation.yaml"}
    return sorted(p for p in out_dir.iterdir()
                  if p.name in names or (p.name.startswith("particles_") and p.suffix == ".mrcs"))


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a directory already holding a dataset (unless ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CryoaceInputError("output exists and is not a directory", out_dir)
    existing = _existing_outputs(out_dir)
    if existing and not overwrite:
        raise CryoaceInputError(f"output directory already holds a dataset ({existing[0].name}); "
                                "choose another directory or pass --overwrite", out_dir)


def _plain(obj: Any) -> Any:
    """Nested dicts/lists of builtin types only (for yaml.safe_dump)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if obj is None or isinstance(obj, str) and type(obj) is str:
        return obj
    return str(obj)


def _default_batch(size: int) -> int:
    return max(1, (1 << 22) // (size * size))


def simulate_dataset(volume: np.ndarray | torch.Tensor, pixel_size: float, out_dir: str | os.PathLike,
                     cfg: SimulationConfig, poses: Pose | None = None,
                     volume_origin: tuple[float, float, float] | None = None,
                     provenance: dict[str, Any] | None = None, overwrite: bool = False,
                     progress: bool = True, device: torch.device | str = "cpu",
                     log: Callable[[str], None] | None = None) -> SimulationResult:
    """Simulate ``cfg.n`` particles of ``volume`` (L³, ``pixel_size`` Å/px) into ``out_dir``.

    poses         : given poses (Pose with ≥ n rows: rotmat and shift_angst), else random ones.
    volume_origin : header origin (Å) for the written ground-truth map (e.g. from molmap).
    provenance    : extra entries for ``simulation.yaml`` (input file, preset, command line...).
    log           : called with one-line messages (warnings such as CTF aliasing).
    See the module docstring for the physics, seeds and files.
    """
    import yaml
    from tqdm.auto import tqdm

    from .. import __version__
    from ..io.atomic import atomic_path, remove_stale_staging, staged_folder
    from ..io.mrc import MrcStackWriter, write_mrc
    from ..io.particles import ParticleTable, no_ctf_params
    from ..io.star import write_star

    cfg.validate()
    out_dir = Path(out_dir)
    volume = (volume.detach().float().cpu() if isinstance(volume, torch.Tensor)
              else torch.from_numpy(np.array(volume, dtype=np.float32)))
    if volume.ndim != 3 or len(set(volume.shape)) != 1 or volume.shape[0] % 2:
        raise CryoaceInputError(f"the map must be a cubic volume with an even side, got shape {tuple(volume.shape)}")
    if not torch.isfinite(volume).all():
        raise CryoaceInputError("the map contains NaN or Inf values")
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise CryoaceInputError(f"pixel size must be a positive number of Å, got {pixel_size:g}")
    size = int(volume.shape[-1])
    n = int(cfg.n)
    seeds = spawn_seeds(cfg.seed)

    if poses is not None:
        if poses.rotmat.shape[0] < n:
            raise CryoaceInputError(f"{n} particles asked for but only {poses.rotmat.shape[0]} poses given")
        pose = Pose(rotmat=poses.rotmat[:n].double(), shift_angst=poses.shift_angst[:n].double())
    else:
        pose = draw_poses(n, cfg.shift_std_angst, seeds)
    ctf = draw_ctf(n, cfg, seeds["defocus"]) if cfg.ctf else None
    if ctf is not None and log is not None:
        # CTF aliasing: the defocus delocalizes signal by λ·Δf·s; at Nyquist beyond half the box the
        # CTF oscillates faster than the image grid samples it.
        # Warn when more than 1 % of the particles are affected.
        lam = float(electron_wavelength_angst(cfg.voltage_kv))
        high = float(torch.quantile(ctf.defocus_u, 0.99)) if n > 1 else float(ctf.defocus_u[0])
        reach = lam * high / (2 * pixel_size)
        if reach > size * pixel_size / 2:
            log(f"warning: defocus up to {high:.0f} Å (99th percentile) delocalizes Nyquist detail by "
                f"{reach:.0f} Å, more than half the box ({size * pixel_size / 2:.0f} Å): the CTF aliases "
                "at high frequency; use a smaller --defocus-median or a larger box")

    check_output_dir(out_dir, overwrite)
    stack_paths, ranges = output_paths(out_dir, n, cfg.stack_size)
    batch = cfg.batch_size or _default_batch(size)
    renderer = ParticleRenderer(volume, pixel_size, cfg.projector, cfg.pad_factor, device)

    def render(start: int, stop: int) -> torch.Tensor:
        p = pose[start:stop]
        c = None if ctf is None else ctf[start:stop]
        return renderer(p, c).cpu()

    # Pilot: the first images, kept in memory and reused, estimate var(clean) for the SNR.
    n_pilot = min(n, PILOT_IMAGES, max(64, (1 << 26) // (size * size)))
    pilot = torch.cat([render(s, min(s + batch, n_pilot)) for s in range(0, n_pilot, batch)])
    signal_var = float(pilot.double().var(dim=(-2, -1), unbiased=False).mean())
    if cfg.snr_db is None:
        sigma = 0.0
    else:
        if not signal_var > 0:
            raise CryoaceInputError("the clean images are constant (an empty map?); cannot set the noise "
                                    "from an SNR")
        sigma = math.sqrt(signal_var / 10 ** (cfg.snr_db / 10))

    # The dataset is written into a hidden folder beside out_dir that becomes out_dir (or moves its
    # files in, replacing an --overwrite'n dataset) only when complete: a killed run leaves no partial
    # dataset, and the folders that killed runs left are removed here.
    stale = remove_stale_staging(out_dir)
    if stale and log is not None:
        log(f"removed {len(stale)} unfinished dataset folder(s) of killed runs: {', '.join(p.name for p in stale)}")
    staging = staged_folder(out_dir, replaced=_existing_outputs(out_dir) if overwrite else [])
    stage = staging.__enter__()
    volume_path = stage / "volume.mrc"
    star_path = stage / "particles.star"
    yaml_path = stage / "simulation.yaml"
    bar = tqdm(total=n, unit="img", desc="simulating", disable=None if progress else True, leave=False)
    try:
        write_mrc(volume_path, volume.numpy(), pixel_size, origin=volume_origin)
        for stack_path, (s0, s1) in zip((stage / p.name for p in stack_paths), ranges, strict=True):
            with MrcStackWriter(stack_path, s1 - s0, size, pixel_size) as stack:
                for start in range(s0, s1, batch):
                    stop = min(start + batch, s1)
                    if stop <= n_pilot:
                        images = pilot[start:stop]
                    elif start < n_pilot:
                        images = torch.cat([pilot[start:], render(n_pilot, stop)])
                    else:
                        images = render(start, stop)
                    if sigma > 0:
                        images = images + sigma * noise_images(seeds["noise"], start, stop, size)
                    if cfg.invert_contrast:
                        images = -images
                    stack.write(images.numpy())
                    bar.update(stop - start)
        bar.close()
        del pilot

        image_paths = np.empty(n, dtype=object)
        image_indices = np.empty(n, dtype=np.int64)
        for stack_path, (s0, s1) in zip(stack_paths, ranges, strict=True):
            image_paths[s0:s1] = str((stage / stack_path.name).resolve())
            image_indices[s0:s1] = np.arange(s1 - s0)
        import pandas as pd

        table = ParticleTable(
            source=star_path.resolve(), image_paths=image_paths, image_indices=image_indices,
            pixel_size=np.full(n, float(pixel_size)),
            ctf=ctf if ctf is not None else no_ctf_params(n, cfg.voltage_kv), has_ctf=ctf is not None,
            pose=pose, image_size=np.full(n, size, dtype=np.int64),
            extra=pd.DataFrame({"rlnRandomSubset": (np.arange(n) % 2 + 1).astype(np.int64)}))
        write_star(star_path, table)

        record = {
            "cryoace_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            **(provenance or {}),
            "n_particles": n,
            "box_size": size,
            "pixel_size_angst": float(pixel_size),
            "parameters": dataclasses.asdict(cfg),
            "poses_source": "given" if poses is not None else "random (Haar-uniform rotations, normal shifts)",
            "seeds": {"run": int(cfg.seed), **seeds, "noise_block": NOISE_BLOCK,
                      "scheme": "numpy SeedSequence(run).spawn(4) -> poses, shifts, defocus, noise; "
                                "noise of block b from SeedSequence([noise, b]); torch.Generator.manual_seed"},
            "noise": {
                "snr_db": cfg.snr_db,
                "snr": None if cfg.snr_db is None else float(10 ** (cfg.snr_db / 10)),
                "sigma": float(sigma),
                "signal_variance": signal_var,
                "pilot_images": int(n_pilot),
                "definition": SNR_DEFINITION,
            },
            "conventions": "RELION: R = Euler_angles2matrix(rot, tilt, psi); rlnOriginX/YAngst = pose shift "
                           "(image = projection translated by -origin); CTF(0) = +w; particles white "
                           "unless invert_contrast",
            "outputs": {"star": star_path.name, "stacks": [p.name for p in stack_paths],
                        "volume": volume_path.name},
            "device": str(renderer.device),
        }
        with atomic_path(yaml_path) as tmp:
            with open(tmp, "w") as fh:
                yaml.safe_dump(_plain(record), fh, sort_keys=False, allow_unicode=True)
    except BaseException as exc:
        bar.close()
        staging.__exit__(type(exc), exc, exc.__traceback__)  # removes the staging folder
        raise
    staging.__exit__(None, None, None)  # the dataset moves into out_dir
    return SimulationResult(out_dir=out_dir, star=out_dir / star_path.name, stacks=stack_paths,
                            volume=out_dir / volume_path.name, config_yaml=out_dir / yaml_path.name,
                            n=n, box_size=size, pixel_size=float(pixel_size),
                            noise_sigma=float(sigma), signal_variance=signal_var, seeds=seeds)
