"""Checkpoints: safetensors and JSON only (no pickle), written atomically, verified on load.

Layout of `<output>/checkpoints/step-00001234/`:

    model.safetensors                      backbone, plain keys (loadable without this project), metadata
    optimizer.safetensors                  backbone optimizer state, keyed "<param name>::<state key>" (under
                                           DeepSpeed too: each parameter's full fp32 state, gathered from ZeRO's
                                           partitions, so that it can move to another rank count)
    head-rank00000-of-00002.safetensors    one per rank: its class-center rows ("weight") and their optimizer
                                           state ("weight::momentum_buffer", ...); metadata: class_start, num_local
    rng-rank00000.safetensors              one per rank: Python, NumPy and torch RNG states
    trainer_state.json                     step, epoch, sampler position, scaler, optimizer hyperparameters,
                                           world size, the structural config it was made with, loss history
    deepspeed/                             DeepSpeed runs only: the engine's own (partitioned) state, DeepSpeed's
                                           format, used when the rank count is unchanged
    manifest.json                          sha256 of every file above; written last

Every rank writes its own head shard (Accelerate's `save_custom_state` writes on the main process only, which would
lose the other ranks' shards). Head shards are keyed by class range, so a checkpoint made with W ranks loads on any
number of ranks: each rank copies the rows of its own range out of the shards that overlap it.

Atomicity: all files go to `.tmp-step-XXXXXXXX/`; the main process writes the manifest, then renames the folder.
A crash while saving leaves the previous checkpoint untouched and only a `.tmp-*` folder, which the next save
removes and which resume ignores. Deleting is crash-safe the same way: a checkpoint to delete (pruned, or replaced
by a new save of the same step) is first renamed to `.trash-step-XXXXXXXX-<pid>`, then removed; a kill in between
leaves a `.trash-*` folder that nothing reads and that `remove_leftovers` (each save, and the trainer at start)
removes. Every file of a checkpoint gets the mode a plainly written file would (0666 less the umask: safetensors'
own writer creates 0600 files).

Resume: `find_resumable(output)` (the newest checkpoint, which must be complete and verify) and
`check_resumable(path)` (a given one); when it is not usable, the error names the newest valid checkpoint and the
`--resume <path>` that would use it.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from heads.base import Head
from models.errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_LEFTOVERS = (".tmp-step-*", ".trash-step-*")  # an interrupted save, an interrupted delete
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
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def file_mode() -> int:
    """The permissions `open(path, "w")` gives a new file here: 0666 less the process umask. safetensors' writer
    creates its files 0600, JSON written with `open` gets this; a checkpoint's files should not differ."""
    umask = os.umask(0)  # the only way to read it; set straight back (no file is created in between)
    os.umask(umask)
    return 0o666 & ~umask


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


def save_checkpoint(output: Path, **kwargs: Any) -> Path:
    """Write a checkpoint (`_write_checkpoint`); a write that fails (a full disk, a file-size limit, a folder in the
    way) leaves no partial folder and is a `CheckpointError` naming the checkpoint: the user's environment to fix.
    The previous checkpoints are untouched. In a multi-process run only the rank that failed raises."""
    step = kwargs["step"]
    try:
        return _write_checkpoint(output, **kwargs)
    except (OSError, SafetensorError) as exc:
        if kwargs["rank"] == 0:
            shutil.rmtree(output / CHECKPOINTS / f".tmp-step-{step:08d}", ignore_errors=True)
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        final = output / CHECKPOINTS / f"step-{step:08d}"
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}") from None


def _write_checkpoint(
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
        remove_leftovers(output)  # this step's .tmp, or what any earlier save or delete left when it was killed
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

    engine_optimizer: dict[str, torch.Tensor] = {}
    if engine is not None:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state")  # collective; writes per-rank files
        engine_optimizer = _deepspeed_optimizer_tensors(engine, backbone)  # collective too
        barrier()
    if rank == 0:
        if engine is not None:
            save_model(tmp / "model.safetensors", _deepspeed_fp32_weights(tmp / "deepspeed", backbone), metadata)
        else:
            save_model(tmp / "model.safetensors", backbone, metadata)
        if backbone_group is not None:
            backbone_names = {id(p): n for n, p in backbone.named_parameters()}
            save_file(_state_tensors(backbone_group, backbone_names), str(tmp / "optimizer.safetensors"))
        elif engine is not None:
            save_file(engine_optimizer, str(tmp / "optimizer.safetensors"))
        groups = {
            part: _hyperparameters(ref) for part, ref in (("backbone", backbone_group), ("head", head_group)) if ref
        }
        state = dict(trainer_state, optimizer_param_groups=groups, world_size=world_size)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=_json_default))
    barrier()  # every shard is on disk before the manifest seals the folder

    if rank == 0:
        mode = file_mode()
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, mode)
        write_manifest(tmp, step, world_size)
        if final.exists():  # the same step saved again (e.g. a resumed run): the new one replaces it
            _delete(final)
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
        _delete(old)


def _delete(checkpoint: Path) -> None:
    """Remove a checkpoint folder so that a kill at any moment leaves either the whole checkpoint or none of it
    under its name: one atomic rename out of the `step-*` namespace, then the slow part."""
    trash = checkpoint.with_name(f".trash-{checkpoint.name}-{os.getpid()}")
    os.rename(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(output: Path) -> list[Path]:
    """Delete what an interrupted save (`.tmp-step-*`) or delete (`.trash-step-*`) left in `<output>/checkpoints`;
    return what was removed. Main process only, while no save is running (each save calls it; so should a run at
    start, once it holds the output folder)."""
    root = output / CHECKPOINTS
    found = sorted(p for pattern in _LEFTOVERS for p in root.glob(pattern)) if root.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    if found:
        logger.info("removed %d leftover folder(s) of interrupted saves or deletes in %s", len(found), root)
    return found


# --------------------------------------------------------------------------------------------------------------
# Loading


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints (with a manifest) in step order; temporary folders are ignored."""
    return [p for p in _step_folders(output) if (p / "manifest.json").is_file()]


def find_resumable(output: Path) -> Path:
    """The newest checkpoint in `<output>/checkpoints`, checked complete and verified against its manifest (the
    caller need not hash it again). Raises `CheckpointError` when there is none, and when the newest is incomplete
    or corrupt: an older checkpoint is never taken silently; the message names the newest valid one and the
    `--resume <path>` that resumes from it."""
    root = output / CHECKPOINTS
    folders = _step_folders(output)
    if not folders:
        raise CheckpointError(f"no checkpoint to resume from in {root}")
    check_resumable(folders[-1])
    return folders[-1]


def check_resumable(path: Path) -> dict[str, Any]:
    """Check that `path` is a complete checkpoint whose files match its manifest; return the manifest. The error
    (`CheckpointError`) says what is wrong and names the newest valid checkpoint beside it, if any."""
    path = Path(path)
    if not path.is_dir():
        hint = " (a run's output folder: resume it with --resume auto)" if (path / CHECKPOINTS).is_dir() else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}")
    if not _STEP_DIR.match(path.name):
        if (path / CHECKPOINTS).is_dir():
            raise CheckpointError(f"{path} is a run's output folder, not a checkpoint: resume it with --resume auto")
        raise CheckpointError(f"{path} is not a checkpoint folder (step-XXXXXXXX)")
    try:
        if not (path / "manifest.json").is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no manifest.json)")
        return verify_manifest(path)
    except CheckpointError as problem:
        raise CheckpointError(f"{problem}: {_newest_valid_hint(path)}") from None


def _step_folders(output: Path) -> list[Path]:
    """Every `step-*` folder in step order, complete or not (`.tmp-*`/`.trash-*` are not checkpoints)."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _newest_valid_hint(broken: Path) -> str:
    """'the newest valid one is Y; resume from it with --resume Y', looking beside `broken`, newest first."""
    for candidate in reversed(_step_folders(broken.parent.parent)):
        if candidate == broken or not (candidate / "manifest.json").is_file():
            continue
        try:
            verify_manifest(candidate)
        except CheckpointError:
            continue
        return f"the newest valid one is {candidate}; resume from it with --resume {candidate}"
    return f"no other checkpoint in {broken.parent} is valid"


def verify_manifest(path: Path) -> dict[str, Any]:
    """Check every file's sha256 against the manifest; raise naming the first mismatch."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable manifest.json ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path}: manifest.json has no 'files' mapping")
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

    Under DeepSpeed (`engine`), the engine loads its own state when the world size is unchanged. On another rank
    count the engine's fp32 master weights come from `model.safetensors` and its optimizer state (momentum; both
    AdamW moments and the step count) from `optimizer.safetensors`, written into ZeRO's new partitions through
    DeepSpeed's tensor-fragment API: nothing is lost.
    """
    if verify:
        verify_manifest(path)
    state = read_trainer_state(path)
    same_world = state["world_size"] == world_size
    if engine is not None and (path / "deepspeed").is_dir() and same_world:
        engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_lr_scheduler_states=False)
    else:
        weights = load_file(str(path / "model.safetensors"))
        own = backbone.state_dict()
        backbone.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in weights.items()}, strict=True)
        if engine is not None:
            _set_engine_master_weights(backbone, weights)
            if (path / "optimizer.safetensors").is_file():
                _set_deepspeed_optimizer_state(engine, backbone, load_file(str(path / "optimizer.safetensors")))
                logger.info(
                    "checkpoint %s: DeepSpeed backbone state moved from %d to %d ranks (fp32 weights and optimizer "
                    "state re-partitioned)",
                    path,
                    state["world_size"],
                    world_size,
                )
            else:
                logger.warning(
                    "checkpoint %s has no optimizer.safetensors: the DeepSpeed backbone optimizer starts fresh", path
                )
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
            # head.update ("rows") is this run's recipe's: checkpoints are the same in every mode (row_sgd.py).
            ref[0].param_groups[ref[1]].update({k: v for k, v in saved.items() if k != "rows"})

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


def _zero_groups(engine: Any) -> list[tuple[list[nn.Parameter], torch.Tensor]]:
    """ZeRO-1/2's parameter groups: the module's parameters of each group and this rank's flat fp32 partition,
    which is what the engine's torch optimizer steps (and keys its state by). DeepSpeedZeroOptimizer is what
    ds_configs/ get; BF16_Optimizer is DeepSpeed's choice for ZeRO-1 with bf16 and fp32 gradient accumulation."""
    zero = engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return list(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=True))
    if hasattr(zero, "fp32_groups_flat_partition"):
        return list(zip(zero.bf16_groups, zero.fp32_groups_flat_partition, strict=True))
    raise CheckpointError(
        f"DeepSpeed optimizer {type(zero).__name__} is not ZeRO-1/2's: its optimizer state cannot be checkpointed "
        "rank-independently"
    )


def _deepspeed_optimizer_tensors(engine: Any, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Every backbone parameter's full fp32 optimizer state under ZeRO-1/2, "<param name>::<state key>" as for a
    plain optimizer: rank-independent. Collective (each tensor is assembled from all ranks' partitions with an
    all-reduce): every rank must call it, in the same order."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, names = engine.optimizer, {id(p): n for n, p in backbone.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for params, flat in _zero_groups(engine):
        state = zero.optimizer.state.get(flat, {})
        # Per-element state (momentum, moments) has the partition's shape, and is the same key set on every rank;
        # the rest (AdamW's step) is one value for the whole partition, the same on every rank. Before the first
        # step there is none, and DeepSpeed must not link its views yet (it links once, to the state it finds).
        keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        scalars = {k: torch.as_tensor(v).detach().to("cpu") for k, v in state.items() if k not in keys}
        if keys:
            zero._lazy_init_hp_params_optimizer_state()  # what DeepSpeed does after each step; a no-op then
        for param in params:
            for key in keys:
                full = safe_get_full_optimizer_state(param, key)
                out[f"{names[id(param)]}::{key}"] = full.detach().to("cpu", torch.float32).contiguous()
            for key, value in scalars.items():
                out[f"{names[id(param)]}::{key}"] = value.clone()
    return out


def _set_deepspeed_optimizer_state(engine: Any, backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write `_deepspeed_optimizer_tensors`' output (or a plain optimizer's `optimizer.safetensors`) into ZeRO's
    partitions of this rank count. The engine's torch optimizer creates its state lazily at the first step, so
    the state tensors are created here, then DeepSpeed links its per-parameter views into them and each rank copies
    its fragment of every parameter's full state (DeepSpeed's tensor-fragment API)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    zero, names = engine.optimizer, {id(p): n for n, p in backbone.named_parameters()}
    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, state_key = key.split("::", 1)
        by_name.setdefault(name, {})[state_key] = tensor
    groups = _zero_groups(engine)
    for params, flat in groups:
        saved = [by_name.get(names[id(p)], {}) for p in params]
        if not saved or not saved[0]:
            continue
        if any(s.keys() != saved[0].keys() for s in saved):
            raise CheckpointError("optimizer.safetensors: the backbone parameters do not all have the same state keys")
        state = zero.optimizer.state[flat]
        for key, value in saved[0].items():
            if value.dim() == 0:
                state[key] = value.clone()  # AdamW's step: a CPU scalar, as torch keeps it
            elif not (torch.is_tensor(state.get(key)) and state[key].shape == flat.shape):
                state[key] = torch.zeros_like(flat)
    zero._hp_optimizer_states_linked = False  # link DeepSpeed's per-parameter views to the tensors made above
    zero._lazy_init_hp_params_optimizer_state()
    for params, _ in groups:
        for param in params:
            for key, value in by_name.get(names[id(param)], {}).items():
                if value.dim() > 0:
                    safe_set_full_optimizer_state(param, value.to(param.device, torch.float32), key)


def _restore_group(ref: GroupRef, module: nn.Module | Head, tensors: dict[str, torch.Tensor]) -> None:
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
