"""The experiment configuration: one typed dataclass tree, loaded from a YAML recipe.

Three layers, each said once (STYLE.md): the *experiment* lives here (data, network, head, optimizer, schedule);
the launch topology and precision live in `accelerate_configs/*.yaml`; the engine lives in `ds_configs/*.json`.

    cfg = load_config("launch/recipes/default.yaml", ["--optim.lr", "0.05", "--train.batch_size=32"])

Every error is one line that names the offending key or path (`ConfigError`). Derived values (steps per epoch,
warm-up steps) are computed once, in `trainer.loop`, and logged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from data.faces import FacesConfig
from heads.config import HeadConfig
from models.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO_ROOT / "launch" / "recipes" / "default.yaml"


class ConfigError(InputError, ValueError):
    """A recipe or command-line override that cannot be used; the message names the key or path."""


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
    generated: FacesConfig = field(default_factory=FacesConfig)  # data.faces: the generator's own settings


@dataclass
class OptimConfig:
    """One optimizer over backbone and head (separate parameter groups)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # The backbone's learning rate is lr x backbone_lr_scale (e.g. 0.1 when fine-tuning a pretrained backbone).
    backbone_lr_scale: float = 1.0
    # torch's fused optimizer kernels (CPU and CUDA); the DeepSpeed engine's own optimizer is left unfused.
    fused: bool = True


@dataclass
class SpeedConfig:
    """Switches that change how fast a step runs, not what it computes (up to float rounding).

    All off by default: each helps on some hardware only, and each has its price (compile time, a layout
    conversion, compressed gradients). Figures and what they mean: docs/benchmarks.md, "Speed features (CPU)". The
    run logs the resolved choices at start (`speed: ...`). (`optim.fused` is the optimizer's own switch.)
    """

    # Backbone weights and input batches in NHWC memory layout: what cuDNN's fastest convolutions want on tensor-core
    # GPUs (a transpose per layer otherwise). The uint8 batches come from the dataset NHWC-strided already, so only
    # the normalization pass touches them. Refused under DeepSpeed (its engine needs contiguous parameters).
    channels_last: bool = False
    # torch.compile the backbone in place (`nn.Module.compile`): state_dict keys and checkpoints stay as they are.
    # The first step compiles (20-30 s for r_lite or r18 on the 2-core CPU of docs/benchmarks.md, longer for deeper
    # networks), and evaluation its own graph on first use. Under DDP dynamo splits the graph at DDP's buckets, so
    # the all-reduce still overlaps the backward. Works in one process, under DDP and under DeepSpeed ZeRO-1/2.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # DDP only (Accelerate's DistributedDataParallelKwargs). Under DeepSpeed or with one process there is no DDP:
    # non-default values are logged as ignored, not refused, so that one recipe runs on any launch topology.
    # Gradients are all-reduced in buckets of this many MiB, each launched as soon as its gradients are ready: small
    # buckets overlap more of the backward but pay a latency each; large ones the reverse.
    ddp_bucket_cap_mb: int = 25
    # Gradient compression before the all-reduce: `fp16`/`bf16` halve the bytes (rounding each gradient to 16 bits);
    # `power_sgd` sends a rank-`ddp_power_sgd_rank` approximation with error feedback. `bf16` needs the NCCL or XCCL
    # backend (refused at start on gloo, where torch refuses the hook).
    ddp_comm_hook: Literal["none", "fp16", "bf16", "power_sgd"] = "none"
    # `.grad` tensors are views into DDP's buckets: one gradient-sized copy less per step, and less peak memory. With
    # `compile`, torch warns "Grad strides do not match bucket view strides": inductor lays some gradients out
    # otherwise, and those are copied as without this option (correct, just not faster).
    ddp_gradient_as_bucket_view: bool = False
    # PowerSGD: rank of the approximation, and how many optimizer steps use the plain all-reduce before it compresses
    # (the PowerSGD paper's warm-up). Its error-feedback state is not checkpointed: a resumed run warms up again.
    ddp_power_sgd_rank: int = 1
    ddp_power_sgd_warmup_steps: int = 1000


@dataclass
class ScheduleConfig:
    """Linear warm-up, then polynomial decay to 0, stepped per optimizer step."""

    epochs: int = 20
    warmup_epochs: float = 0.0
    power: float = 2.0
    # > 0: stop after this many optimizer steps (the schedule is stretched over them instead of `epochs`).
    max_steps: int = 0


@dataclass
class TrainConfig:
    """The loop: batch, accumulation, clipping, logging and checkpoint cadence."""

    batch_size: int = 128  # per process, per micro-step
    # > 0: the batch over all processes and accumulation steps; batch_size is then derived and must divide evenly.
    global_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    clip_grad_norm: float = 5.0  # backbone gradients, as insightface; 0 = off
    seed: int = 2048
    log_every: int = 50
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    tensorboard: bool = False


@dataclass
class EvalConfig:
    """`.bin` verification during training (main process only)."""

    bins: list[str] = field(default_factory=list)  # paths; the generated dataset adds its own val.bin
    every: int = 2000  # optimizer steps; 0 = only at the end
    batch_size: int = 64


@dataclass
class ExperimentConfig:
    """The whole experiment. `output` receives config.yaml, train.log, checkpoints/ and model.safetensors."""

    output: str = "runs/default"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(
    recipe: str | Path | None = None, overrides: list[str] | None = None, check_files: bool = True
) -> ExperimentConfig:
    """Load a recipe, apply `--dotted.key value` overrides, build and validate the dataclass tree.

    `check_files=False` skips the checks that need the data on this machine (recipe tests, config inspection).
    """
    path = Path(recipe) if recipe is not None else DEFAULT_RECIPE
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    cfg = from_dict(ExperimentConfig, raw, source=str(path))
    validate(cfg, check_files=check_files)
    return cfg


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """`["--optim.lr", "0.05", "--train.seed=3"]` -> `[("optim.lr", 0.05), ("train.seed", 3)]` (YAML-typed)."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            key, text = arg[2:], argv[i + 1]
            i += 2
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known in this section: {known})")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", source)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section that validates itself (head, data.generated): "<field> must ..."
        raise ConfigError(f"{source}: {prefix}{exc}") from None


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} expects a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} expects true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: {key} expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def validate(cfg: ExperimentConfig, check_files: bool = True) -> None:
    """Checks that need more than one key, or the file system. Each error names the key.

    `eval.bins` entries that are not existing paths resolve against `data.root` (`lfw` -> `<root>/lfw.bin`),
    as insightface's `val_targets`.
    """
    from heads import list_heads
    from models import list_backbones

    if cfg.network.name not in list_backbones():
        raise ConfigError(f"network.name: unknown backbone {cfg.network.name!r} (known: {', '.join(list_backbones())})")
    if cfg.head.name not in list_heads():
        raise ConfigError(f"head.name: unknown head {cfg.head.name!r} (known: {', '.join(list_heads())})")
    positive = {
        "network.embedding_size": cfg.network.embedding_size,
        "optim.lr": cfg.optim.lr,
        "train.batch_size": cfg.train.batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.log_every": cfg.train.log_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "eval.batch_size": cfg.eval.batch_size,
        "speed.ddp_bucket_cap_mb": cfg.speed.ddp_bucket_cap_mb,
        "data.prefetch": cfg.data.prefetch,
        "speed.ddp_power_sgd_rank": cfg.speed.ddp_power_sgd_rank,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {
        "data.num_classes": cfg.data.num_classes,
        "data.num_workers": cfg.data.num_workers,
        "schedule.epochs": cfg.schedule.epochs,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
        "schedule.max_steps": cfg.schedule.max_steps,
        "train.clip_grad_norm": cfg.train.clip_grad_norm,
        "train.save_every": cfg.train.save_every,
        "train.global_batch_size": cfg.train.global_batch_size,
        "eval.every": cfg.eval.every,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.backbone_lr_scale": cfg.optim.backbone_lr_scale,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.schedule.epochs == 0 and cfg.schedule.max_steps == 0:
        raise ConfigError("schedule.epochs and schedule.max_steps are both 0: nothing to train")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if not 0.0 <= cfg.network.dropout < 1.0:
        raise ConfigError(f"network.dropout must be in [0, 1), got {cfg.network.dropout}")
    if cfg.speed.ddp_power_sgd_warmup_steps < 2:
        # torch's PowerSGDState: error feedback and warm start need two plain all-reduce steps first.
        raise ConfigError(
            f"speed.ddp_power_sgd_warmup_steps must be >= 2 (PowerSGD needs two plain all-reduce steps first), "
            f"got {cfg.speed.ddp_power_sgd_warmup_steps}"
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
    data = cfg.data
    if data.source == "synthetic" and (data.num_classes <= 0 or data.num_images <= 0):
        raise ConfigError("data.source 'synthetic' needs data.num_classes > 0 and data.num_images > 0")
    if not check_files:
        return
    if data.decode == "gpu" and data.source not in ("recordio", "generated"):
        raise ConfigError(f"data.decode 'gpu' reads RecordIO; data.source is {data.source!r}")
    if data.source == "image_folder":
        if not data.root or not Path(data.root).is_dir():
            raise ConfigError(f"data.root: image folder {data.root!r} does not exist")
    if data.source == "recordio":
        if not data.root:
            raise ConfigError("data.root is empty: data.source 'recordio' needs a folder with train.rec and train.idx")
        for name in ("train.rec", "train.idx"):
            if not (Path(data.root) / name).is_file():
                raise ConfigError(f"data.root: {Path(data.root) / name} does not exist")
    if cfg.network.init_weights and not Path(cfg.network.init_weights).is_file():
        raise ConfigError(f"network.init_weights: {cfg.network.init_weights} does not exist")
    for i, entry in enumerate(cfg.eval.bins):
        candidates = [Path(entry)]
        if data.root and not Path(entry).is_absolute():
            candidates += [Path(data.root) / entry, Path(data.root) / f"{entry}.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(f"eval.bins[{i}]: {entry!r} not found (looked at {', '.join(map(str, candidates))})")
        cfg.eval.bins[i] = str(found)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved tree as plain data (for config.yaml and checkpoint compatibility checks)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Keys whose change makes a checkpoint unusable: the shapes of what it stores, or the meaning of its classes.
STRUCTURAL_KEYS = (
    "network.name",
    "network.embedding_size",
    "head.name",
    "optim.name",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
