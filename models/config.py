"""The recipe's `network:` section and the backbone built from it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.recipe import key
from models.registry import build_backbone


@dataclass
class NetworkConfig:
    """The backbone: a name from `models.list_backbones()`."""

    name: str = key(
        "r50",
        help="the backbone, a name from models.list_backbones(): r18 ... r2060, mbf, mbf_large, vit_t ... vit_h, "
        'r_lite (README, "Models and heads")',
    )
    embedding_size: int = key(512, help="length of the face embedding the backbone outputs")
    dropout: float = key(
        0.0, help="embedding dropout, in [0, 1) (IResNet: before fc; MobileFaceNet and ViT refuse a non-zero value)"
    )
    # Also what the exact equivalence tests across process counts rely on: batch statistics depend on the split.
    freeze_batchnorm: bool = key(
        False, help="BatchNorm layers use their running statistics and never update them (fine-tuning)"
    )
    # This project's model.safetensors, or one converted from insightface with `python -m trainer.convert`.
    init_weights: str = key(
        "",
        help="fine-tuning: start the backbone from this model.safetensors, or the one in this run or checkpoint "
        "folder ('' = random init); the head is new",
    )
    gradient_checkpointing: bool = key(
        False,
        help="recompute each block's activations in backward instead of keeping them (less memory, about a third "
        "more compute, the same gradients)",
    )


def build_network(cfg: NetworkConfig) -> nn.Module:
    """The backbone `cfg.name` with the section's architecture settings (fine-tuning weights and frozen statistics
    are training choices: the trainer applies them)."""
    return build_backbone(
        cfg.name,
        num_features=cfg.embedding_size,
        dropout=cfg.dropout,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
