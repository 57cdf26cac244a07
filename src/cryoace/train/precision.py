"""Fast paths of a training step: bf16 autocast for the encoder only, ``channels_last`` convolutions.

Only the pose encoder (a CNN, tolerant of bf16 rounding: its outputs are cast back to float32
before Gram–Schmidt and tanh) runs under ``torch.autocast``. The Fourier transforms, CTF, phase
ramps, slicing and the decoder stay float32: a SIREN's ``sin(30·(Wx+b))`` in bf16 is off by
several per cent, and :class:`~cryoace.models.decoders.HermitianDecoder` disables autocast for its
network anyway. Defaults (``precision="auto"``, ``channels_last=None``): bf16 and channels_last on
CUDA, float32 and the default layout on the CPU (where bf16 convolutions are rarely faster).
"""

from __future__ import annotations

import torch
from torch import nn

from ..defaults import PRECISIONS
from ..errors import CryoaceInputError

__all__ = ["PRECISIONS", "resolve_precision", "resolve_channels_last", "use_channels_last", "Autocast"]



def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The encoder's autocast dtype for ``--precision`` on ``device`` (None = plain float32)."""
    if name not in PRECISIONS:
        raise CryoaceInputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if name == "bf16" else None


def resolve_channels_last(flag: bool | None, device: torch.device) -> bool:
    """``--channels-last`` on ``device``; None = on for CUDA (tensor cores want NHWC), off on the CPU."""
    return device.type == "cuda" if flag is None else bool(flag)


def use_channels_last(encoder: nn.Module) -> None:
    """Put the encoder's conv weights and (through its ``channels_last`` switch, which converts the
    filtered image stack before the CNN) its activations in NHWC layout. Parameter objects are kept
    (``Module.to`` swaps their data), so an optimizer built before still owns them."""
    encoder.to(memory_format=torch.channels_last)
    if hasattr(encoder, "channels_last"):
        encoder.channels_last = True


class Autocast:
    """Calls ``module`` under ``torch.autocast(device_type, dtype)``; other attributes pass through.

    Used for the encoder of a training step only (exported and predicting modules stay float32).
    """

    def __init__(self, module, device_type: str, dtype: torch.dtype):
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, *args, **kwargs):
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        if name == "module":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)
