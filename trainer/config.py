"""The experiment configuration: one typed dataclass tree, loaded from a YAML recipe.

Three layers, each said once (STYLE.md): the *experiment* lives here (data, network, head, optimizer, schedule);
the launch topology and precision live in `accelerate_configs/*.yaml`; the engine lives in `ds_configs/*.json`.

    cfg = load_config("launch/recipes/default.yaml", ["--optim.lr", "0.05", "--train.batch_size=32"])

Every error is one line that names the offending key or path (`ConfigError`). Derived values (steps per epoch,
warm-up steps) are computed once, in `trainer.loop`, and logged.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from data.config import DataConfig
from heads.config import HeadConfig
from models.config import NetworkConfig
from models.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO_ROOT / "launch" / "recipes" / "default.yaml"


class ConfigError(InputError, ValueError):
    """A recipe or command-line override that cannot be used; the message names the key or path."""


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
    """The learning rate per optimizer step (`trainer.optim.lr_factor`): linear warm-up from 0 over `warmup_epochs`,
    then `name`:

    * `polynomial`: (1 - progress) ** power down to 0 at the last step; power 1 (linear) is insightface HEAD's
      PolynomialLRWarmup;
    * `step`: times decay_factor at each of `decay_epochs` (epochs completed, e.g. [10, 16, 22]: the seed's model
      zoo); the warm-up still applies;
    * `cosine`: 0.5 * (1 + cos(pi * progress)) down to 0.
    """

    name: Literal["polynomial", "step", "cosine"] = "polynomial"
    epochs: int = 20
    warmup_epochs: float = 0.0
    power: float = 1.0  # polynomial only
    decay_epochs: list[float] = field(default_factory=list)  # step only, increasing
    decay_factor: float = 0.1  # step only
    # > 0: stop after this many optimizer steps (the schedule is stretched over them instead of `epochs`).
    max_steps: int = 0

    def __post_init__(self) -> None:
        if not self.power > 0:
            raise ValueError(f"power must be > 0, got {self.power}")
        if not 0.0 < self.decay_factor <= 1.0:
            raise ValueError(f"decay_factor must be in (0, 1], got {self.decay_factor}")
        if any(epoch <= 0 for epoch in self.decay_epochs) or self.decay_epochs != sorted(set(self.decay_epochs)):
            raise ValueError(f"decay_epochs must be increasing positive epochs, got {self.decay_epochs}")
        if self.name == "step" and not self.decay_epochs:
            raise ValueError("decay_epochs is empty: schedule 'step' needs the epochs at which the lr decays")


# Accelerate's tracker names (accelerate.utils.LoggerType, less "all": a recipe names what it logs to).
TrackerName = Literal["tensorboard", "wandb", "trackio", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab"]


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
    # Also a checkpoint once this many minutes passed since the last one (preemptible machines); 0 = off.
    save_every_minutes: float = 0.0
    keep_checkpoints: int = 2
    # Divergence guard (trainer/guard.py): a step with a non-finite loss or gradient norm moves nothing and is
    # logged; this many in a row end the run (exit code 3, the newest checkpoint is the last good one) or, with
    # on_divergence: rollback, reload the newest checkpoint, multiply the lr by rollback_lr_factor and go on (at
    # most max_rollbacks times, then stop).
    max_bad_steps: int = 5
    on_divergence: Literal["stop", "rollback"] = "stop"
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # Experiment trackers through Accelerate (trainer/trackers.py), e.g. [tensorboard, wandb]; each needs its package.
    # Replaces `tensorboard: true` (a recipe with the old key is refused as an unknown key, naming this one).
    trackers: list[TrackerName] = field(default_factory=list)


@dataclass
class EvalConfig:
    """`.bin` verification during training (main process only)."""

    bins: list[str] = field(default_factory=list)  # paths; the generated dataset adds its own val.bin
    # Optimizer steps between evaluations, or "epoch" (at the end of every epoch); 0 = only at the end of the run.
    every: int | Literal["epoch"] = 2000
    batch_size: int = 64


@dataclass
class ExperimentConfig:
    """The whole experiment. `output` receives config.yaml, train.log, checkpoints/ and model.safetensors."""

    output: str = "runs/default"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    head: HeadConfig = field(default_factory=lambda: HeadConfig.resolve_section()())
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------------------
# Loading


class RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose floats include the forms everyone types: `1e-3`, `5e-4`, `1e12`, `1.0e12`.

    PyYAML implements YAML 1.1, whose float needs a dot in the mantissa and a sign in the exponent, so those four
    are strings there (and a recipe saying `lr: 1e-3` would be refused as "expects a number"). This resolver also
    accepts YAML 1.2's forms; integers stay integers (`3`, `0x10`, `1_000`), and `.inf`, `.nan`, `1.5` and
    YAML 1.1's base-60 floats read as before.
    """


_FLOAT = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# Copy the inherited table before changing it: PyYAML's add_implicit_resolver appends to lists shared with
# SafeLoader, which would change every other YAML reader in the process.
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse recipe text (or one command-line value) with :class:`RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def load_config(
    recipe: str | Path | None = None, overrides: list[str] | None = None, check_files: bool = True
) -> ExperimentConfig:
    """Load a recipe, apply `--dotted.key value` overrides, build and validate the dataclass tree.

    An error in a value (or key) that came from the command line names the override (`--optim.lrr: unknown
    key ...`), one that came from the recipe names the file. `check_files=False` skips the checks that need the
    data on this machine (recipe tests, config inspection).
    """
    path = Path(recipe) if recipe is not None else DEFAULT_RECIPE
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    from_command_line: set[str] = set()
    for key, value in parse_overrides(overrides or []):
        from_command_line.update(_set_dotted(raw, key, value))
    cfg = from_dict(ExperimentConfig, raw, source=str(path), overridden=frozenset(from_command_line))
    validate(cfg, check_files=check_files)
    return cfg


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """`["--optim.lr", "1e-3", "--train.seed=3"]` -> `[("optim.lr", 0.001), ("train.seed", 3)]` (YAML-typed,
    with :class:`RecipeLoader`'s floats)."""
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
            value = load_yaml(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key, value))
    return pairs


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> list[str]:
    """Set `raw[a][b][c] = value` for key "a.b.c"; return the dotted keys this created or replaced (the leaf, and
    any section the recipe did not have), so that errors in them are blamed on the command line."""
    node = raw
    parts = key.split(".")
    created = [key]
    for depth, part in enumerate(parts[:-1]):
        if part not in node:
            created.append(".".join(parts[: depth + 1]))
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value
    return created


def _where(source: str, key: str, overridden: frozenset[str]) -> str:
    """`--key` when `key` (or the list or section holding it) was set on the command line, else `<file>: key`."""
    if any(key == o or key.startswith((f"{o}.", f"{o}[")) for o in overridden):
        return f"--{key}"
    return f"{source}: {key}"


def from_dict(
    cls: type, raw: dict[str, Any], source: str, prefix: str = "", overridden: frozenset[str] = frozenset()
) -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type. Errors name `source` (the recipe file),
    or the `--key` for the dotted keys in `overridden` (set on the command line)."""
    if not isinstance(raw, dict):
        where = _where(source, prefix.rstrip(".") or "<root>", overridden)
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            where = _where(source, f"{prefix}{key}", overridden)
            where = where if where.startswith("--") else source  # "<file>: unknown key 'a.b'", not "a.b" twice
            raise ConfigError(f"{where}: unknown key '{prefix}{key}' (known in this section: {known})")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", source, overridden)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section that validates itself (head, data.generated): "<field> must ..."
        raise ConfigError(f"{source}: {prefix}{exc}") from None


def section_class(tp: type) -> type:
    """The dataclass a section is parsed into: `tp`, or what its `resolve_section()` returns (a section whose keys
    depend on what is registered, `models.recipe`)."""
    resolve = getattr(tp, "resolve_section", None)
    return resolve() if resolve is not None else tp


def _coerce(tp: Any, value: Any, key: str, source: str, overridden: frozenset[str] = frozenset()) -> Any:
    origin = get_origin(tp)
    where = _where(source, key, overridden)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(section_class(tp), value, source, prefix=f"{key}.", overridden=overridden)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        for alternative in inner[:-1]:  # the first alternative that takes the value (e.g. eval.every: int | "epoch")
            try:
                return _coerce(alternative, value, key, source, overridden)
            except ConfigError:
                pass
        return _coerce(inner[-1], value, key, source, overridden)
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", source, overridden) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} expects true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - a bug in this file


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
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "train.rollback_lr_factor": cfg.train.rollback_lr_factor,
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
        "train.save_every_minutes": cfg.train.save_every_minutes,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.max_rollbacks": cfg.train.max_rollbacks,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.backbone_lr_scale": cfg.optim.backbone_lr_scale,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if isinstance(cfg.eval.every, int) and cfg.eval.every < 0:
        raise ConfigError(f"eval.every must be >= 0 or 'epoch', got {cfg.eval.every}")
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
    if cfg.optim.name == "adamw" and cfg.head.update != "dense":
        # AdamW's step divides by the running second moment: not linear in its state, so no closed-form catch-up
        # (lazy), and Partial FC v1's frozen rows (sparse) would be a different optimizer than the one configured.
        raise ConfigError(
            f"head.update: {cfg.head.update} needs optim.name: sgd; with adamw only head.update: dense is exact "
            "(set it in the recipe's head section)"
        )
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
