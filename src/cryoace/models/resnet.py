"""ResNet-18 pose encoder (ACE-EM's feature extractor), written in plain torch.

:class:`ResNetPoseEncoder` is :class:`~cryoace.models.encoder.PoseEncoder` with the VGG trunk
replaced by a ResNet-18 (He et al. 2016): the same per-image standardisation, fixed Gaussian filter
bank (its ``n_filters`` channels are the ResNet's input), rotation head (6D → ``rotmat_from_6d``) and
tanh-bounded shift head in Å; ``forward(images (B, L, L)) → Pose``.

Trunk (:class:`ResNetTrunk`): stem conv ``stem_kernel``² stride 2 → BatchNorm → ReLU → 3×3 max-pool
stride 2 (ImageNet's, /4), then 4 stages of ``blocks`` :class:`BasicBlock` s with ``widths``
channels (stride 1 for the first stage, 2 for the others; /32 overall: 128 px → 4², 32 px → 1²),
then global average pooling → latent of ``widths[-1]`` features. At the full widths
(64, 128, 256, 512) with 5 input channels the trunk has 11,182,784 parameters (torchvision's
ResNet-18 without ``fc``: 11,176,512 with 3 input channels). A CPU-sized variant is e.g.
``widths=(8, 16, 32, 64), mlp_hidden=64``. Spatial sizes below 1 px cannot occur: a stride-2 3×3
convolution with padding 1 maps 1 px to 1 px, so any L ≥ 2 runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .encoder import FilterBankPoseEncoder

__all__ = ["BasicBlock", "ResNetTrunk", "ResNetPoseEncoder", "RESNET18_WIDTHS"]

RESNET18_WIDTHS = (64, 128, 256, 512)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> list[nn.Module]:
    # bias-free: the BatchNorm that follows has its own shift
    return [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch)]


class BasicBlock(nn.Module):
    """ResNet basic block: (conv 3×3 stride s → BN → ReLU → conv 3×3 → BN) + shortcut → ReLU.

    The shortcut is the identity, or conv 1×1 stride s → BN when the stride or width changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_ch, out_ch, 3, stride)
        self.conv2, self.bn2 = _conv_bn(out_ch, out_ch, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))
                         if stride != 1 or in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetTrunk(nn.Module):
    """(B, in_channels, L, L) → (B, widths[-1], 1, 1): stem, 4 (or len(widths)) stages, global pooling."""

    def __init__(self, in_channels: int, widths: Sequence[int] = RESNET18_WIDTHS,
                 blocks: Sequence[int] = (2, 2, 2, 2), stem_kernel: int = 7, stem_pool: bool = True):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError("widths and blocks must be non-empty and of the same length")
        self.stem = nn.Sequential(*_conv_bn(in_channels, widths[0], stem_kernel, 2), nn.ReLU(inplace=True),
                                  *([nn.MaxPool2d(3, stride=2, padding=1)] if stem_pool else []))
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_ch if j == 0 else width, width, stride if j == 0 else 1)
                     for j in range(n_blocks)]
            stages.append(nn.Sequential(*stage))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_channels = in_ch
        # He initialisation for ReLU networks, BN at (1, 0) — the usual ResNet initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def output_size(self, image_size: int) -> int:
        """Side of the last stage's map for an ``image_size`` input (before the global pooling)."""
        def strided(size: int, kernel: int) -> int:  # stride 2, padding kernel//2
            return (size + 2 * (kernel // 2) - kernel) // 2 + 1

        size = strided(image_size, self.stem[0].kernel_size[0])
        if isinstance(self.stem[-1], nn.MaxPool2d):
            size = strided(size, 3)
        for _ in range(len(self.stages) - 1):
            size = strided(size, 3)
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


class ResNetPoseEncoder(FilterBankPoseEncoder):
    """Image (B, L, L) → :class:`~cryoace.types.Pose` with a ResNet-18 trunk (module docstring).

    image_size, pixel_size, mlp_hidden, head_layers, max_shift_angst, n_filters, filter_size,
    sigmas, normalize_input, channels_last : exactly as :class:`~cryoace.models.encoder.PoseEncoder`.
    widths      : channels of the 4 stages (ResNet-18: 64, 128, 256, 512; the stem has widths[0]).
    blocks      : BasicBlocks per stage (ResNet-18: 2, 2, 2, 2; ResNet-34: 3, 4, 6, 3).
    stem_kernel : side of the stride-2 stem convolution (7 as ImageNet's).
    stem_pool   : the stem's 3×3 stride-2 max-pool (False keeps twice the resolution, for small L).
    n_heads     : rotation hypotheses per image (:class:`cryoace.models.encoder.PoseEncoder`).
    """

    def __init__(self, image_size: int, pixel_size: float,
                 widths: Sequence[int] = RESNET18_WIDTHS, blocks: Sequence[int] = (2, 2, 2, 2),
                 mlp_hidden: int = 256, max_shift_angst: float | None = None,
                 n_filters: int = 5, filter_size: int = 11, sigmas: Sequence[float] | None = None,
                 head_layers: int = 2, normalize_input: bool = True, channels_last: bool = False,
                 stem_kernel: int = 7, stem_pool: bool = True, head_batchnorm: bool = True, n_heads: int = 1):
        super().__init__(image_size, pixel_size, max_shift_angst, n_filters, filter_size, sigmas,
                         normalize_input, channels_last)
        trunk = ResNetTrunk(self.n_filters, widths, blocks, stem_kernel, stem_pool)
        self._attach_trunk(trunk, trunk.output_size(self.image_size), trunk.out_channels, mlp_hidden,
                           head_layers, head_batchnorm, n_heads)
