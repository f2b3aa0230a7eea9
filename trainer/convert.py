"""Import insightface (arcface_torch) weights: a backbone to `model.safetensors`, a training run to a checkpoint.

    python -m trainer.convert insightface-backbone backbone.pth --network r50 --out model.safetensors
    python -m trainer.convert insightface-head checkpoint_gpu_0.pt ... checkpoint_gpu_7.pt --network r50 \\
        --num-classes 93431 --out runs/ms1mv3_r50
    accelerate launch ... trainer/main.py --config RECIPE --output runs/ms1mv3_r50 --resume

`insightface-backbone` reads a `torch.save`d IResNet state dict (`backbone.pth`, `model.pt`, also a DDP
`module.`-prefixed one, or a training checkpoint's `state_dict_backbone`), checks it loads with `strict=True` into
this project's backbone of that name (the checks of `models.weights`, which every weights loader shares: the first
missing, unexpected or wrongly shaped key is named), and writes it with this project's metadata.

`insightface-head` reads insightface's per-rank training checkpoints (`checkpoint_gpu_{rank}.pt`: `epoch`,
`global_step`, `state_dict_backbone`, `state_dict_softmax_fc` with `weight` = rank r's contiguous class range,
`num_local = C // W + (r < C % W)` rows) and writes a complete checkpoint folder
`<out>/checkpoints/step-<global_step>/` (model, head shards keyed by class range, trainer_state.json, manifest.json)
that `trainer/main.py --output <out> --resume` continues on any number of ranks. insightface's optimizer state is
not imported (it is keyed by its own parameter order): the optimizer starts fresh, with the recipe's hyperparameters.

Every file is read with `torch.load(weights_only=True)`: no pickled code runs. Bad input, and an output that cannot be
written (a full disk, a file-size limit, a path that is a folder), is one line on stderr and exit status 2, and leaves
no half-written output. docs/checkpoints.md has the details.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from models.cli import OutputError, atomic_output, output_folder, report_input_error, setup_logging
from models.errors import InputError
from models.run_folder import RunFolder
from models.weights import build_with_state, check_network, infer_embedding_size

logger = logging.getLogger(__name__)

_GPU_CHECKPOINT = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")


class ConvertError(InputError):
    """Input that cannot be converted; the message names the file and key."""


# --------------------------------------------------------------------------------------------------------------
# Reading insightface files


def load_torch_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, memory-mapped where the file format allows it.

    A pickle that would import a global a weights file never needs (`os.system`, `builtins.eval`, any class) is
    refused by torch before anything runs; the error names that global."""
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        # mmap: a training checkpoint also holds the optimizer state, which is never read, so never paged in.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
            raise ConvertError(f"{path}: not a torch.save file ({_first_line(exc)})") from None
    except Exception as exc:  # the unpickler raises several types for foreign or malicious content
        raise _load_error(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _load_error(path, exc) from None


# How torch's weights-only unpickler names a global it refuses. torch 2.13 words it two ways: "Trying to load
# unsupported GLOBAL posix.system whose module posix is blocked" and "Unsupported global: GLOBAL print was not an
# allowed global by default" (builtins without their module).
_REFUSED_GLOBAL = re.compile(r"\bGLOBAL ([A-Za-z_][\w.]*)")
# The modules `os` functions are pickled under.
_OS_MODULES = ("posix", "nt")


def _load_error(path: Path, exc: BaseException) -> ConvertError:
    """The one-line error of a failed weights-only load: the refused global in our words, else torch's reason."""
    found = _REFUSED_GLOBAL.search(str(exc))
    if found is None:
        return ConvertError(f"{path}: cannot be read with torch.load(weights_only=True) ({_first_line(exc)})")
    name = found.group(1).rstrip(".")
    module, _, attribute = name.rpartition(".")
    if not module:
        name = f"builtins.{attribute}"
    elif module in _OS_MODULES:
        name = f"os.{attribute}"
    return ConvertError(
        f"{path}: refused: it would import {name}, which a weights file never needs (torch.load weights_only=True)"
    )


def _first_line(exc: BaseException) -> str:
    """The informative line of a torch.load error (its weights-only message starts with generic advice)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def backbone_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of a loaded file: a plain state dict, a DDP one (`module.` prefix) or a checkpoint's."""
    if isinstance(loaded, dict) and "state_dict_backbone" in loaded:
        loaded = loaded["state_dict_backbone"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        found = sorted(loaded)[:5] if isinstance(loaded, dict) else type(loaded).__name__
        raise ConvertError(f"{path}: not a backbone state dict (found {found})")
    return _strip_prefix(loaded)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if all(key.startswith("module.") for key in state):  # saved from the DDP wrapper
        return {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def fit_backbone(
    state: dict[str, torch.Tensor], network: str, embedding_size: int | None, path: Path
) -> tuple[nn.Module, int]:
    """`(this project's network holding state, its embedding size)`: the checks and loading of `models.weights`;
    the embedding size, unless given, is read from the state's shapes (IResNet: the rows of `fc.weight`)."""
    check_network(network, path)
    embedding_size = embedding_size or infer_embedding_size(state, network) or 512
    return build_with_state(state, network, embedding_size, path), embedding_size


def _save_model(out: Path, backbone: nn.Module, metadata: dict[str, str]) -> None:
    """`trainer.checkpoint.save_model` into `out` atomically; a failed write is an `OutputError` naming `out`."""
    from trainer.checkpoint import save_model

    with atomic_output(out) as tmp:
        try:
            save_model(tmp, backbone, metadata)
        except SafetensorError as err:  # how safetensors reports a failed write (disk full, file too large)
            raise OSError(str(err)) from None


# --------------------------------------------------------------------------------------------------------------
# insightface-backbone


def convert_backbone(source: Path, network: str, out: Path, embedding_size: int | None = None) -> nn.Module:
    """`backbone.pth` -> `model.safetensors` with this project's metadata; returns the loaded backbone."""
    from trainer.checkpoint import model_metadata

    state = backbone_state_dict(load_torch_file(source), source)
    backbone, embedding_size = fit_backbone(state, network, embedding_size, source)
    _save_model(out, backbone, model_metadata(network, embedding_size))
    logger.info("%s -> %s (%s, %d-d embeddings)", source, out, network, embedding_size)
    return backbone


# --------------------------------------------------------------------------------------------------------------
# insightface-head


def rank_order(files: Sequence[Path]) -> list[Path]:
    """Files in rank order: by the number in `checkpoint_gpu_{rank}.pt` when every name has one, else as given."""
    ranks = [_GPU_CHECKPOINT.match(f.name) for f in files]
    if not all(ranks):
        return list(files)
    by_rank = {int(m.group(1)): f for m, f in zip(ranks, files, strict=True) if m}
    if len(by_rank) != len(files):
        raise ConvertError(f"the same rank is given twice among {[f.name for f in files]}")
    missing = sorted(set(range(len(files))) - set(by_rank))
    if missing:
        raise ConvertError(
            f"{len(files)} files but no checkpoint_gpu_{missing[0]}.pt: give every rank's file of the run"
        )
    return [by_rank[r] for r in range(len(files))]


def class_split(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """(class_start, num_local) of every rank: insightface's split, which is also Partial FC's here."""
    per_rank, remainder = divmod(num_classes, world_size)
    return [(per_rank * r + min(r, remainder), per_rank + int(r < remainder)) for r in range(world_size)]


def _head_weight(loaded: Any, path: Path) -> torch.Tensor:
    if not isinstance(loaded, dict) or "state_dict_softmax_fc" not in loaded:
        found = sorted(loaded)[:6] if isinstance(loaded, dict) else type(loaded).__name__
        raise ConvertError(
            f"{path}: not an insightface training checkpoint, no 'state_dict_softmax_fc' (found {found})"
        )
    head = loaded["state_dict_softmax_fc"]
    weight = _strip_prefix(head).get("weight") if isinstance(head, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConvertError(f"{path}: state_dict_softmax_fc has no 2-d 'weight' (found {sorted(head)[:6]})")
    return weight


def convert_head(
    files: Sequence[Path],
    network: str,
    num_classes: int,
    out: Path,
    embedding_size: int | None = None,
    optimizer: Literal["sgd", "adamw"] = "sgd",
) -> Path:
    """insightface's per-rank `checkpoint_gpu_{rank}.pt` -> `<out>/checkpoints/step-<global_step>/`; returns it."""
    from trainer import checkpoint as ckpt
    from trainer.config import ExperimentConfig
    from trainer.guard import DivergenceGuard
    from trainer.state import Nested, RunIdentity, SamplerPosition, Stateful, TrainState

    files = rank_order([Path(f) for f in files])
    world_size = len(files)
    if num_classes < world_size:
        raise ConvertError(f"--num-classes {num_classes} is less than the {world_size} ranks' files")
    loaded = [load_torch_file(f) for f in files]  # memory-mapped: only what is used below is read
    weights = [_head_weight(item, f) for item, f in zip(loaded, files, strict=True)]
    rows = [int(w.shape[0]) for w in weights]
    if sum(rows) != num_classes:
        raise ConvertError(
            f"the {world_size} head shards hold {sum(rows)} class centers ({' + '.join(map(str, rows))}), "
            f"--num-classes is {num_classes}"
        )
    split = class_split(num_classes, world_size)
    for rank, (f, count, (_, num_local)) in enumerate(zip(files, rows, split, strict=True)):
        if count != num_local:
            raise ConvertError(
                f"{f}: {count} class centers, but rank {rank} of {world_size} holds {num_local} of {num_classes} "
                f"classes (C // W + (r < C % W)); are the files in rank order and --num-classes the run's?"
            )
    steps = {(int(item.get("global_step", -1)), int(item.get("epoch", -1))) for item in loaded}
    if len(steps) != 1 or min(next(iter(steps))) < 0:
        raise ConvertError(f"the files disagree on (global_step, epoch) or lack them: {sorted(steps)}")
    step, epoch = steps.pop()

    state = backbone_state_dict(loaded[0], files[0])
    backbone, embedding_size = fit_backbone(state, network, embedding_size, files[0])
    for f, weight in zip(files, weights, strict=True):
        if weight.shape[1] != embedding_size:
            raise ConvertError(
                f"{f}: key 'state_dict_softmax_fc.weight' has {weight.shape[1]}-d centers, the backbone's embeddings "
                f"are {embedding_size}-d"
            )

    run = RunFolder(out)
    final, folder = run.checkpoint(step).path, run.temporary_checkpoint(step)
    if final.exists():
        raise ConvertError(f"{final} already exists: choose another --out")
    output_folder(run.checkpoints)
    shutil.rmtree(folder.path, ignore_errors=True)  # the trainer's own temporary name: resume ignores it
    try:
        folder.path.mkdir()
        ckpt.save_model(folder.model, backbone, ckpt.model_metadata(network, embedding_size))
        for rank, (weight, (start, num_local)) in enumerate(zip(weights, split, strict=True)):
            meta = {
                "class_start": start,
                "num_local": num_local,
                "num_classes": num_classes,
                "rank": rank,
                "world_size": world_size,
            }
            save_file(
                {"weight": weight.to(torch.float32).contiguous()},
                str(folder.head_shard(rank, world_size)),
                metadata={k: str(v) for k, v in meta.items()},
            )
        cfg = ExperimentConfig()
        cfg.network.name, cfg.network.embedding_size, cfg.optim.name = network, embedding_size, optimizer
        # The trainer's own parts write the state: insightface saves at the end of an epoch, `epoch` being the next
        # one, so nothing of it is consumed yet; no loss history, no scaler, no bad steps.
        parts: dict[str, Stateful] = {
            "identity": RunIdentity(cfg, num_classes),
            "train": TrainState(steps_per_epoch=1, step=step, epoch=epoch),
            "input": Nested("input", None),
            "verification": Nested("verification", None),
            "divergence": DivergenceGuard(max_bad_steps=cfg.train.max_bad_steps),
        }
        trainer_state = {
            **ckpt.compose_state(parts),
            **SamplerPosition.entries(0),
            "scaler": None,
            # No optimizer state and no saved hyperparameters: the resumed run's recipe sets them, buffers start at 0.
            "optimizer_param_groups": {},
            "world_size": world_size,
            "converted_from": {"format": "insightface arcface_torch", "files": [f.name for f in files]},
        }
        ckpt.write_trainer_state(folder, trainer_state)
        ckpt.seal(folder, step, world_size)
        os.rename(folder.path, final)  # the folder appears complete or not at all
    except (OSError, SafetensorError) as err:  # safetensors reports a failed write as its own error type
        shutil.rmtree(folder.path, ignore_errors=True)  # nothing half-written stays behind
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise OutputError(f"{final}: cannot be written ({reason})") from None
    logger.info(
        "%d insightface shards (%d classes, step %d, epoch %d) -> %s; resume with --output %s --resume "
        "(optimizer state starts fresh)",
        world_size,
        num_classes,
        step,
        epoch,
        final,
        out,
    )
    return final


# --------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    backbone = commands.add_parser("insightface-backbone", help="backbone.pth / model.pt -> model.safetensors")
    backbone.add_argument("source", type=Path, help="insightface state dict (or a checkpoint_gpu_*.pt)")
    backbone.add_argument("--network", required=True, help="this project's backbone name, e.g. r50")
    backbone.add_argument("--embedding-size", type=int, help="default: the rows of fc.weight")
    backbone.add_argument("--out", type=Path, required=True, help="the model.safetensors to write")
    head = commands.add_parser("insightface-head", help="checkpoint_gpu_{rank}.pt files -> a checkpoint folder")
    head.add_argument("sources", type=Path, nargs="+", help="every rank's checkpoint_gpu_{rank}.pt")
    head.add_argument("--network", required=True, help="this project's backbone name, e.g. r50")
    head.add_argument("--num-classes", type=int, required=True, help="the run's class count")
    head.add_argument("--embedding-size", type=int, help="default: the rows of fc.weight")
    head.add_argument(
        "--optimizer",
        choices=["sgd", "adamw"],
        default="sgd",
        help="optim.name of the recipe that will resume (default: %(default)s)",
    )
    head.add_argument("--out", type=Path, required=True, help="the run's output folder (gets checkpoints/step-N/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        if args.command == "insightface-backbone":
            convert_backbone(args.source, args.network, args.out, args.embedding_size)
        else:
            convert_head(args.sources, args.network, args.num_classes, args.out, args.embedding_size, args.optimizer)
    except InputError as exc:
        return report_input_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
