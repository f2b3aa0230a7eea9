"""IResNet backbones, state-dict compatible with insightface ``arcface_torch``.

Parameter and buffer names, shapes and the forward computation match insightface's ``backbones/iresnet.py``, so a
released insightface backbone loads with ``load_state_dict(strict=True)`` and gives the same embedding.

Input contract: RGB images, 112x112, scaled as ``(x / 255 - 0.5) / 0.5`` (so in [-1, 1]), shape ``(N, 3, 112, 112)``.
The network downsamples by 16 (four stride-2 stages), so the last feature map is ``widths[-1] x 7 x 7``; any other
input size breaks the ``fc`` layer.

Output: ``(N, num_features)`` embeddings (``num_features`` defaults to 512). The head is
``bn2 -> flatten -> dropout -> fc -> features`` where ``fc`` is ``Linear(widths[-1] * 7 * 7, num_features)``,
``dropout`` (default 0.0) acts on the flattened feature map, and ``features`` is a ``BatchNorm1d`` whose weight is
fixed at 1 (``requires_grad=False``), as in insightface: only its bias and running statistics change.

Init follows insightface: conv weights ~ N(0, 0.1), BatchNorm2d weight 1 and bias 0, PReLU 0.25, ``fc`` PyTorch's
default. Precision (autocast) is the trainer's business, not the model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.registry import register_backbone

__all__ = ["IBasicBlock", "IResNet"]

# BatchNorm eps used everywhere in insightface's iresnet (also PyTorch's default; spelled out because it matters).
BN_EPS = 1e-5
# 112 / 2**4: the spatial size left after the four stride-2 stages.
FINAL_SPATIAL = 7


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN, conv3x3, BN, PReLU, conv3x3(stride), BN, plus shortcut.

    ``downsample`` (1x1 conv with stride + BN) replaces the identity when the shape changes; it is ``None`` otherwise,
    which keeps it out of the state dict exactly as insightface does.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        # Attribute creation order fixes state-dict key order; it must match insightface's.
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet for 112x112 face crops; ``layers`` blocks per stage, ``widths`` channels per stage.

    ``gradient_checkpointing`` recomputes each block's activations in backward (training mode only), trading about
    one extra forward for activation memory.
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_features: int = 512,
        dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet needs 4 stages: got layers={list(layers)}, widths={list(widths)}")
        if min(layers) < 1 or min(widths) < 1:
            raise ValueError(f"layers and widths must be positive: got layers={list(layers)}, widths={list(widths)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1): got {dropout}")
        self.layers = tuple(layers)
        self.widths = tuple(widths)
        self.num_features = num_features
        self.gradient_checkpointing = gradient_checkpointing

        # The stem keeps the resolution and has as many channels as the first stage (64 in insightface).
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        stages = []
        for num_blocks, channels in zip(layers, widths, strict=True):
            stages.append(self._make_stage(in_channels, channels, num_blocks))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * FINAL_SPATIAL * FINAL_SPATIAL, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        # insightface freezes the embedding BN's scale at 1: the margin head normalises embeddings anyway, and a
        # learnable scale would only drift. The optimizer must skip parameters without grad.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    @staticmethod
    def _make_stage(in_channels: int, channels: int, num_blocks: int) -> nn.Sequential:
        # Every stage starts with stride 2, so the first block always needs a projection shortcut.
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS),
        )
        blocks = [IBasicBlock(in_channels, channels, stride=2, downsample=downsample)]
        blocks += [IBasicBlock(channels, channels) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            # BatchNorm in train mode updates running stats in forward, and the recompute in backward updates them a
            # second time (momentum applied twice); insightface's checkpointing has the same effect.
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, 112, 112)`` normalised RGB images to ``(N, num_features)`` embeddings."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        x = torch.flatten(self.bn2(x), 1)
        x = self.dropout(x)
        return self.features(self.fc(x))


def _build(layers: Sequence[int], default_widths: Sequence[int], kwargs: dict[str, Any]) -> IResNet:
    kwargs.setdefault("widths", default_widths)
    return IResNet(layers=layers, **kwargs)


INSIGHTFACE_WIDTHS = (64, 128, 256, 512)


@register_backbone("r18")
def iresnet18(**kwargs: Any) -> IResNet:
    """IResNet-18 (stages 2-2-2-2)."""
    return _build((2, 2, 2, 2), INSIGHTFACE_WIDTHS, kwargs)


@register_backbone("r34")
def iresnet34(**kwargs: Any) -> IResNet:
    """IResNet-34 (stages 3-4-6-3)."""
    return _build((3, 4, 6, 3), INSIGHTFACE_WIDTHS, kwargs)


@register_backbone("r50")
def iresnet50(**kwargs: Any) -> IResNet:
    """IResNet-50 (stages 3-4-14-3)."""
    return _build((3, 4, 14, 3), INSIGHTFACE_WIDTHS, kwargs)


@register_backbone("r100")
def iresnet100(**kwargs: Any) -> IResNet:
    """IResNet-100 (stages 3-13-30-3)."""
    return _build((3, 13, 30, 3), INSIGHTFACE_WIDTHS, kwargs)


@register_backbone("r200")
def iresnet200(**kwargs: Any) -> IResNet:
    """IResNet-200 (stages 6-26-60-6)."""
    return _build((6, 26, 60, 6), INSIGHTFACE_WIDTHS, kwargs)


@register_backbone("r2060")
def iresnet2060(**kwargs: Any) -> IResNet:
    """IResNet-2060 (stages 3-128-896-3, insightface's ``r2060``). insightface always recomputes its stages 2 and 3
    in backward when training; here that is ``gradient_checkpointing=True`` (every stage, block by block)."""
    return _build((3, 128, 896, 3), INSIGHTFACE_WIDTHS, kwargs)


@register_backbone("r_lite")
def iresnet_lite(**kwargs: Any) -> IResNet:
    """Small IResNet (stages 1-1-1-1, narrow) for the CPU demo run; same block structure and key names."""
    return _build((1, 1, 1, 1), (16, 32, 64, 128), kwargs)
