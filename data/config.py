"""The recipe's `data:` section. `data.build_train_input(cfg, ...)` reads it and builds the whole input pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data.faces import FacesConfig


@dataclass
class DataConfig:
    """Where the images come from.

    `recordio`: insightface layout `root/train.rec` + `root/train.idx`; `image_folder`: `root/<identity>/*.jpg`
    (aligned 112x112 faces, one sub-folder per identity); `generated`: the embedded procedural faces
    (`generated.*`); `synthetic`: one random image repeated (throughput measurements only, as insightface's
    `rec: synthetic`).
    """

    source: Literal["recordio", "image_folder", "generated", "synthetic"] = "recordio"
    root: str = ""
    # `gpu`: decode the JPEGs of a `recordio` source in batches on the GPU (nvJPEG through torchvision).
    decode: Literal["cpu", "gpu"] = "cpu"
    # 0 = take it from the dataset (record-0 header, `property` file); otherwise checked against the data.
    num_classes: int = 0
    # `synthetic` only: how many samples an epoch has.
    num_images: int = 0
    # Processes that read and decode (data.loader.FaceLoader; 0 = in the training process), and how many batches
    # each decodes ahead of the step.
    num_workers: int = 2
    prefetch: int = 2
    # On a CUDA machine, page-lock the loader's batch slots once, so each batch's copy to the GPU is asynchronous.
    pin_memory: bool = True
    random_flip: bool = True
    # A corrupt image is replaced by another sample and counted; past this fraction (per rank) the run stops.
    max_bad_fraction: float = 0.01
    # `recordio`: an .idx that lists fewer records than its .rec holds (a copy cut short, an .idx from another
    # build) stops the run at start, naming both counts; true trains on the listed records with a warning instead.
    allow_partial_index: bool = False
    generated: FacesConfig = field(default_factory=FacesConfig)  # data.faces: the generator's own settings
