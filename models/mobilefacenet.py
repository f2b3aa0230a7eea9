"""MobileFaceNet backbones (``mbf``, ``mbf_large``), state-dict compatible with insightface ``arcface_torch``.

Parameter and buffer names, shapes and the forward computation match insightface's ``backbones/mobilefacenet.py``
(itself adapted from cavaface), so its released ``mbf`` weights load with ``load_state_dict(strict=True)``; the
manifests in ``models/manifests/mbf*.json`` were written by insightface's own code.

Layout (``s`` = ``scale``: 2 for ``mbf``, 4 for ``mbf_large``), every unit being conv -> BatchNorm (-> PReLU)::

    layers.0  3x3 stride-2 conv, 3 -> 64s                                   56x56
    layers.1  3x3 grouped conv (64 groups), or blocks[0] residual bottlenecks (hidden 128)
    layers.2  bottleneck, stride 2, 64s -> 64s (hidden 128)                 28x28
    layers.3  blocks[1] residual bottlenecks (hidden 128)
    layers.4  bottleneck, stride 2, 64s -> 128s (hidden 256)                14x14
    layers.5  blocks[2] residual bottlenecks (hidden 256)
    layers.6  bottleneck, stride 2, 128s -> 128s (hidden 512)               7x7
    layers.7  blocks[3] residual bottlenecks (hidden 256)
    conv_sep  1x1 conv 128s -> 512
    features  GDC: 7x7 depthwise conv (no activation), flatten, Linear(512, num_features, bias=False), BatchNorm1d

A bottleneck is a 1x1 expansion to the hidden width, a 3x3 depthwise conv (the stride) and a linear 1x1
projection (BatchNorm, no PReLU); it adds its input back only inside the residual stages. The hidden widths do not
grow with ``scale``, as in insightface.

Input: ``(N, 3, 112, 112)`` RGB in [-1, 1]; output ``(N, num_features)``. There is no dropout in the architecture.
insightface's ``fp16`` flag (autocast inside ``forward``) is not reproduced: precision belongs to the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.registry import BackboneOptionError, register_backbone

__all__ = ["Bottleneck", "ConvUnit", "MobileFaceNet", "ResidualStage"]

# The width of conv_sep's output and of the GDC embedding head (fixed in insightface, whatever the scale).
HEAD_WIDTH = 512
# 112 / 2**4: the spatial size left after the four stride-2 convolutions, the GDC kernel.
FINAL_SPATIAL = 7


class ConvUnit(nn.Module):
    """Conv (no bias) -> BatchNorm2d -> PReLU, or without the PReLU when ``activation`` is False (a linear unit).

    The three layers sit in ``self.layers`` (keys ``layers.0.weight``, ``layers.1.*``, ``layers.2.weight``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        units: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            units.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Bottleneck(nn.Module):
    """1x1 expansion to ``hidden``, 3x3 depthwise (stride ``stride``), linear 1x1 projection; ``+ x`` if residual."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        if residual and (in_channels != out_channels or stride != 1):
            raise ValueError(
                f"a residual bottleneck keeps its shape: got {in_channels}->{out_channels}, stride {stride}"
            )
        self.residual = residual
        self.layers = nn.Sequential(
            ConvUnit(in_channels, hidden),
            ConvUnit(hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden),
            ConvUnit(hidden, out_channels, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class ResidualStage(nn.Module):
    """``num_blocks`` residual bottlenecks at constant width ``channels`` (keys ``layers.<i>.layers.*``)."""

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(Bottleneck(channels, channels, hidden, stride=1, residual=True) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDCHead(nn.Module):
    """Global depthwise conv over the 7x7 map, then a bias-free Linear to the embedding and its BatchNorm1d."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvUnit(HEAD_WIDTH, HEAD_WIDTH, kernel_size=FINAL_SPATIAL, groups=HEAD_WIDTH, activation=False),
            nn.Flatten(),
            nn.Linear(HEAD_WIDTH, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet for 112x112 faces: ``blocks`` residual bottlenecks per stage, channels ``64 * scale`` and
    ``128 * scale``.

    ``gradient_checkpointing`` recomputes each entry of ``layers`` (stem, stages, downsampling bottlenecks) in
    backward, in training mode only. As with any checkpointed BatchNorm in train mode, the recompute updates the
    running statistics a second time.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        num_features: int = 512,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dropout != 0.0:
            raise BackboneOptionError(
                f"MobileFaceNet has no embedding dropout: network.dropout must be 0, got {dropout}"
            )
        if len(blocks) != 4 or min(blocks) < 1 or scale < 1:
            raise ValueError(f"MobileFaceNet needs 4 positive stage depths and scale >= 1: {list(blocks)}, {scale}")
        self.blocks = tuple(blocks)
        self.scale = scale
        self.num_features = num_features
        self.gradient_checkpointing = gradient_checkpointing
        narrow, wide = 64 * scale, 128 * scale

        # A single first-stage block is a plain grouped conv (64 groups whatever the width), not a bottleneck.
        if blocks[0] == 1:
            first_stage: nn.Module = ConvUnit(narrow, narrow, kernel_size=3, padding=1, groups=64)
        else:
            first_stage = ResidualStage(narrow, blocks[0], hidden=128)
        self.layers = nn.ModuleList(
            [
                ConvUnit(3, narrow, kernel_size=3, stride=2, padding=1),
                first_stage,
                Bottleneck(narrow, narrow, hidden=128, stride=2, residual=False),
                ResidualStage(narrow, blocks[1], hidden=128),
                Bottleneck(narrow, wide, hidden=256, stride=2, residual=False),
                ResidualStage(wide, blocks[2], hidden=256),
                Bottleneck(wide, wide, hidden=512, stride=2, residual=False),
                ResidualStage(wide, blocks[3], hidden=256),
            ]
        )
        self.conv_sep = ConvUnit(wide, HEAD_WIDTH)
        self.features = GDCHead(num_features)

        # insightface's init: He-normal (fan_out) for conv and linear weights, BatchNorm2d at (1, 0).
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, 112, 112)`` normalised RGB images to ``(N, num_features)`` embeddings."""
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return self.features(self.conv_sep(x))


@register_backbone("mbf")
def mobilefacenet(**kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet (insightface ``mbf``): stages 1-4-6-2, scale 2, about 0.45 GMACs."""
    kwargs.setdefault("blocks", (1, 4, 6, 2))
    kwargs.setdefault("scale", 2)
    return MobileFaceNet(**kwargs)


@register_backbone("mbf_large")
def mobilefacenet_large(**kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet-large (insightface ``mbf_large``): stages 2-8-12-4, scale 4."""
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    kwargs.setdefault("scale", 4)
    return MobileFaceNet(**kwargs)
