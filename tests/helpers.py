"""Helpers shared by several test modules (plain functions; the fixtures that use them are at the end
of conftest.py). Test modules import them as ``from helpers import ...`` (tests/ is on sys.path)."""

from __future__ import annotations

import dataclasses
import math

import torch


def simulate_adk(out, n: int = 64, size: int = 32, noise_free: bool = True, seed: int = 0, *,
                 snr_db: float = -10.0, defocus_median: float = 4000.0, defocus_spread: float = 0.15,
                 invert_contrast: bool = False):
    """A small adenylate-kinase dataset through simulate's Python API: molmap at 3 Å/px (6 Å
    resolution) in an L = ``size`` box, CTF (astigmatism 200 Å), shifts of σ 2 Å, noise-free or at
    ``snr_db``; rlnRandomSubset alternates 1, 2. Returns the :class:`SimulationResult`."""
    from cryoace.simulate.molmap import molmap, read_model
    from cryoace.simulate.particles import SimulationConfig, simulate_dataset
    from cryoace.simulate.presets import ADK_MODEL

    volume = molmap(read_model(ADK_MODEL), size, 3.0, 6.0).data
    cfg = SimulationConfig(n=n, snr_db=None if noise_free else snr_db, shift_std_angst=2.0,
                           defocus_median=defocus_median, defocus_spread=defocus_spread, astigmatism=200.0,
                           seed=seed, invert_contrast=invert_contrast)
    return simulate_dataset(volume, 3.0, out, cfg, progress=False)


class ImagesChanged:
    """``dataset`` whose images a subclass changes (:meth:`changed`, given the batch and its rows) at every
    access; every other field (CTF, pose, …) kept."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        import numpy as np

        batch = self.dataset[index]
        rows = [int(k) for k in np.atleast_1d(np.asarray(index))]
        return dataclasses.replace(batch, images=self.changed(batch.images, rows))

    def changed(self, images: torch.Tensor, rows: list[int]) -> torch.Tensor:
        raise NotImplementedError


class NoiseReplaced(ImagesChanged):
    """``dataset`` with the images at ``rows`` replaced by Gaussian noise of standard deviation ``std``,
    the same for a row at every access (seeded by it)."""

    def __init__(self, dataset, rows, std: float):
        super().__init__(dataset)
        self.rows, self.std = {int(r) for r in rows}, float(std)

    def changed(self, images, rows):
        noise = torch.stack([torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(1000 + k))
                             for k in rows]).to(images.dtype) * self.std
        replace = torch.tensor([k in self.rows for k in rows])
        return torch.where(replace[:, None, None], noise, images)


class Shifted(ImagesChanged):
    """``dataset`` with every image moved by ``delta_px`` (N, 2) px (a Fourier phase ramp: the pose
    shift of row i becomes its old one + ``delta_px[i]``, the convention of ``physics.forward``);
    ``shift_angst`` holds the new true shifts."""

    def __init__(self, dataset, delta_px: torch.Tensor):
        super().__init__(dataset)
        self.delta_px = torch.as_tensor(delta_px, dtype=torch.float64)
        pixel_size = torch.tensor(dataset.table.pixel_size, dtype=torch.float64)
        self.shift_angst = dataset.table.pose.shift_angst.double() + self.delta_px * pixel_size[:, None]

    def changed(self, images, rows):
        from cryoace.physics.fourier import freq_grid_2d_half, irfft2_centered, rfft2_centered
        from cryoace.physics.shift import phase_ramp

        size = images.shape[-1]
        ramp = phase_ramp(freq_grid_2d_half(size, dtype=torch.float64), self.delta_px[torch.tensor(rows)])
        return irfft2_centered(rfft2_centered(images.double()) * ramp, size).to(images.dtype)


def tiny_config(**changes):
    """The tiny preset on the CPU with batch 8 and no intermediate maps, with ``changes`` applied."""
    from cryoace.train.config import preset_config

    cfg = preset_config("tiny")
    cfg.batch_size = 8
    cfg.volume_every = 0
    cfg.device = "cpu"
    return dataclasses.replace(cfg, **changes)


def adk_volume(size: int = 32) -> torch.Tensor:
    """Adenylate kinase at 1.5 Å/px (float64), cropped to the central size³ and band-limited inside
    0.4 cycles/px (so trilinear slices of its padded transform are Hermitian to rounding)."""
    from cryoace.io.mrc import read_volume
    from cryoace.physics.fourier import circular_mask, fft3_centered, ifft3_centered

    from conftest import TEST_DATA

    v = torch.tensor(read_volume(TEST_DATA / "volumes/adk_open_4ake_L64_1.5A.mrc").data, dtype=torch.float64)
    lo = 32 - size // 2
    v = v[lo:lo + size, lo:lo + size, lo:lo + size]
    spectrum = fft3_centered(v) * circular_mask(size, 0.4 * size, 3)
    return ifft3_centered(spectrum).real


def aspire_spike_clean():
    """The 100 noise-free ASPIRE spike particles (another simulator: RELION-convention poses, shifts and
    CTFs), all of them as one batch, and the true map scaled to their units — the least-squares factor
    between the map's projections at the file's poses and the images (ASPIRE's intensity units are
    not our projector's). Returns ``(dataset, batch, map)``."""
    import numpy as np

    from cryoace.io.mrc import read_volume
    from cryoace.io.particles import ParticleDataset, read_particles
    from cryoace.physics.forward import VoxelFourierVolume, render_images

    from conftest import TEST_DATA

    dataset = ParticleDataset(read_particles(TEST_DATA / "particles/sim_aspire_spike_L64_ctf_clean/particles.star"),
                              normalize=False)
    spike = torch.tensor(read_volume(TEST_DATA / "volumes/spike_6vyb_L64_3.0A.mrc").data, dtype=torch.float32)
    batch = dataset[np.arange(len(dataset))]
    rendered = render_images(VoxelFourierVolume.from_real(spike, 2), batch.pose, batch.pixel_size, 64, batch.ctf)
    scale = float((rendered * batch.images).sum() / (rendered * rendered).sum())
    return dataset, batch, spike * scale


def c3_map(size: int = 32) -> torch.Tensor:
    """Three identical Gaussian blobs 120° apart about z, plus a blob on the axis below them (C3, and
    not D3 or C6)."""
    c = torch.arange(size, dtype=torch.float64) - size // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")

    def blob(px, py, pz, s):
        return torch.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * s * s))

    v = blob(0, 0, -4, 3.0)
    for k in range(3):
        t = 2 * math.pi * k / 3
        v = v + blob(7 * math.cos(t), 7 * math.sin(t), 3, 2.0) + 0.7 * blob(
            5 * math.cos(t + 0.6), 5 * math.sin(t + 0.6), -5, 1.5)
    return v


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd, timeout: float = 120, worker_exits: tuple[int, ...] = (0,)):
    """``torchrun --nproc-per-node 2`` on the loopback interface, one thread per process; asserts that
    it ended with one of ``worker_exits`` (e.g. (0, 4): done, or NOT RESOLVED)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    ended = (proc.returncode == 0 and 0 in worker_exits) or any(
        f"exitcode  : {status} " in proc.stderr for status in worker_exits if status)
    assert ended, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
