"""The RELION contrast transfer function (astigmatism, phase shift, optional B-factor envelope).

With λ the relativistic electron wavelength (Å), s the spatial frequency (1/Å) and θ its angle from
the image x axis (docs/conventions.md §1):

    Δf(θ) = (ΔfU + ΔfV)/2 + (ΔfU − ΔfV)/2 · cos(2(θ − θ_ast))          (Å, positive = underfocus)
    χ(s)  = π λ Δf s² − (π/2) Cs λ³ s⁴ + φ + arcsin(w)
    CTF   = sin χ · exp(−B s² / 4)

so CTF(0) = +w. This is RELION's sign (RELION negates the defocus internally and returns −sin of
the negated argument) and minus cryoDRGN's ``compute_ctf`` (cryoDRGN inverts images instead).
"""

from __future__ import annotations

import math

import torch

from ..types import CTFParams


def electron_wavelength_angst(voltage_kv: torch.Tensor | float) -> torch.Tensor:
    """Relativistic electron wavelength λ in Å for an accelerating voltage in kV (300 kV → 0.019687 Å)."""
    if not isinstance(voltage_kv, torch.Tensor):
        voltage_kv = torch.as_tensor(voltage_kv, dtype=torch.float64)
    volts = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(volts * (1.0 + volts * 0.978466e-6))


def compute_ctf(params: CTFParams, freq_cyc_px: torch.Tensor, pixel_size: torch.Tensor | float) -> torch.Tensor:
    """CTF values on a frequency grid.

    params      : CTF parameters with leading shape P (e.g. (B,)).
    freq_cyc_px : grid (*G, 2) of (kx, ky) in cycles/px (e.g. ``freq_grid_2d``, centred or not).
    pixel_size  : Å/px, a number or a tensor broadcastable to P.
    Returns a real tensor of shape P + G, differentiable in every argument.
    """
    grid_ndim = freq_cyc_px.ndim - 1
    dtype = freq_cyc_px.dtype

    def expand(value) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=dtype, device=freq_cyc_px.device)
        return value.reshape(value.shape + (1,) * grid_ndim)

    pixel_size = expand(pixel_size)
    kx = freq_cyc_px[..., 0] / pixel_size
    ky = freq_cyc_px[..., 1] / pixel_size
    s2 = kx * kx + ky * ky
    angle = torch.atan2(ky, kx)
    lam = electron_wavelength_angst(expand(params.voltage_kv))
    cs_angst = expand(params.cs_mm) * 1e7
    du, dv = expand(params.defocus_u), expand(params.defocus_v)
    defocus = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2 * (angle - expand(params.defocus_angle)))
    chi = (math.pi * lam * defocus * s2 - 0.5 * math.pi * cs_angst * lam ** 3 * s2 * s2
           + expand(params.phase_shift) + torch.asin(expand(params.amplitude_contrast)))
    return torch.sin(chi) * torch.exp(-expand(params.bfactor) * s2 / 4)
