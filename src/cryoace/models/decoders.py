"""Neural Fourier volumes: FourierNet (cryoAI), a plain SIREN, and a ReLU MLP with positional encoding.

Every decoder here is a *Fourier volume* in the sense of :mod:`cryoace.physics.forward`:

    decoder(coords_cyc_px: (..., 3) real) -> (...) complex

returns V̂ at volume-frame frequencies ``(kx, ky, kz)`` in cycles/px (docs/conventions.md §1: the centred
``fftfreq`` convention, Nyquist 0.5; a rotated slice reaches |k| ≈ 0.87 at the box corners, where
the value is finite but meaningless). Values are on the scale of the *unnormalized* FFT of the
real-space volume (``fft3_centered``), times the constant ``output_scale`` buffer.

**Hermitian symmetry by construction.** A real volume has ``V̂(−k) = conj V̂(k)``. Each decoder
evaluates its network only on the canonical half-space

    H = {kz > 0} ∪ {kz = 0, ky > 0} ∪ {kz = ky = 0, kx ≥ 0}

and returns ``conj f(−k)`` for every k outside H; at k = 0 the imaginary part is set to 0, so V̂(0)
is real. Negation is exact in floating point, so ``V̂(−k)`` and ``V̂(k)`` come from the *same* network
input and the symmetry holds to the last bit (for identically batched evaluations), on the kz = 0
plane included. The attribute ``hermitian = True`` tells callers they may evaluate only half of a
central slice and fill the rest by conjugation (``V̂(Rᵀ(−k)) = conj V̂(Rᵀk)``); the decoder itself
accepts any set of points. (The price of the half-space construction is that the function can jump
across the plane kz = 0 until training makes f(k) ≈ conj f(−k) there — as in cryoAI.)

**Parameter counts** at the defaults (``hidden=256``; ``count_parameters``):

=============  ==========================================================  ==========
name           network                                                     parameters
=============  ==========================================================  ==========
fouriernet     2 SIRENs, 3 hidden layers each (3→256, 3×256→256, 256→2)    397,828
siren          1 SIREN, 6 hidden layers (3→256, 6×256→256, 256→2)          396,290
relu-pe        PE (3 + 2·3·10 = 63) → 256, 6 × 256→256 ReLU, 256→2         411,650
=============  ==========================================================  ==========

so the three compare at equal width and equal parameter count (within 4%). The cryoAI paper used
about 300k parameters in each ablation network.

The base class and the half-space map live in :mod:`cryoace.models.hermitian`. The voxel-grid
decoders of :mod:`cryoace.models.voxel` (``"voxel-fourier"``, ``"voxel-real"``) are
HermitianDecoders too and share the registry :data:`DECODERS` / :func:`build_decoder`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..physics.fourier import freq_1d
from .hermitian import HermitianDecoder, hermitian_canonicalize
from .siren import Siren
from .voxel import VoxelFourierDecoder, VoxelRealDecoder

__all__ = [
    "HermitianDecoder",
    "FourierNet",
    "SirenDecoder",
    "ReluPEDecoder",
    "VoxelFourierDecoder",
    "VoxelRealDecoder",
    "DECODERS",
    "build_decoder",
    "count_parameters",
    "evaluate_grid",
    "hermitian_canonicalize",
]


class FourierNet(HermitianDecoder):
    """cryoAI's FourierNet: ``f(k) = exp(envelope(s·k)) ⊙ modulant(s·k)`` (⊙ element-wise on 2-vectors).

    ``envelope`` and ``modulant`` are SIRENs 3 → 2 (:class:`~cryoace.models.siren.Siren`); the
    exponentiated one spans many orders of magnitude (|V̂| decays like a power law with |k|), the
    other carries sign and phase. The product ``(Re, Im)`` is the complex value. ``coord_scale`` ``s``
    maps [-0.5, 0.5] cycles/px to [-1, 1] (the SIREN's input range) by default.

    ``hidden``/``layers``/``omega_0`` configure both SIRENs (``layers`` = hidden→hidden layers per
    SIREN); ``envelope_*`` override them for the envelope alone (the cryoAI reference used a
    3-layer ω0=40 modulant and a 2-layer ω0=30 envelope).
    """

    def __init__(self, hidden: int = 256, layers: int = 3, omega_0: float = 30.0,
                 envelope_hidden: int | None = None, envelope_layers: int | None = None,
                 envelope_omega_0: float | None = None, coord_scale: float = 2.0,
                 output_scale: float = 1.0, allow_autocast: bool = False):
        super().__init__(output_scale, allow_autocast)
        self.coord_scale = float(coord_scale)
        self.modulant = Siren(3, 2, hidden, layers, omega_0)
        self.envelope = Siren(3, 2,
                              hidden if envelope_hidden is None else envelope_hidden,
                              layers if envelope_layers is None else envelope_layers,
                              omega_0 if envelope_omega_0 is None else envelope_omega_0)

    def network(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        x = coords_cyc_px * self.coord_scale
        log_amplitude = self.envelope(x).float()  # exp in float32 even under autocast
        return torch.exp(log_amplitude) * self.modulant(x)


class SirenDecoder(HermitianDecoder):
    """One SIREN 3 → (Re, Im) (ablation). ``layers=6`` matches FourierNet's parameter count."""

    def __init__(self, hidden: int = 256, layers: int = 6, omega_0: float = 30.0,
                 coord_scale: float = 2.0, output_scale: float = 1.0, allow_autocast: bool = False):
        super().__init__(output_scale, allow_autocast)
        self.coord_scale = float(coord_scale)
        self.siren = Siren(3, 2, hidden, layers, omega_0)

    def network(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        return self.siren(coords_cyc_px * self.coord_scale)


class FourierFeatures(nn.Module):
    """Axis-aligned positional encoding of k (cycles/px): ``[2k, sin(2π r_j k), cos(2π r_j k)]``.

    The ``n_freqs`` radii ``r_j`` are geometric from ``min_radius_px`` to ``max_radius_px``: the
    feature ``sin(2π r k)`` is the transform of real-space structure at distance r px from the box
    centre, so ``max_radius_px ≈ L/2`` covers the box. Output width ``3·(include_input + 2·n_freqs)``.
    """

    def __init__(self, n_freqs: int = 10, max_radius_px: float = 32.0, min_radius_px: float = 1.0,
                 include_input: bool = True):
        super().__init__()
        if n_freqs < 1:
            raise ValueError(f"n_freqs must be >= 1, got {n_freqs}")
        if n_freqs == 1:
            radii = torch.tensor([float(max_radius_px)], dtype=torch.float64)
        else:
            radii = torch.logspace(math.log10(min_radius_px), math.log10(max_radius_px), n_freqs,
                                   dtype=torch.float64)
        self.register_buffer("angular", (2 * math.pi * radii).to(torch.get_default_dtype()))
        self.include_input = include_input
        self.out_features = 3 * (int(include_input) + 2 * n_freqs)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        phase = (k[..., :, None] * self.angular.to(k.dtype)).flatten(-2)  # (..., 3·n_freqs)
        parts = [2 * k] if self.include_input else []
        parts += [torch.sin(phase), torch.cos(phase)]
        return torch.cat(parts, dim=-1)


class ReluPEDecoder(HermitianDecoder):
    """Positional encoding + ReLU MLP → (Re, Im) (ablation; cryoDRGN-style field).

    ``layers`` counts hidden→hidden layers; ``layers=6`` matches FourierNet's parameter count.
    """

    def __init__(self, hidden: int = 256, layers: int = 6, n_freqs: int = 10,
                 max_radius_px: float = 32.0, min_radius_px: float = 1.0,
                 output_scale: float = 1.0, allow_autocast: bool = False):
        super().__init__(output_scale, allow_autocast)
        self.encoding = FourierFeatures(n_freqs, max_radius_px, min_radius_px)
        blocks: list[nn.Module] = [nn.Linear(self.encoding.out_features, hidden), nn.ReLU()]
        for _ in range(layers):
            blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
        blocks.append(nn.Linear(hidden, 2))
        self.mlp = nn.Sequential(*blocks)

    def network(self, coords_cyc_px: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.encoding(coords_cyc_px))


DECODERS: dict[str, type[HermitianDecoder]] = {
    "fouriernet": FourierNet,
    "siren": SirenDecoder,
    "relu-pe": ReluPEDecoder,
    "voxel-fourier": VoxelFourierDecoder,
    "voxel-real": VoxelRealDecoder,
}


def build_decoder(name: str, **cfg) -> HermitianDecoder:
    """Decoder by name with keyword configuration (each class's constructor, strictly).

    * ``"fouriernet"``: hidden, layers, omega_0, envelope_hidden/_layers/_omega_0, coord_scale;
    * ``"siren"``: hidden, layers, omega_0, coord_scale;
    * ``"relu-pe"``: hidden, layers, n_freqs, max_radius_px, min_radius_px;
    * ``"voxel-fourier"``: size (required), init_std;
    * ``"voxel-real"``: size (required), pad_factor, init_std;

    all of them also ``output_scale`` and ``allow_autocast``. Keywords whose value is ``None`` are
    dropped, so a caller can pass ``layers=None`` to get each class's default (3 per SIREN for
    FourierNet, 6 for the single-network decoders, which gives equal parameter counts at equal
    ``hidden``). Unknown keywords (e.g. ``hidden`` for a voxel grid) raise ``TypeError``.
    """
    key = name.lower().replace("_", "-")
    if key not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; choose from {sorted(DECODERS)}")
    return DECODERS[key](**{k: v for k, v in cfg.items() if v is not None})


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _device_dtype(decoder: Callable) -> tuple[torch.device, torch.dtype]:
    if isinstance(decoder, nn.Module):
        for t in list(decoder.parameters()) + list(decoder.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    volume_ft = getattr(decoder, "volume_ft", None)  # physics.forward.VoxelFourierVolume
    if isinstance(volume_ft, torch.Tensor):
        return volume_ft.device, volume_ft.real.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def evaluate_grid(decoder: Callable[[torch.Tensor], torch.Tensor], size: int, chunk: int = 2 ** 16,
                  device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The decoder on the full centred grid: complex (size, size, size), axes (z, y, x), DC at size//2.

    The coordinates are exactly ``physics.fourier.freq_grid_3d(size)`` (cycles/px), generated chunk
    by chunk (``chunk`` points per call) under ``torch.no_grad()`` so memory stays bounded for large
    boxes. ``device``/``dtype`` default to the decoder's parameters. Pass the result to
    ``physics.fourier.ifft3_centered`` for the real-space map.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dev, dt = _device_dtype(decoder)
    device = dev if device is None else torch.device(device)
    dtype = dt if dtype is None else dtype
    f = freq_1d(size, device=device, dtype=dtype)
    total = size ** 3
    pieces = []
    with torch.no_grad():
        for start in range(0, total, chunk):
            idx = torch.arange(start, min(start + chunk, total), device=device)
            iz, rem = idx // (size * size), idx % (size * size)
            iy, ix = rem // size, rem % size
            coords = torch.stack([f[ix], f[iy], f[iz]], dim=-1)
            pieces.append(decoder(coords))
    return torch.cat(pieces).reshape(size, size, size)
