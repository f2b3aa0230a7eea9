"""The recipe's `network:` section and the backbone built from it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.registry import build_backbone


@dataclass
class NetworkConfig:
    """The backbone: a name from `models.list_backbones()`."""

    name: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    # BatchNorm layers use their running statistics and never update them (fine-tuning; exact equivalence tests).
    freeze_batchnorm: bool = False
    # Fine-tuning: start the backbone from this model.safetensors (this project's, or converted from insightface
    # with `python -m trainer.convert`); the head is new, for this run's classes.
    init_weights: str = ""
    # Recompute each block's activations in backward instead of keeping them (less memory, about a third more
    # compute); the gradients are the same.
    gradient_checkpointing: bool = False


def build_network(cfg: NetworkConfig) -> nn.Module:
    """The backbone `cfg.name` with the section's architecture settings (fine-tuning weights and frozen statistics
    are training choices: the trainer applies them)."""
    return build_backbone(
        cfg.name,
        num_features=cfg.embedding_size,
        dropout=cfg.dropout,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
