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

import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from heads.base import Head
from models.cli import file_mode
from models.run_folder import CHECKPOINTS, CheckpointError, CheckpointFolder, RunFolder

if TYPE_CHECKING:
    from trainer.state import Stateful

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "CheckpointError",
    "Checkpointer",
    "check_resumable",
    "find_resumable",
    "list_checkpoints",
    "load_checkpoint",
    "model_metadata",
    "remove_leftovers",
    "save_checkpoint",
    "save_model",
    "verify_manifest",
]

GLOBAL_PREFIX = "global::"  # a head's global state in its shard files
MODEL_METADATA_INPUT = "RGB 112x112, (x/255 - 0.5) / 0.5"


def _run(output: RunFolder | Path) -> RunFolder:
    return output if isinstance(output, RunFolder) else RunFolder(output)


def _folder(path: CheckpointFolder | Path) -> CheckpointFolder:
    return path if isinstance(path, CheckpointFolder) else CheckpointFolder(path)


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
    """Write the backbone's state dict as `model.safetensors` (inside a checkpoint folder being written: the
    folder's rename makes it appear; elsewhere use `models.cli.atomic_output`)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------------------------------------------
# Saving


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


def save_checkpoint(output: RunFolder | Path, **kwargs: Any) -> Path:
    """Write a checkpoint (`_write_checkpoint`); a write that fails (a full disk, a file-size limit, a folder in the
    way) leaves no partial folder and is a `CheckpointError` naming the checkpoint: the user's environment to fix.
    The previous checkpoints are untouched. In a multi-process run only the rank that failed raises."""
    step, run = kwargs["step"], _run(output)
    try:
        return _write_checkpoint(run, **kwargs)
    except (OSError, SafetensorError) as exc:
        if kwargs["rank"] == 0:
            shutil.rmtree(run.temporary_checkpoint(step).path, ignore_errors=True)
        reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else str(exc)
        raise CheckpointError(f"cannot write checkpoint {run.checkpoint(step).path}: {reason}") from None


def _write_checkpoint(
    run: RunFolder,
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
    extra: Mapping[str, tuple[nn.Module, GroupRef | None]] | None = None,
) -> Path:
    """Write a checkpoint from every rank (collective: all ranks must call it at the same step).

    `backbone_group`/`head_group` say where each part's parameters sit in their optimizer; under DeepSpeed pass
    `engine` (and no backbone group): it writes its own state into `deepspeed/` and `model.safetensors` gets the
    fp32 master weights. `trainer_state` is JSON-able (the main process's copy is written). `extra`: modules trained
    beside backbone and head, identical on every rank (distillation's projection), each written by the main process
    as `<name>.safetensors` with its optimizer state.
    """
    folder, final = run.temporary_checkpoint(step), run.checkpoint(step).path
    tmp = folder.path
    if rank == 0:
        remove_leftovers(run)  # this step's .tmp, or what any earlier save or delete left when it was killed
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
    save_file(head_tensors, str(folder.head_shard(rank, world_size)), metadata={k: str(v) for k, v in shard.items()})
    rng, rng_meta = _rng_tensors()
    save_file(rng, str(folder.rng(rank)), metadata=rng_meta)

    engine_optimizer: dict[str, torch.Tensor] = {}
    if engine is not None:
        engine.save_checkpoint(str(folder.deepspeed), tag="state")  # collective; writes per-rank files
        engine_optimizer = _deepspeed_optimizer_tensors(engine, backbone)  # collective too
        barrier()
    if rank == 0:
        if engine is not None:
            save_model(folder.model, _deepspeed_fp32_weights(folder.deepspeed, backbone), metadata)
        else:
            save_model(folder.model, backbone, metadata)
        if backbone_group is not None:
            backbone_names = {id(p): n for n, p in backbone.named_parameters()}
            save_file(_state_tensors(backbone_group, backbone_names), str(folder.optimizer))
        elif engine is not None:
            save_file(engine_optimizer, str(folder.optimizer))
        groups = {
            part: _hyperparameters(ref) for part, ref in (("backbone", backbone_group), ("head", head_group)) if ref
        }
        for name, (module, ref) in (extra or {}).items():
            tensors = {n: t.detach().to("cpu").contiguous() for n, t in module.state_dict().items()}
            if ref is not None:
                tensors.update(_state_tensors(ref, {id(p): n for n, p in module.named_parameters()}))
            save_file(tensors, str(folder.module(name)))
        write_trainer_state(folder, dict(trainer_state, optimizer_param_groups=groups, world_size=world_size))
    barrier()  # every shard is on disk before the manifest seals the folder

    if rank == 0:
        seal(folder, step, world_size)
        if final.exists():  # the same step saved again (e.g. a resumed run): the new one replaces it
            _delete(run, final)
        os.rename(tmp, final)
        _prune(run, keep)
    barrier()
    return final


def write_trainer_state(folder: CheckpointFolder, state: Mapping[str, Any]) -> None:
    folder.trainer_state.write_text(json.dumps(state, indent=2, default=_json_default))


def seal(folder: CheckpointFolder, step: int, world_size: int) -> None:
    """Give every file the mode of a plainly written one (safetensors writes 0600), then write the manifest."""
    mode = file_mode()
    for file in folder.path.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)
    folder.write_manifest(step, world_size)


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


def _prune(run: RunFolder, keep: int) -> None:
    for old in run.complete_checkpoints()[:-keep]:
        _delete(run, old.path)


def _delete(run: RunFolder, checkpoint: Path) -> None:
    """Remove a checkpoint folder so that a kill at any moment leaves either the whole checkpoint or none of it
    under its name: one atomic rename out of the `step-*` namespace, then the slow part."""
    trash = run.trash_name(checkpoint)
    os.rename(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(output: RunFolder | Path) -> list[Path]:
    """Delete what an interrupted save (`.tmp-step-*`) or delete (`.trash-step-*`) left in `<output>/checkpoints`;
    return what was removed. Main process only, while no save is running (each save calls it; so should a run at
    start, once it holds the output folder)."""
    run = _run(output)
    found = run.leftovers()
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    if found:
        logger.info("removed %d leftover folder(s) of interrupted saves or deletes in %s", len(found), run.checkpoints)
    return found


# --------------------------------------------------------------------------------------------------------------
# Loading


def list_checkpoints(output: RunFolder | Path) -> list[Path]:
    """Complete checkpoints (with a manifest) in step order; temporary folders are ignored."""
    return [c.path for c in _run(output).complete_checkpoints()]


def find_resumable(output: RunFolder | Path) -> Path:
    """The newest checkpoint in `<output>/checkpoints`, checked complete and verified against its manifest (the
    caller need not hash it again). Raises `CheckpointError` when there is none, and when the newest is incomplete
    or corrupt: an older checkpoint is never taken silently; the message names the newest valid one and the
    `--resume <path>` that resumes from it."""
    run = _run(output)
    folders = run.step_folders()
    if not folders:
        raise CheckpointError(f"no checkpoint to resume from in {run.checkpoints}")
    check_resumable(folders[-1].path)
    return folders[-1].path


def check_resumable(path: CheckpointFolder | Path) -> dict[str, Any]:
    """Check that `path` is a complete checkpoint whose files match its manifest; return the manifest. The error
    (`CheckpointError`) says what is wrong and names the newest valid checkpoint beside it, if any."""
    folder = _folder(path)
    path = folder.path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if folder.step is None:
        if RunFolder(path).checkpoints.is_dir():
            complete = RunFolder(path).complete_checkpoints()
            hint = f"give one of its checkpoints, e.g. --resume {complete[-1].path}" if complete else "it holds none"
            raise CheckpointError(f"{path} is a run's output folder, not a checkpoint folder: {hint}")
        raise CheckpointError(f"{path} is not a checkpoint folder (step-XXXXXXXX)")
    try:
        if not folder.is_complete():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {folder.MANIFEST})")
        return folder.verify()
    except CheckpointError as problem:
        raise CheckpointError(f"{problem}: {_newest_valid_hint(folder)}") from None


def _newest_valid_hint(broken: CheckpointFolder) -> str:
    """'the newest valid one is Y; resume from it with --resume Y', looking beside `broken`, newest first."""
    for candidate in reversed(RunFolder(broken.path.parent.parent).step_folders()):
        if candidate.path == broken.path or not candidate.is_complete():
            continue
        try:
            candidate.verify()
        except CheckpointError:
            continue
        return f"the newest valid one is {candidate.path}; resume from it with --resume {candidate.path}"
    return f"no other checkpoint in {broken.path.parent} is valid"


def verify_manifest(path: CheckpointFolder | Path) -> dict[str, Any]:
    """Check every file's sha256 against the manifest; raise naming the first mismatch."""
    return _folder(path).verify()


def read_trainer_state(path: CheckpointFolder | Path) -> dict[str, Any]:
    folder = _folder(path)
    try:
        state = json.loads(folder.trainer_state.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {folder.path}: unreadable {folder.TRAINER_STATE} ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {folder.path}: {folder.TRAINER_STATE} is not a mapping")
    return state


def load_checkpoint(
    path: CheckpointFolder | Path,
    *,
    rank: int,
    world_size: int,
    backbone: nn.Module,
    head: Head,
    backbone_group: GroupRef | None,
    head_group: GroupRef,
    engine: Any = None,
    verify: bool = True,
    extra: Mapping[str, tuple[nn.Module, GroupRef | None]] | None = None,
) -> dict[str, Any]:
    """Restore backbone, head rows of this rank's class range, optimizer state and RNG; return trainer_state.

    `verify=False` skips the checksums when the caller has just verified them (hashing large files twice).

    Under DeepSpeed (`engine`), the engine loads its own state when the world size is unchanged. On another rank
    count the engine's fp32 master weights come from `model.safetensors` and its optimizer state (momentum; both
    AdamW moments and the step count) from `optimizer.safetensors`, written into ZeRO's new partitions through
    DeepSpeed's tensor-fragment API: nothing is lost.
    """
    folder = _folder(path)
    path = folder.path
    if verify:
        folder.verify()
    state = read_trainer_state(folder)
    same_world = state["world_size"] == world_size
    if engine is not None and folder.deepspeed.is_dir() and same_world:
        engine.load_checkpoint(str(folder.deepspeed), tag="state", load_lr_scheduler_states=False)
    else:
        weights = load_file(str(folder.model))
        own = backbone.state_dict()
        backbone.load_state_dict({k: v.to(own[k].device, own[k].dtype) for k, v in weights.items()}, strict=True)
        if engine is not None:
            _set_engine_master_weights(backbone, weights)
            if folder.optimizer.is_file():
                _set_deepspeed_optimizer_state(engine, backbone, load_file(str(folder.optimizer)))
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
        if backbone_group is not None and folder.optimizer.is_file():
            _restore_group(backbone_group, backbone, load_file(str(folder.optimizer)))
    head_tensors = _load_head_rows(folder, head)
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

    for name, (module, ref) in (extra or {}).items():
        file = folder.module(name)
        if not file.is_file():
            logger.warning("checkpoint %s has no %s: %s starts as initialized", path, file.name, name)
            continue
        tensors = load_file(str(file))
        own = module.state_dict()
        module.load_state_dict({k: tensors.pop(k).to(v.device, v.dtype) for k, v in own.items()}, strict=True)
        if ref is not None:
            _restore_group(ref, module, tensors)

    rng_file = folder.rng(rank)
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


def _load_head_rows(folder: CheckpointFolder, head: Head) -> dict[str, torch.Tensor]:
    """Assemble this rank's rows [class_start, class_start + num_local) from every overlapping shard."""
    path = folder.path
    info = head.shard_info()
    start, stop = int(info["class_start"]), int(info["class_start"]) + int(info["num_local"])
    shards = folder.head_shards()
    if not shards:
        raise CheckpointError(f"checkpoint {path}: no head-rank*.safetensors shard")
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    scalars: dict[str, torch.Tensor] = {}
    covered = 0
    shapes = {name: list(tensor.shape[1:]) for name, tensor in head.row_tensors().items()}
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
                else:
                    row_shape = list(sl.get_shape()[1:])
                    if key in shapes and row_shape != shapes[key]:
                        raise CheckpointError(
                            f"cannot resume from {path}: its head's {key!r} has rows of shape {row_shape}, this run's "
                            f"head ({type(head).__name__}) has {shapes[key]}: a head setting that shapes the centers "
                            "differs from the one the checkpoint was made with"
                        )
                    if lo < hi:
                        rows.setdefault(key, []).append((lo, sl[lo - s_start : hi - s_start]))
            if lo < hi:
                covered += hi - lo
    if covered != stop - start:
        raise CheckpointError(f"checkpoint {path}: head shards cover {covered} of the {stop - start} classes needed")
    out = {key: torch.cat([t for _, t in sorted(parts, key=lambda x: x[0])]) for key, parts in rows.items()}
    out.update(scalars)
    return out


# --------------------------------------------------------------------------------------------------------------
# The checkpointer: the run's parts, saved, loaded and rolled back together


def compose_state(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """`trainer_state.json`'s entries from every part (each owns its top-level entries: trainer.state)."""
    state: dict[str, Any] = {}
    for name, part in parts.items():
        entries = part.state_dict()
        clash = set(entries) & set(state)
        if clash:  # a programming error: two parts claiming one entry
            raise ValueError(f"part {name!r} writes entries {sorted(clash)} that another part already wrote")
        state.update(entries)
    return state


class Checkpointer:
    """Saves, loads and rolls back the whole run: the tensors (backbone, head shards, optimizer state, RNG, a
    DeepSpeed engine's own files) and every stateful part's entries of `trainer_state.json`, in one checkpoint
    folder of `folder` (`models.run_folder`: layout, atomic rename, manifest).

    `parts` are loaded in their order (trainer.state: the step before the sampler position that follows from it;
    a part that is None is not in this run);
    a rollback loads every part but those named in `keep` (the guard's account of the rollback itself is newer than
    the checkpoint). Collective: every rank calls `save` and `load` at the same step.
    """

    def __init__(
        self,
        folder: RunFolder,
        *,
        rank: int,
        world_size: int,
        barrier: Callable[[], None],
        backbone: Callable[[], nn.Module],
        head: Head,
        stepper: Any,
        parts: Mapping[str, Stateful | None],
        metadata: dict[str, str],
        keep: int,
        extra: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.folder, self.rank, self.world_size, self.barrier = folder, rank, world_size, barrier
        self.backbone, self.head, self.stepper = backbone, head, stepper
        self.parts = {name: part for name, part in parts.items() if part is not None}  # None: not in this run
        self.metadata, self.keep = metadata, keep
        # Modules trained beside backbone and head (distillation's projection), with the stepper's group for them.
        self.extra = {name: (module, stepper.extra_group) for name, module in (extra or {}).items()}

    def state_dict(self) -> dict[str, Any]:
        return compose_state(self.parts)

    def save(self, step: int) -> Path:
        """Write step `step`'s checkpoint (every rank; the main process writes the shared files)."""
        from trainer.guard import DivergenceError, all_finite

        backbone = self.backbone()
        self.stepper.sync_head_rows()  # head.update lazy: the checkpoint holds every center as dense would have it
        if not (all_finite(backbone) and all_finite(self.head)):  # the guard's promise: never a NaN checkpoint
            raise DivergenceError(f"step {step}: the model has non-finite weights; not saving a checkpoint")
        path = save_checkpoint(
            self.folder,
            step=step,
            rank=self.rank,
            world_size=self.world_size,
            barrier=self.barrier,
            backbone=backbone,
            head=self.head,
            backbone_group=self.stepper.backbone_group,
            head_group=self.stepper.head_group,
            engine=self.stepper.engine,
            trainer_state=self.state_dict(),
            metadata=self.metadata,
            keep=self.keep,
            extra=self.extra,
        )
        logger.info("saved checkpoint %s", path)
        return path

    def load(self, path: Path, keep: tuple[str, ...] = (), verify: bool = False) -> dict[str, Any]:
        """Continue from the checkpoint folder `path`: the parts' entries first (their checks refuse a checkpoint
        of another run shape before any tensor moves), then the tensors. `verify=False`: the caller has checked it
        against its manifest already (`check_resumable`; hashing a large checkpoint twice costs minutes)."""
        folder = CheckpointFolder(path)
        if verify:
            check_resumable(folder)
        saved = read_trainer_state(folder)
        try:
            for name, part in self.parts.items():
                if name not in keep:
                    part.load_state_dict(saved)
        except CheckpointError as problem:
            raise CheckpointError(f"cannot resume from {folder.path}: {problem}") from None
        load_checkpoint(
            folder,
            rank=self.rank,
            world_size=self.world_size,
            backbone=self.backbone(),
            head=self.head,
            backbone_group=self.stepper.backbone_group,
            head_group=self.stepper.head_group,
            engine=self.stepper.engine,
            verify=False,
            extra=self.extra,
        )
        self.stepper.head_rows_loaded()
        return saved
