"""The pose encoder of cryoAI: image → (rotation matrix, shift in Å).

Architecture (cryoAI §3.3; widths are configuration):

1. optional per-image standardisation (zero mean, unit variance over the box);
2. a *fixed* bank of ``n_filters`` Gaussian low-pass filters (``filter_size``² taps, σ log-spaced
   0.1 … 10 px by default; σ = 0.1 px is the identity to ~1e-22), applied as a same-padded
   convolution with zero padding: (B, L, L) → (B, n_filters, L, L). The kernels are a registered
   buffer, not parameters: they never receive gradients and are not in ``parameters()``;
3. the CNN trunk — here VGG16-like (:class:`PoseEncoder`; :class:`FilterBankPoseEncoder` holds
   everything but the trunk, so :class:`cryoace.models.resnet.ResNetPoseEncoder` swaps in a
   ResNet-18 with the same bank, heads and interface): for each block ``i``,
   ``convs_per_block[i]`` × (conv 3×3 → BatchNorm → ReLU) with ``channels[i]`` output channels,
   then a 2×2 max-pool while the feature map is at least 2 px wide (so any even L ≥ 32 works; the
   sizes are computed at construction); then adaptive average pooling to
   ``min(pooled_size, final size)``² and flattening to the latent vector;
4. two MLP heads on the latent (``head_layers`` hidden layers of ``mlp_hidden`` with ReLU):
   rotation → 6 numbers → :func:`cryoace.physics.rotations.rotmat_from_6d` → R (B, 3, 3), which maps
   volume to image coordinates (docs/conventions.md §1); translation → 2 numbers → ``max_shift_angst·tanh`` →
   shift (B, 2) in Å with RELION's ``rlnOriginX/YAngst`` meaning (the observed image is the centred
   projection translated by −shift). The translation head's last layer starts 100× smaller than
   PyTorch's default (bias 0), so initial shifts are ≈ 0 while every layer receives gradients.
   The rotation head has a BatchNorm1d after its first hidden layer (cryoAI's reference code) and one
   on its last hidden features, so that its initial predictions for different images spread over SO(3)
   instead of starting collapsed on one pose.
5. optionally several rotation *hypotheses* per image (``n_heads`` > 1, cryoSPIN's multi-head encoder):
   the rotation head's last layer gives 6·``n_heads`` numbers, one rotation per head, and the pose has
   ``rotmat`` (B, n_heads, 3, 3) (the shift is shared). The training loss renders every hypothesis and
   keeps the best-fitting one ("winner takes all", :func:`cryoace.train.losses.compute_loss`): an image
   whose pose posterior has several modes (a map that is not yet right, a near-symmetric particle) need
   not be pulled to the average of the modes, which is no mode at all.

Presets: the cryoAI widths are the defaults (channels 64/128/256/256/256, 2/2/3/3/3 convs,
MLP 256); a CPU-sized encoder is e.g. ``channels=(8, 16, 32), convs_per_block=(1, 1, 1),
mlp_hidden=64``. For ``torch.channels_last``, pass ``channels_last=True`` (the filtered stack is
converted before the CNN) and/or call ``encoder.to(memory_format=torch.channels_last)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..physics.rotations import rotmat_from_6d
from ..types import Pose

__all__ = ["gaussian_filter_bank", "FilterBankPoseEncoder", "PoseEncoder", "DEFAULT_SIGMAS_PX"]

DEFAULT_SIGMAS_PX = (0.1, 10.0)


def gaussian_filter_bank(sigmas_px: Sequence[float], size: int = 11,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised (sum 1) Gaussian kernels (n, 1, size, size) centred on tap ``size//2`` (odd ``size``)."""
    if size % 2 != 1:
        raise ValueError(f"filter size must be odd, got {size}")
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    sig = torch.as_tensor(list(sigmas_px), dtype=torch.float64)
    if (sig <= 0).any():
        raise ValueError(f"sigmas must be positive, got {list(sigmas_px)}")
    g1 = torch.exp(-0.5 * (offsets[None, :] / sig[:, None]) ** 2)  # (n, size)
    g1 = g1 / g1.sum(-1, keepdim=True)
    kernels = g1[:, :, None] * g1[:, None, :]  # separable Gaussian, sums to 1
    return kernels[:, None].to(dtype)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision (autocast) outputs → float32 for Gram–Schmidt and tanh; others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mlp(in_features: int, hidden: int, out_features: int, layers: int, batchnorm: bool = False) -> nn.Sequential:
    """``layers`` × (Linear → ReLU) → Linear. With ``batchnorm`` the first hidden layer's ReLU is preceded
    and the last one's followed by a BatchNorm1d (activation modules ``Sequential(BN, ReLU)``,
    ``Sequential(ReLU, BN)`` or, for one layer, ``Sequential(BN, ReLU, BN)``), so the Linear layers keep
    the indices 0, 2, 4 ... they have without it."""
    blocks: list[nn.Module] = []
    width = in_features
    for i in range(layers):
        act: nn.Module = nn.ReLU(inplace=True)
        if batchnorm:
            parts = [nn.BatchNorm1d(hidden)] if i == 0 else []
            parts.append(nn.ReLU(inplace=True))
            parts += [nn.BatchNorm1d(hidden)] if i == layers - 1 else []
            act = nn.Sequential(*parts)
        # a bias before BatchNorm has no effect and a zero gradient up to rounding, which Adam would
        # blow up into full-size random steps: the first layer has none when a BatchNorm follows
        blocks += [nn.Linear(width, hidden, bias=not (batchnorm and i == 0)), act]
        width = hidden
    blocks.append(nn.Linear(width, out_features))
    return nn.Sequential(*blocks)


def _identity_head_norms(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook: a checkpoint written before the rotation head had its BatchNorm1d
    layers gets identity ones (weight 1, bias 0, running mean 0, variance 1), and the first layer's
    bias moves into the first norm's bias, so older runs still load and predict as before."""
    head = getattr(module, "rotation_head", None)
    if head is None or not any(k.startswith(prefix + "rotation_head.") for k in state_dict):
        return  # not an encoder state dict: load_state_dict reports it
    first_bias = state_dict.get(prefix + "rotation_head.0.bias")
    filled = []
    for name, norm in head.named_modules(prefix=prefix + "rotation_head"):
        if isinstance(norm, nn.BatchNorm1d) and name + ".weight" not in state_dict:
            for key, tensor in norm.state_dict().items():
                fill = torch.ones_like(tensor) if key in ("weight", "running_var") else torch.zeros_like(tensor)
                state_dict[f"{name}.{key}"] = fill
            filled.append(name)
    if filled and first_bias is not None and head[0].bias is None:
        state_dict[filled[0] + ".bias"] = state_dict.pop(prefix + "rotation_head.0.bias")


class FilterBankPoseEncoder(nn.Module):
    """Shared part of the pose encoders: input standardisation, the fixed Gaussian bank, a CNN trunk
    (``self.cnn``, built by the subclass) and the two heads; ``forward(images) → Pose``.

    A subclass calls ``super().__init__(...)`` (sets the filter bank, so ``self.n_filters`` input
    channels are known), builds its trunk — any module (B, n_filters, L, L) → (B, C, h, w) — and
    calls :meth:`_attach_trunk`, which flattens the trunk's output into the latent and adds the heads.
    Constructor arguments as in :class:`PoseEncoder`.
    """

    def __init__(self, image_size: int, pixel_size: float, max_shift_angst: float | None = None,
                 n_filters: int = 5, filter_size: int = 11, sigmas: Sequence[float] | None = None,
                 normalize_input: bool = True, channels_last: bool = False):
        super().__init__()
        if image_size < 2:
            raise ValueError(f"image_size must be >= 2, got {image_size}")
        self.image_size = int(image_size)
        self.pixel_size = float(pixel_size)
        self.normalize_input = normalize_input
        self.channels_last = channels_last
        if max_shift_angst is None:
            max_shift_angst = 0.15 * self.image_size * self.pixel_size
        if max_shift_angst < 0:
            raise ValueError(f"max_shift_angst must be >= 0, got {max_shift_angst}")
        self.max_shift_angst = float(max_shift_angst)

        if sigmas is None:
            lo, hi = DEFAULT_SIGMAS_PX
            sigmas = [lo] if n_filters == 1 else [
                math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (n_filters - 1))
                for i in range(n_filters)]
        self.sigmas_px = tuple(float(s) for s in sigmas)
        self.register_buffer("filters", gaussian_filter_bank(self.sigmas_px, filter_size))

    @property
    def n_filters(self) -> int:
        """Channels of the filtered stack = input channels of the trunk."""
        return len(self.sigmas_px)

    def _attach_trunk(self, cnn: nn.Module, feature_size: int, latent_dim: int, mlp_hidden: int,
                      head_layers: int, head_batchnorm: bool = True, n_heads: int = 1) -> None:
        """Install the trunk (its flattened output has ``latent_dim`` features; ``feature_size`` is the
        side of its last map before any final pooling, for information) and build both heads
        (``head_batchnorm=False``: the rotation head without its BatchNorm layers, for ablations;
        ``n_heads``: rotation hypotheses per image)."""
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        self.n_heads = int(n_heads)
        self.cnn = cnn
        self.feature_size = feature_size
        self.latent_dim = latent_dim
        # BatchNorm after the rotation head's first hidden layer (cryoAI's reference code) and on its
        # last hidden features: without them the features of different images share a large common
        # part and every image starts at nearly the same pose (mean viewing direction ≈ 0.95 long, a
        # collapse the image loss keeps); centred last features leave the 6D output's mean at the bias
        self.rotation_head = _mlp(self.latent_dim, mlp_hidden, 6 * self.n_heads, head_layers, batchnorm=head_batchnorm)
        if head_batchnorm:
            with torch.no_grad():  # ... so a zero bias centres the 6D outputs of a batch on 0
                self.rotation_head[-1].bias.zero_()
        self._register_load_state_dict_pre_hook(_identity_head_norms, with_module=True)
        self.shift_head = _mlp(self.latent_dim, mlp_hidden, 2, head_layers)
        with torch.no_grad():  # start near shift 0 (but not exactly: every layer gets gradients)
            self.shift_head[-1].weight.mul_(1e-2)
            self.shift_head[-1].bias.zero_()

    def filter_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, L, L) or (B, 1, L, L) → standardised (if enabled) and filtered stack (B, n_filters, L, L)."""
        x = images if images.ndim == 4 else images[:, None]
        x = x.to(self.filters.dtype)
        if self.normalize_input:
            mean = x.mean(dim=(-2, -1), keepdim=True)
            std = x.std(dim=(-2, -1), keepdim=True)
            x = (x - mean) / (std + 1e-6)
        pad = self.filters.shape[-1] // 2
        return nn.functional.conv2d(x, self.filters, padding=pad)

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """The flattened CNN features (B, latent_dim)."""
        x = self.filter_images(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.flatten(self.cnn(x), 1)

    def forward(self, images: torch.Tensor) -> Pose:
        """The pose of each image: rotmat (B, 3, 3), or (B, n_heads, 3, 3) with several heads; shift (B, 2) Å."""
        z = self.latent(images)
        six_d = _at_least_float32(self.rotation_head(z))
        if self.n_heads > 1:
            six_d = six_d.reshape(-1, self.n_heads, 6)
        rotmat = rotmat_from_6d(six_d)
        shift_angst = self.max_shift_angst * torch.tanh(_at_least_float32(self.shift_head(z)))
        return Pose(rotmat=rotmat, shift_angst=shift_angst)


class PoseEncoder(FilterBankPoseEncoder):
    """Image (B, L, L) → :class:`~cryoace.types.Pose` (rotmat (B, 3, 3), shift_angst (B, 2)) with the
    VGG16-like trunk (module docstring; :class:`cryoace.models.resnet.ResNetPoseEncoder` is the
    ResNet-18 variant).

    image_size      : L (even, ≥ 32 recommended; anything ≥ 2 runs).
    pixel_size      : Å/px of the images the encoder sees (only sets the default shift bound).
    channels, convs_per_block : CNN widths and depth per block (same length).
    mlp_hidden, head_layers   : width and number of hidden layers of each head.
    max_shift_angst : bound of |shift| per axis in Å; default ``0.15 · L · pixel_size``; 0 disables
                      shifts (always 0).
    n_filters, filter_size, sigmas : the Gaussian bank; ``sigmas`` (px) defaults to ``n_filters``
                      values log-spaced over 0.1 … 10 px.
    pooled_size     : spatial side of the adaptive average pooling before flattening.
    normalize_input : standardise each image before filtering (robust to the data's scale).
    head_batchnorm  : the rotation head's BatchNorm layers (module docstring); False only for ablations.
    n_heads         : rotation hypotheses per image (1: one pose; > 1: cryoSPIN's multi-head encoder).
    """

    def __init__(self, image_size: int, pixel_size: float,
                 channels: Sequence[int] = (64, 128, 256, 256, 256),
                 convs_per_block: Sequence[int] = (2, 2, 3, 3, 3),
                 mlp_hidden: int = 256, max_shift_angst: float | None = None,
                 n_filters: int = 5, filter_size: int = 11, sigmas: Sequence[float] | None = None,
                 head_layers: int = 2, pooled_size: int = 2, normalize_input: bool = True,
                 channels_last: bool = False, head_batchnorm: bool = True, n_heads: int = 1):
        if len(channels) != len(convs_per_block):
            raise ValueError("channels and convs_per_block must have the same length")
        super().__init__(image_size, pixel_size, max_shift_angst, n_filters, filter_size, sigmas,
                         normalize_input, channels_last)
        blocks: list[nn.Module] = []
        in_ch, spatial = self.n_filters, self.image_size
        for out_ch, n_conv in zip(channels, convs_per_block, strict=True):
            for _ in range(n_conv):
                blocks += [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                           nn.ReLU(inplace=True)]
                in_ch = out_ch
            if spatial >= 2:
                blocks.append(nn.MaxPool2d(2))
                spatial //= 2
        pooled = max(1, min(pooled_size, spatial))
        blocks.append(nn.AdaptiveAvgPool2d(pooled))
        self._attach_trunk(nn.Sequential(*blocks), spatial, in_ch * pooled * pooled, mlp_hidden, head_layers,
                           head_batchnorm, n_heads)
