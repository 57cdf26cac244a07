"""Neural networks: the pose encoder and the neural Fourier volumes (decoders).

* :class:`PoseEncoder` — image (B, L, L) → :class:`cryoace.types.Pose` (R, shift in Å).
* Decoders — ``decoder(coords_cyc_px (..., 3)) → complex (...)``, Hermitian by construction
  (``hermitian = True``): :class:`FourierNet`, :class:`SirenDecoder`, :class:`ReluPEDecoder`, built by
  name with :func:`build_decoder` (``"fouriernet" | "siren" | "relu-pe"``).
* :func:`evaluate_grid` — a decoder on the full centred 3D frequency grid, in chunks, for export.
"""

from .decoders import (DECODERS, FourierNet, HermitianDecoder, ReluPEDecoder, SirenDecoder,
                       build_decoder, count_parameters, evaluate_grid, hermitian_canonicalize)
from .encoder import PoseEncoder, gaussian_filter_bank
from .siren import SineLayer, Siren, siren_init_

__all__ = [
    "PoseEncoder",
    "gaussian_filter_bank",
    "HermitianDecoder",
    "FourierNet",
    "SirenDecoder",
    "ReluPEDecoder",
    "DECODERS",
    "build_decoder",
    "count_parameters",
    "evaluate_grid",
    "hermitian_canonicalize",
    "Siren",
    "SineLayer",
    "siren_init_",
]
