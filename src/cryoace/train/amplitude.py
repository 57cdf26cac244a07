"""The data's radial amplitude, and a decoder started at it (issue 14).

A freshly initialised neural field renders images 100–1000× weaker than the data at low frequencies,
so for the first tens of steps the image loss is dominated by the missing amplitude and its gradient
with respect to the poses carries nothing. :func:`match_decoder_amplitude` measures

* the data's power per Fourier shell divided by the CTF's — ``(Σ|Ŷ|² − noise) / Σ CTF²`` over a
  sample of normalized images (the noise power σ²·L² per point from the images' background σ), an
  estimate of the radial power of the map's central slices — and
* the decoder's power per shell over central slices at random rotations (no CTF),

and sets the decoder's radial profile (:meth:`~cryoace.models.decoders.HermitianDecoder.set_shell_scale`)
to the square root of their ratio, so that the initial map has the data's radial amplitude. Shells are
whole pixels of radius, 0 … L/2 (Nyquist), on the half spectrum with its Hermitian weights.
"""

from __future__ import annotations

import torch

from ..physics.ctf import compute_ctf
from ..physics.forward import render_spectra
from ..physics.fourier import freq_grid_2d_half, half_grid_weights, rfft2_centered
from ..physics.rotations import random_rotmat
from ..types import CTFParams, Pose

__all__ = ["shell_power", "data_shell_power", "decoder_shell_power", "match_decoder_amplitude"]


def _shell_index(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shell number (round(|k|·L), L/2 + 1 = outside the Nyquist disc) and Hermitian weight of every
    point of the half spectrum (L, L//2 + 1), flattened."""
    freq = freq_grid_2d_half(size, device=device, dtype=torch.float64)
    shell = torch.round(freq.norm(dim=-1) * size).long().clamp(max=size // 2 + 1).reshape(-1)
    weight = half_grid_weights(size, device=device, dtype=torch.float64).expand(size, -1).reshape(-1)
    return shell, weight


def shell_power(half_power: torch.Tensor, size: int) -> torch.Tensor:
    """Weighted sum over the images and the points of each shell (L/2 + 1,) of a power (B, L, L//2 + 1)
    on the half spectrum."""
    shell, weight = _shell_index(size, half_power.device)
    total = (half_power.double().reshape(-1, shell.numel()) * weight).sum(0)
    return torch.zeros(size // 2 + 2, dtype=torch.float64, device=half_power.device).index_add_(
        0, shell, total)[: size // 2 + 1]


def data_shell_power(images: torch.Tensor, pixel_size: torch.Tensor, ctf: CTFParams | None,
                     noise_std: float = 0.0) -> torch.Tensor:
    """Mean power per point of each shell of the map's central slices (L/2 + 1,), estimated from images
    (B, L, L): ``(Σ|Ŷ|² − B·n·σ²L²) / Σ CTF²`` over the images and the shell's n (weighted) points,
    floored at 10⁻⁶ of its maximum."""
    size = images.shape[-1]
    spectra = rfft2_centered(images.double())
    ones = torch.ones_like(spectra.real)
    power = shell_power(spectra.real ** 2 + spectra.imag ** 2, size)
    noise = shell_power(ones, size) * float(noise_std) ** 2 * size ** 2
    if ctf is None:
        ctf2 = shell_power(ones, size)
    else:
        freq = freq_grid_2d_half(size, device=images.device, dtype=torch.float64)
        ctf2 = shell_power(compute_ctf(ctf, freq, pixel_size.double()) ** 2, size)
    signal = (power - noise).clamp(min=0) / ctf2.clamp(min=1e-12)
    return signal.clamp(min=1e-6 * float(signal.max()) + 1e-30)


@torch.no_grad()
def decoder_shell_power(decoder, size: int, n_views: int = 64, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    """Per-shell mean power (L/2 + 1,) of the decoder's central slices at ``n_views`` random rotations
    (no CTF, no shift), per point like :func:`data_shell_power`."""
    rotmat = random_rotmat(n_views, generator, torch.float64).to(device=device, dtype=torch.float32)
    pose = Pose(rotmat=rotmat, shift_angst=torch.zeros(n_views, 2, device=device))
    spectra = render_spectra(decoder, pose, 1.0, size, None, half=True)
    power = spectra.real.double() ** 2 + spectra.imag.double() ** 2
    return shell_power(power, size) / shell_power(torch.ones_like(power), size).clamp(min=1)


def match_decoder_amplitude(decoder, images: torch.Tensor, pixel_size: torch.Tensor, ctf: CTFParams | None,
                            noise_std: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Set ``decoder``'s radial profile so that its central slices have the data's power per shell
    (module docstring); returns the profile (L/2 + 1,). ``images`` (B, L, L) are normalized particle
    images with their ``pixel_size`` (B,) Å/px and CTFs (or None)."""
    size = images.shape[-1]
    decoder.set_shell_scale(torch.ones(0))  # measure the bare network
    data = data_shell_power(images, pixel_size, ctf, noise_std)
    device = decoder.output_scale.device
    model = decoder_shell_power(decoder, size, generator=torch.Generator().manual_seed(seed), device=device).cpu()
    scale = torch.sqrt(data.cpu() / model.clamp(min=1e-30)).float()
    decoder.set_shell_scale(scale)
    return scale
