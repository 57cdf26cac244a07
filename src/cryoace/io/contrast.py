"""Are the particles white on a dark background (docs/conventions.md §1)? A pose-free check before training.

The expected data are RELION's: ``image = CTF_RELION * projection + noise`` with positive density,
so at low frequency (CTF(0) = +w, positive up to the first zero) a particle is brighter than its
surroundings. Stacks extracted without RELION's "invert contrast" are the opposite, and training on
them silently produces a map of negative density (a hollow, unrecognisable result).

Method (no poses needed): each image of a random subset (≤ ``max_images``) is low-passed by a
Fourier crop to ``lowpass_size`` px, and *phase-flipped* with its own CTF — multiplied in Fourier
space by ``sign(CTF)`` (:func:`cryoace.physics.ctf.compute_ctf` on the cropped grid at the cropped
pixel size), which turns every frequency band of a white particle positive again, so defocus beyond
the first CTF zero cannot flip the answer (without CTF columns the flip is skipped). Its contrast is
the mean inside a central disc (radius ``L/4``, a typical particle radius: particles are roughly
centred) minus the mean over an annulus ``[0.375 L, 0.5 L)`` near the box edge (background). The
per-image contrasts give a z-score ``mean / (std / √n)``: ``z ≥ threshold`` → white on dark ("ok"),
``z ≤ −threshold`` → dark on white ("inverted"), else "unclear" (too few or too noisy images: a
warning, not a stop). Per-image DC offsets cancel in the difference, so normalisation does not matter.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..physics.ctf import compute_ctf
from ..physics.fourier import fft2_centered, fourier_crop, freq_grid_2d, ifft2_centered, radial_distance

__all__ = ["ContrastCheck", "check_contrast"]

#: disc radius and annulus bounds as fractions of the box side L
DISC_RADIUS = 0.25
ANNULUS = (0.375, 0.5)


@dataclasses.dataclass(frozen=True)
class ContrastCheck:
    """Outcome of :func:`check_contrast`.

    verdict     : "ok" (white on dark, as expected), "inverted" (dark on white) or "unclear".
    z_score     : mean per-image contrast over its standard error (positive = white on dark).
    contrast    : mean per-image contrast (disc − annulus) of the test images, in the dataset's image
                  units (normalised datasets: units of the pixel std).
    n_images    : images used.
    ctf_flipped : whether the images were phase-flipped with their CTF.
    lowpass_size: box (px) of the low-passed test images.
    threshold   : |z| needed for a decision.
    """

    verdict: str
    z_score: float
    contrast: float
    n_images: int
    ctf_flipped: bool
    lowpass_size: int
    threshold: float

    @property
    def inverted(self) -> bool:
        return self.verdict == "inverted"

    def describe(self) -> str:
        """One line: the verdict and its evidence."""
        what = {"ok": "white particles on a dark background (as expected)",
                "inverted": "dark particles on a light background (inverted contrast)",
                "unclear": "neither clearly white nor clearly dark"}[self.verdict]
        flip = "CTF phase-flipped" if self.ctf_flipped else "no CTF"
        return (f"{what}: centre−background z = {self.z_score:+.1f} over {self.n_images} images "
                f"({flip}, low-passed to {self.lowpass_size} px; |z| ≥ {self.threshold:g} decides)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _contrast_weights(size: int) -> torch.Tensor:
    """(size, size) float64 weights w with ``Σ w·img`` = mean(disc) − mean(annulus) about L//2."""
    r = radial_distance(size, 2, dtype=torch.float64)
    disc = r < DISC_RADIUS * size
    ring = (r >= ANNULUS[0] * size) & (r < ANNULUS[1] * size)
    return disc / disc.sum() - ring / ring.sum()


def check_contrast(dataset, max_images: int = 1000, lowpass_size: int = 32, threshold: float = 4.0,
                   seed: int = 0, use_ctf: bool = True, batch_size: int = 256) -> ContrastCheck:
    """Decide whether a :class:`~cryoace.io.particles.ParticleDataset`'s images (as it returns them,
    i.e. after its own ``invert_contrast``) show white particles on a dark background (module doc).

    max_images   : random subset size (seeded by ``seed``); all images when fewer.
    lowpass_size : Fourier-crop the images to this box (even; capped at the image size) first (px).
    threshold    : |z| at which the verdict is "ok"/"inverted" rather than "unclear".
    use_ctf      : phase-flip with the file's CTF when it has one.
    """
    n_total = len(dataset)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n_total, size=min(n_total, int(max_images)), replace=False))
    size = min(int(dataset.image_size), int(lowpass_size))
    size -= size % 2
    flip = bool(use_ctf and dataset.has_ctf)
    weights = _contrast_weights(size)
    grid = freq_grid_2d(size, dtype=torch.float64)
    contrasts = []
    for start in range(0, len(rows), batch_size):
        batch = dataset[rows[start:start + batch_size]]
        images = fourier_crop(batch.images.double(), size)
        if flip:
            # cropping keeps the box's physical extent: the pixel grows by image_size / size
            pixel = batch.pixel_size.double() * (dataset.image_size / size)
            sign = torch.sign(compute_ctf(batch.ctf.to(torch.float64), grid, pixel))
            images = ifft2_centered(fft2_centered(images) * sign).real
        contrasts.append((images * weights).sum((-1, -2)))
    c = torch.cat(contrasts)
    n = len(c)
    std = float(c.std()) if n > 1 else math.inf
    # one image (std undefined) or identical images (std 0): no error estimate, so no decision
    z = float(c.mean()) / (std / math.sqrt(n)) if 0 < std < math.inf else 0.0
    verdict = "ok" if z >= threshold else "inverted" if z <= -threshold else "unclear"
    return ContrastCheck(verdict=verdict, z_score=z, contrast=float(c.mean()), n_images=n, ctf_flipped=flip,
                         lowpass_size=size, threshold=float(threshold))
