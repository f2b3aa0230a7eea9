"""Backbone weights: the one loader of `model.safetensors` files, for fine-tuning, verification, IJB, export and
conversion.

A weights file is a backbone's state dict in safetensors. The trainer writes the network name and the embedding size
into its metadata (`network`, `embedding_size`; `trainer.checkpoint.model_metadata`), so the file alone rebuilds its
backbone: ``backbone, metadata = load_backbone("runs/x/model.safetensors")``. A run's output folder or a checkpoint
folder may stand for the `model.safetensors` inside it.

Every problem is a `WeightsError` naming the file and what is wrong: a missing or unreadable file, an unknown
network, the first missing, unexpected or wrongly shaped key (with their counts), a key holding NaN or infinite
values. A model file inside a checkpoint folder (beside its `manifest.json`) must match its checksum there, or it is
refused (`models.run_folder.CheckpointError`). Every reader of a trained model (fine-tuning, verification, IJB,
embed, compare, calibrate, export, conversion) loads through here, so none of them reports numbers of a damaged or
diverged model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.errors import InputError
from models.run_folder import CheckpointFolder, RunFolder

__all__ = [
    "MODEL_FILE",
    "WeightsError",
    "build_with_state",
    "check_finite",
    "check_network",
    "infer_embedding_size",
    "load_backbone",
    "load_state_into",
    "load_weights_into",
    "read_weights",
    "resolve_weights_path",
    "verify_checkpoint_model",
]

MODEL_FILE = RunFolder.MODEL  # the one name of a run's (and a checkpoint's) model file


class WeightsError(InputError):
    """Weights that cannot be used as a backbone; the message names the file and what is wrong."""


def resolve_weights_path(path: str | Path, verify: bool = True) -> Path:
    """The weights file `path` stands for: itself, or the `model.safetensors` inside a run or checkpoint folder.

    A `model.safetensors` of a checkpoint folder (the folder holds a `manifest.json`) is checked against its
    checksum first: a damaged file is a `CheckpointError` naming the folder and the file, for every reader.
    `verify=False` skips the checksum, for a caller that names a file it has just loaded (hashing it twice)."""
    path = Path(path)
    if path.is_dir():
        inner = path / MODEL_FILE
        if not inner.is_file():
            raise WeightsError(f"{path}: a folder without {MODEL_FILE} (give a weights file, a run or a checkpoint)")
        path = inner
    elif not path.exists():
        raise WeightsError(f"{path}: no such file")
    if verify:
        verify_checkpoint_model(path)
    return path


def verify_checkpoint_model(path: Path) -> None:
    """If `path` is the model file of a checkpoint folder (through a link too), it must match the folder's manifest.

    A file of another name beside a manifest is left alone: the manifest only vouches for what the trainer wrote."""
    real = path.resolve()
    folder = CheckpointFolder(real.parent)
    if real.name == MODEL_FILE and folder.manifest.is_file():
        folder.verify(only=(MODEL_FILE,))  # CheckpointError (an InputError) naming the folder and the file


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`(state dict on the CPU, metadata)` of a safetensors file (or of the one inside a folder, see above)."""
    return _read_file(resolve_weights_path(path))


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as err:
        # safetensors puts the whole reason on one line; an OSError's strerror is the readable part of it.
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise WeightsError(f"{path}: not a readable safetensors file ({reason})") from None


def load_state_into(
    backbone: nn.Module, state: dict[str, torch.Tensor], source: str | Path, target: str = "the network"
) -> None:
    """Load `state` into `backbone` with `strict=True` after checking every key, shape and value (finite), naming
    the first bad one.

    Floating-point tensors take the backbone's dtype (an fp16 export loads into fp32 weights). BatchNorm's
    `num_batches_tracked`, absent from files saved before torch 0.4.1, is kept from the backbone: it is unused in
    eval mode and by momentum BatchNorm. `target` names the backbone in messages ("network 'r50' ...").
    """
    expected = backbone.state_dict()
    fitted = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in fitted:
            fitted[key] = expected[key].clone()
    where = f"{source} does not fit {target}"
    missing = [key for key in expected if key not in fitted]
    if missing:
        raise WeightsError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [key for key in fitted if key not in expected]
    if unexpected:
        raise WeightsError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    wrong = [key for key, value in expected.items() if fitted[key].shape != value.shape]
    if wrong:
        key = wrong[0]
        raise WeightsError(
            f"{where}: key {key!r} has shape {list(fitted[key].shape)}, the network needs "
            f"{list(expected[key].shape)} ({len(wrong)} wrongly shaped)"
        )
    check_finite(fitted, source)
    for key, value in expected.items():
        if value.is_floating_point():
            fitted[key] = fitted[key].to(value.dtype)
    backbone.load_state_dict(fitted, strict=True)


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """A `WeightsError` naming `source` and the first key holding NaN or infinite values (a diverged or damaged
    model computes nothing meaningful: verification would report chance accuracy as if measured)."""
    bad = [key for key, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        count = int((~torch.isfinite(state[bad[0]])).sum())
        raise WeightsError(
            f"{source}: {len(bad)} of its {len(state)} tensors hold NaN or infinite values (first: key {bad[0]!r}, "
            f"{count} values): a diverged or damaged model, refused"
        )


def load_weights_into(backbone: nn.Module, path: str | Path) -> dict[str, str]:
    """Fine-tuning: `backbone`'s weights from a `model.safetensors` (or a folder holding one); returns its metadata."""
    file = resolve_weights_path(path)
    state, metadata = _read_file(file)
    load_state_into(backbone, state, file)
    return metadata


def check_network(network: str, source: str | Path) -> None:
    """A `WeightsError` naming `source` when no backbone is registered as `network`."""
    from models.registry import list_backbones

    if network not in list_backbones():
        raise WeightsError(f"{source}: unknown network {network!r}; registered: {', '.join(list_backbones())}")


def infer_embedding_size(state: dict[str, torch.Tensor], network: str) -> int | None:
    """The embedding size `state` was saved with, read from its shapes; None if they do not tell.

    Builds `network` twice on the meta device (no memory, no init cost) with two probe sizes: the first tensor
    whose shape follows the size (the embedding layer) holds it, at the dimension that changed.
    """
    from models.registry import build_backbone

    probe_a, probe_b = 509, 511  # odd sizes that no width of a backbone equals by chance
    with torch.device("meta"):
        small = build_backbone(network, num_features=probe_a).state_dict()
        large = build_backbone(network, num_features=probe_b).state_dict()
    for key, tensor in small.items():
        other = large[key].shape
        if tensor.shape == other or key not in state or state[key].dim() != tensor.dim():
            continue
        for dim, (a, b) in enumerate(zip(tensor.shape, other, strict=True)):
            if (a, b) == (probe_a, probe_b):
                return int(state[key].shape[dim])
    return None


def build_with_state(
    state: dict[str, torch.Tensor], network: str, embedding_size: int, source: str | Path
) -> nn.Module:
    """This project's `network` with `embedding_size`-d embeddings holding `state` (checked key by key), in eval
    mode on the CPU."""
    from models.registry import build_backbone

    check_network(network, source)
    backbone = build_backbone(network, num_features=embedding_size)
    load_state_into(backbone, state, source, f"network {network!r} (embedding size {embedding_size})")
    return backbone.eval()


def load_backbone(
    path: str | Path,
    network: str | None = None,
    embedding_size: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict[str, str]]:
    """`(backbone in eval mode on device, metadata)` from a `model.safetensors`, a run folder or a checkpoint folder.

    The network and the embedding size come from the arguments, else the file's metadata; a file without metadata
    needs the network named, and its embedding size is read from the weights' shapes. The returned metadata is the
    file's, with `network` and `embedding_size` set to what was built.
    """
    file = resolve_weights_path(path)
    state, metadata = _read_file(file)
    network = network or metadata.get("network")
    if not network:
        raise WeightsError(f"{file}: no 'network' in its metadata: pass --network")
    check_network(network, file)
    if embedding_size is None and "embedding_size" in metadata:
        text = metadata["embedding_size"]
        if not text.isdigit() or int(text) < 1:
            raise WeightsError(f"{file}: metadata embedding_size {text!r} is not a positive integer")
        embedding_size = int(text)
    if embedding_size is None:
        # Shapes that do not tell the size lack the embedding layer: the key check below names what is missing.
        embedding_size = infer_embedding_size(state, network) or 512
    backbone = build_with_state(state, network, embedding_size, file)
    metadata["network"], metadata["embedding_size"] = network, str(embedding_size)
    return backbone.to(device), metadata
