"""Heads: embeddings + labels -> loss (margins, Partial FC, the differentiable collectives).

The contract every head keeps is `heads.base.Head`; a head is built from the recipe's `head:` section
(`heads.config.HeadConfig`) by the class registered under `head.name` (`heads.registry`):

    head = build_head(cfg.head, embedding_size=512, num_classes=93431, rank=rank, world_size=world_size)

Each head module holds its class, its settings and its registration; importing them here registers them.
"""

from __future__ import annotations

from heads.adaface import AdaFacePartialFC, AdaFaceSettings
from heads.base import Head, PartialFCOptions
from heads.config import HeadConfig
from heads.curricularface import CurricularFacePartialFC, CurricularFaceSettings
from heads.elasticface import ElasticFacePartialFC, ElasticFaceSettings
from heads.magface import MagFacePartialFC, MagFaceSettings
from heads.margins import MarginSoftmax
from heads.partial_fc import MarginSettings, PartialFC, ScaleSettings
from heads.registry import build_head, list_heads, register_head
from heads.subcenter import SubCenterPartialFC, SubCenterSettings

__all__ = [
    "AdaFacePartialFC",
    "AdaFaceSettings",
    "CurricularFacePartialFC",
    "CurricularFaceSettings",
    "ElasticFacePartialFC",
    "ElasticFaceSettings",
    "Head",
    "HeadConfig",
    "MagFacePartialFC",
    "MagFaceSettings",
    "MarginSettings",
    "MarginSoftmax",
    "PartialFC",
    "PartialFCOptions",
    "ScaleSettings",
    "SubCenterPartialFC",
    "SubCenterSettings",
    "build_head",
    "list_heads",
    "register_head",
]
