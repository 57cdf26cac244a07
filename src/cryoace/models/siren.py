"""SIREN layers (Sitzmann et al. 2020, "Implicit neural representations with periodic activation
functions"), written here from the paper's description.

A SIREN layer computes ``sin(ω0 · (W x + b))``. Initialisation (paper §3.2 and supplement §1.5):

* first layer: ``W ~ U(-1/n, 1/n)`` (n = fan-in), so ``ω0 · W x`` spans several periods over the
  input range [-1, 1];
* every later layer (hidden and the final linear one): ``W ~ U(-√(6/n)/ω0, √(6/n)/ω0)``, which keeps
  the pre-activations of ``sin(ω0 ·)`` distributed as arcsine → normal → arcsine through depth.

Biases keep PyTorch's default ``U(-1/√n, 1/√n)`` (as in the paper's code).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def siren_init_(linear: nn.Linear, omega_0: float, first: bool) -> nn.Linear:
    """Re-initialise ``linear.weight`` in place per Sitzmann et al.; returns the layer."""
    fan_in = linear.weight.shape[1]
    bound = 1.0 / fan_in if first else math.sqrt(6.0 / fan_in) / omega_0
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound)
    return linear


class SineLayer(nn.Module):
    """``sin(ω0 · (W x + b))`` with the SIREN initialisation (``first`` selects the first-layer rule)."""

    def __init__(self, in_features: int, out_features: int, omega_0: float = 30.0, first: bool = False):
        super().__init__()
        self.omega_0 = float(omega_0)
        self.first = first
        self.linear = siren_init_(nn.Linear(in_features, out_features), self.omega_0, first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega_0 * self.linear(x))

    def extra_repr(self) -> str:
        return f"omega_0={self.omega_0}, first={self.first}"


class Siren(nn.Module):
    """A SIREN MLP: ``in → hidden`` (first sine layer), ``layers`` × ``hidden → hidden`` sine layers,
    then a linear ``hidden → out`` layer (SIREN-initialised, no activation).

    Parameters: ``(in+1)·hidden + layers·(hidden+1)·hidden + (hidden+1)·out``.
    """

    def __init__(self, in_features: int = 3, out_features: int = 2, hidden: int = 256, layers: int = 3,
                 omega_0: float = 30.0, first_omega_0: float | None = None):
        super().__init__()
        if layers < 0:
            raise ValueError(f"layers must be >= 0, got {layers}")
        first_omega_0 = omega_0 if first_omega_0 is None else first_omega_0
        blocks: list[nn.Module] = [SineLayer(in_features, hidden, first_omega_0, first=True)]
        blocks += [SineLayer(hidden, hidden, omega_0) for _ in range(layers)]
        self.body = nn.Sequential(*blocks)
        self.head = siren_init_(nn.Linear(hidden, out_features), omega_0, first=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
