"""Neural networks: the pose encoders and the Fourier volumes (decoders).

* :class:`PoseEncoder` (VGG16-like trunk) and :class:`ResNetPoseEncoder` (ResNet-18 trunk) — image
  (B, L, L) → :class:`cryoace.types.Pose` (R, shift in Å); both are :class:`FilterBankPoseEncoder` s
  (same Gaussian bank, heads and interface).
* Decoders — ``decoder(coords_cyc_px (..., 3)) → complex (...)``, Hermitian by construction
  (``hermitian = True``): neural fields :class:`FourierNet`, :class:`SirenDecoder`,
  :class:`ReluPEDecoder` and voxel grids :class:`VoxelFourierDecoder`, :class:`VoxelRealDecoder`,
  built by name with :func:`build_decoder` (``"fouriernet" | "siren" | "relu-pe" | "voxel-fourier" |
  "voxel-real"``). ``decoder.default_lr`` suggests a learning rate for its own parameter group
  (None for the neural fields, 1.0 for the grids).
* :func:`evaluate_grid` — a decoder on the full centred 3D frequency grid, in chunks, for export.
"""

from .decoders import (
                       DECODERS,
                       FourierNet,
                       HermitianDecoder,
                       ReluPEDecoder,
                       SirenDecoder,
                       build_decoder,
                       count_parameters,
                       evaluate_grid,
                       hermitian_canonicalize,
)
from .encoder import FilterBankPoseEncoder, PoseEncoder, gaussian_filter_bank
from .resnet import ResNetPoseEncoder
from .siren import SineLayer, Siren, siren_init_
from .voxel import VoxelFourierDecoder, VoxelRealDecoder

__all__ = [
    "FilterBankPoseEncoder",
    "PoseEncoder",
    "ResNetPoseEncoder",
    "gaussian_filter_bank",
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
    "Siren",
    "SineLayer",
    "siren_init_",
]
