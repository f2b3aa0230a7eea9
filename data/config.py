"""The recipe's `data:` section. `data.build_train_input(cfg, ...)` reads it and builds the whole input pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data.faces import FacesConfig
from models.recipe import key


@dataclass
class DataConfig:
    """Where the images come from.

    `recordio`: insightface layout `root/train.rec` + `root/train.idx`; `image_folder`: `root/<identity>/*.jpg`
    (aligned 112x112 faces, one sub-folder per identity); `generated`: the embedded procedural faces
    (`generated.*`); `synthetic`: one random image repeated (throughput measurements only, as insightface's
    `rec: synthetic`).
    """

    source: Literal["recordio", "image_folder", "generated", "synthetic"] = key(
        "recordio",
        help="where the images come from: recordio (root/train.rec + train.idx), image_folder "
        "(root/<identity>/*.jpg), generated (the embedded procedural faces), synthetic (throughput only)",
    )
    root: str = key("", help="the dataset folder (recordio, image_folder); eval.bins names resolve against it")
    # Stated by the user, copied into the model card (evaluation.card): the trainer cannot know either.
    name: str = key("", help="the training data's name for the model card, e.g. MS1MV3 (default: from source/root)")
    licence: str = key(
        "not stated", help="the training data's licence as you state it, for the model card (e.g. non-commercial)"
    )
    # `gpu` decodes the JPEGs of a `recordio` source (the generated faces are one) in batches with nvJPEG through
    # torchvision.
    decode: Literal["cpu", "gpu"] = key(
        "cpu", help="where JPEGs are decoded: cpu (in the loader) or gpu (nvJPEG, in batches; RecordIO sources)"
    )
    num_classes: int = key(
        0, help="identities; 0 = from the dataset (record-0 header, property file), otherwise checked against it"
    )
    num_images: int = key(0, help="synthetic only: samples per epoch")
    # data.loader.FaceLoader.
    num_workers: int = key(2, help="processes that read and decode (0 = in the training process)")
    prefetch: int = key(2, help="batches each worker decodes ahead of the step")
    pin_memory: bool = key(
        True, help="on a CUDA machine, page-lock the batch slots once, so each copy to the GPU is asynchronous"
    )
    random_flip: bool = key(True, help="flip training images horizontally at random")
    max_bad_fraction: float = key(
        0.01,
        help="a corrupt image is replaced by another sample and counted; past this fraction (per rank) the run stops",
    )
    # A copy cut short, or an .idx from another build: by default the run stops at start, naming both counts.
    allow_partial_index: bool = key(
        False, help="recordio: train on the records an .idx lists when its .rec holds more, with a warning"
    )
    generated: FacesConfig = key(
        factory=FacesConfig, help="source generated: the generator's own settings (data/faces.py), its cache key"
    )
