"""Backbones: a name -> constructor registry. ``build_backbone("r50", num_features=512, dropout=0.0)``.

The registry and its contract are in ``models/registry.py``; importing this package imports every model file, which
registers its backbones there. The families: IResNet (``models/iresnet.py``), MobileFaceNet
(``models/mobilefacenet.py``), ViT (``models/vit.py``).
"""

from __future__ import annotations

from models.flops import count_flops
from models.iresnet import IResNet
from models.mobilefacenet import MobileFaceNet
from models.registry import BackboneOptionError, build_backbone, list_backbones, register_backbone
from models.vit import VisionTransformer

__all__ = [
    "BackboneOptionError",
    "IResNet",
    "MobileFaceNet",
    "VisionTransformer",
    "build_backbone",
    "count_flops",
    "list_backbones",
    "register_backbone",
]
