"""Checkpoints: safetensors and JSON only (no pickle), written atomically, verified on load.

Layout of `<output>/checkpoints/step-00001234/`:

    model.safetensors                      backbone, plain keys (loadable without this project), metadata
    optimizer.safetensors                  backbone optimizer state, keyed "<param name>::<state key>"
    head-rank00000-of-00002.safetensors    one per rank: its class-center rows ("weight") and their optimizer
                                           state ("weight::momentum_buffer", ...); metadata: class_start, num_local
    rng-rank00000.safetensors              one per rank: Python, NumPy and torch RNG states
    trainer_state.json                     step, epoch, sampler position, scaler, optimizer hyperparameters,
                                           world size, the structural config it was made with, loss history
    deepspeed/                             DeepSpeed runs only: the engine's own (partitioned) state, DeepSpeed's
                                           format; `optimizer.safetensors` is then absent
    manifest.json                          sha256 of every file above; written last

Every rank writes its own head shard (Accelerate's `save_custom_state` writes on the main process only, which would
lose the other ranks' shards). Head shards are keyed by class range, so a checkpoint made with W ranks loads on any
number of ranks: each rank copies the rows of its own range out of the shards that overlap it.

Atomicity: all files go to `.tmp-step-XXXXXXXX/`; the main process writes the manifest, then renames the folder.
A crash while saving leaves the previous checkpoint untouched and only a `.tmp-*` folder, which the next save
removes and which resume ignores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from heads.base import Head
from models.errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
GLOBAL_PREFIX = "global::"  # a head's global state in its shard files
MODEL_METADATA_INPUT = "RGB 112x112, (x/255 - 0.5) / 0.5"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and file."""


# --------------------------------------------------------------------------------------------------------------
# Model file


def model_metadata(network: str, embedding_size: int) -> dict[str, str]:
    return {
        "format": "pt",
        "network": network,
        "embedding_size": str(embedding_size),
        "input": MODEL_METADATA_INPUT,
        "producer": "arcface-accelerate",
    }


def save_model(path: Path, backbone: nn.Module, metadata: dict[str, str]) -> None:
    """Write the backbone's state dict as `model.safetensors` atomically (temporary file, then rename)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Saving


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int, world_size: int) -> None:
    """Seal a checkpoint folder: sha256 of every file in it (sub-folders included), written last and synced."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    manifest = {"step": step, "world_size": world_size, "files": {f: _sha256(folder / f) for f in files}}
    with (folder / "manifest.json").open("w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())


GroupRef = tuple[torch.optim.Optimizer, int]  # (optimizer, param-group index) holding one part's parameters


def _state_tensors(ref: GroupRef, names: dict[int, str]) -> dict[str, torch.Tensor]:
    optimizer, group = ref
    out: dict[str, torch.Tensor] = {}
    for param in optimizer.param_groups[group]["params"]:
        for key, value in optimizer.state.get(param, {}).items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            out[f"{names[id(param)]}::{key}"] = tensor.detach().to("cpu").contiguous()
    return out


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys).astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    meta = {
        "python": json.dumps([py_version, py_gauss]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]),
    }
    return tensors, meta


def _set_rng(path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(x) for x in tensors["python"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    np.random.set_state((np_name, tensors["numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    output: Path,
    *,
    step: int,
    rank: int,
    world_size: int,
    barrier: Any,
    backbone: nn.Module,
    head: Head,
    backbone_group: GroupRef | None,
    head_group: GroupRef,
    trainer_state: dict[str, Any],
    metadata: dict[str, str],
    keep: int,
    engine: Any = None,
) -> Path:
    """Write a checkpoint from every rank (collective: all ranks must call it at the same step).

    `backbone_group`/`head_group` say where each part's parameters sit in their optimizer; under DeepSpeed pass
    `engine` (and no backbone group): it writes its own state into `deepspeed/` and `model.safetensors` gets the
    fp32 master weights. `trainer_state` is JSON-able (the main process's copy is written).
    """
    root = output / CHECKPOINTS
    tmp = root / f".tmp-step-{step:08d}"
    final = root / f"step-{step:08d}"
    if rank == 0:
        for stale in root.glob(".tmp-step-*"):  # this step's, or the leftover of any earlier save that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()  # the folder exists before any rank writes into it

    # The head's rows (heads.base.Head: class as dim 0) and their optimizer state, sliced by class range on load;
    # its global state ("global::<name>", identical on every rank) is taken from any shard.
    head_names = {id(p): n for n, p in head.named_parameters()}
    head_tensors = {n: t.detach().to("cpu").contiguous() for n, t in head.row_tensors().items()}
    head_tensors.update(_state_tensors(head_group, head_names))
    head_tensors.update(
        {f"{GLOBAL_PREFIX}{n}": t.detach().to("cpu").contiguous() for n, t in head.global_tensors().items()}
    )
    shard = head.shard_info()
    save_file(
        head_tensors,
        str(tmp / f"head-rank{rank:05d}-of-{world_size:05d}.safetensors"),
        metadata={k: str(v) for k, v in shard.items()},
    )
    rng, rng_meta = _rng_tensors()
    save_file(rng, str(tmp / f"rng-rank{rank:05d}.safetensors"), metadata=rng_meta)

    if engine is not None:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # collective; writes per-rank files
        barrier()
    if rank == 0:
        if engine is not None:
            save_model(tmp / "model.safetensors", _deepspeed_fp32_weights(tmp / "deepspeed", backbone), metadata)
        else:
            save_model(tmp / "model.safetensors", backbone, metadata)
        if backbone_group is not None:
            backbone_names = {id(p): n for n, p in backbone.named_parameters()}
            save_file(_state_tensors(backbone_group, backbone_names), str(tmp / "optimizer.safetensors"))
        groups = {
            part: _hyperparameters(ref) for part, ref in (("backbone", backbone_group), ("head", head_group)) if ref
        }
        state = dict(trainer_state, optimizer_param_groups=groups, world_size=world_size)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=_json_default))
    barrier()  # every shard is on disk before the manifest seals the folder

    if rank == 0:
        write_manifest(tmp, step, world_size)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _prune(root, keep)
    barrier()
    return final


def _hyperparameters(ref: GroupRef) -> dict[str, Any]:
    optimizer, group = ref
    return {k: v for k, v in optimizer.param_groups[group].items() if k != "params"}


def _deepspeed_fp32_weights(folder: Path, backbone: nn.Module) -> nn.Module:
    """The fp32 master weights (and buffers) of a ZeRO-1/2 checkpoint, in a copy of the backbone's structure."""
    import copy

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="state")
    fp32 = copy.deepcopy(backbone).float()
    # ZeRO-1 leaves frozen parameters (iresnet's `features.weight`, fixed at 1) out of its fp32 partitions; they
    # never change, so the module's own copy is exact. Anything else missing is an error.
    frozen = {n for n, p in fp32.named_parameters() if not p.requires_grad}
    missing = set(fp32.state_dict()) - set(state) - frozen
    if missing:
        raise CheckpointError(f"DeepSpeed checkpoint {folder} lacks {sorted(missing)[:5]}")
    fp32.load_state_dict(state, strict=False)
    return fp32


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# Loading


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints (with a manifest) in step order; temporary folders are ignored."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "manifest.json").is_file()]


def verify_manifest(path: Path) -> dict[str, Any]:
    """Check every file's sha256 against the manifest; raise naming the first mismatch."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({exc})") from None
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is listed in manifest.json but missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum in manifest.json")
    return manifest


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable trainer_state.json ({exc})") from None


def load_checkpoint(
    path: Path,
    *,
    rank: int,
    world_size: int,
    backbone: nn.Module,
    head: Head,
    backbone_group: GroupRef | None,
    head_group: GroupRef,
    engine: Any = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Restore backbone, head rows of this rank's class range, optimizer state and RNG; return trainer_state.

    `verify=False` skips the checksums when the caller has just verified them (hashing large files twice).

    Under DeepSpeed (`engine`), the engine loads its own state when the world size is unchanged; otherwise the
    backbone gets the fp32 weights of `model.safetensors` and a fresh optimizer, which is logged.
    """
    if verify:
        verify_manifest(path)
    state = read_trainer_state(path)
    same_world = state["world_size"] == world_size
    if engine is not None and (path / "deepspeed").is_dir() and same_world:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_lr_scheduler_states=False)
    else:
        if engine is not None:
            logger.warning(
                "checkpoint %s: the DeepSpeed backbone optimizer state cannot move from %d to %d ranks (or was not "
                "saved by DeepSpeed): loading the backbone weights only, with a fresh optimizer",
                path,
                state["world_size"],
                world_size,
            )
        weights = load_file(str(path / "model.safetensors"))
        own = backbone.state_dict()
        backbone.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in weights.items()}, strict=True)
        if engine is not None:
            _set_engine_master_weights(backbone, weights)
        if backbone_group is not None and (path / "optimizer.safetensors").is_file():
            _restore_group(backbone_group, backbone, load_file(str(path / "optimizer.safetensors")))
    head_tensors = _load_head_rows(path, head)
    head.load_global_tensors(
        {k[len(GLOBAL_PREFIX) :]: head_tensors.pop(k) for k in list(head_tensors) if k.startswith(GLOBAL_PREFIX)}
    )
    with torch.no_grad():
        for name, tensor in head.row_tensors().items():
            tensor.copy_(head_tensors.pop(name))
    _restore_group(head_group, head, head_tensors)
    for part, ref in (("backbone", backbone_group), ("head", head_group)):
        saved = state["optimizer_param_groups"].get(part)
        if ref is not None and saved is not None:
            ref[0].param_groups[ref[1]].update(saved)

    rng_file = path / f"rng-rank{rank:05d}.safetensors"
    if same_world and rng_file.is_file():
        _set_rng(rng_file)
    else:
        logger.info(
            "checkpoint %s was made with %d ranks, this run has %d: class centers and their optimizer state are "
            "re-split by class range; RNG states start fresh",
            path,
            state["world_size"],
            world_size,
        )
    return state


def _set_engine_master_weights(backbone: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Under ZeRO the engine's optimizer steps its own fp32 master copy of each parameter (this rank's partition)
    and writes it back into the bf16/fp16 module after every step: loading the module alone would be undone by the
    first step. Set each master partition from the fp32 weights too (DeepSpeed's tensor-fragment API)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    for name, param in backbone.named_parameters():
        value = weights[name].to(param.device, torch.float32)
        safe_set_full_fp32_param(param, value)
        master = safe_get_full_fp32_param(param)
        if master is not None and not torch.equal(master.float(), value):
            raise CheckpointError(f"DeepSpeed did not take the fp32 weights of {name} from the checkpoint")


def _restore_group(ref: GroupRef, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Set the optimizer state of `module`'s parameters from "<param name>::<state key>" tensors."""
    optimizer, group = ref
    names = {id(p): n for n, p in module.named_parameters()}
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, state_key = key.split("::", 1)
        by_name.setdefault(name, {})[state_key] = tensor
    for param in optimizer.param_groups[group]["params"]:
        saved = by_name.get(names[id(param)])
        if saved:
            # Scalars (Adam's step) stay on the CPU as torch keeps them; buffers go to the parameter's device.
            optimizer.state[param] = {k: v if v.dim() == 0 else v.to(param.device) for k, v in saved.items()}


def _load_head_rows(path: Path, head: Head) -> dict[str, torch.Tensor]:
    """Assemble this rank's rows [class_start, class_start + num_local) from every overlapping shard."""
    info = head.shard_info()
    start, stop = int(info["class_start"]), int(info["class_start"]) + int(info["num_local"])
    shards = sorted(path.glob("head-rank*-of-*.safetensors"))
    if not shards:
        raise CheckpointError(f"checkpoint {path}: no head-rank*.safetensors shard")
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    scalars: dict[str, torch.Tensor] = {}
    covered = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as fh:
            meta = fh.metadata()
            if int(meta["num_classes"]) != int(info["num_classes"]):
                raise CheckpointError(
                    f"checkpoint {path}: {shard.name} has num_classes={meta['num_classes']}, "
                    f"this run has {info['num_classes']}"
                )
            s_start = int(meta["class_start"])
            s_stop = s_start + int(meta["num_local"])
            lo, hi = max(start, s_start), min(stop, s_stop)
            for key in fh.keys():
                sl = fh.get_slice(key)
                if len(sl.get_shape()) == 0 or key.startswith(GLOBAL_PREFIX):
                    scalars[key] = fh.get_tensor(key)  # Adam's step count, global state: the same on every shard
                elif lo < hi:
                    rows.setdefault(key, []).append((lo, sl[lo - s_start : hi - s_start]))
            if lo < hi:
                covered += hi - lo
    if covered != stop - start:
        raise CheckpointError(f"checkpoint {path}: head shards cover {covered} of the {stop - start} classes needed")
    out = {key: torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]) for key, parts in rows.items()}
    out.update(scalars)
    return out
