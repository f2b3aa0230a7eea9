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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from data.config import DataConfig
from heads.config import HeadConfig
from models.config import NetworkConfig
from models.errors import InputError
from models.recipe import is_structural, key

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO_ROOT / "launch" / "recipes" / "default.yaml"


class ConfigError(InputError, ValueError):
    """A recipe or command-line override that cannot be used; the message names the key or path."""


@dataclass
class OptimConfig:
    """One optimizer over backbone and head (separate parameter groups)."""

    name: Literal["sgd", "adamw"] = key("sgd", help="the optimizer of backbone and head: sgd (with momentum) or adamw")
    lr: float = key(0.1, help="the peak learning rate, after the warm-up (the backbone's is lr x backbone_lr_scale)")
    momentum: float = key(0.9, help="sgd: momentum")
    weight_decay: float = key(5e-4, help="weight decay of backbone and head (adamw: decoupled, as torch's AdamW)")
    betas: list[float] = key(factory=lambda: [0.9, 0.999], help="adamw: (beta1, beta2), the moments' decay rates")
    eps: float = key(1e-8, help="adamw: added to the second moment's square root")
    backbone_lr_scale: float = key(
        1.0, help="the backbone's lr is lr x this (e.g. 0.1 when fine-tuning a pretrained backbone)"
    )
    fused: bool = key(
        True, help="torch's fused optimizer kernels (CPU and CUDA); the DeepSpeed engine's own optimizer stays unfused"
    )


@dataclass
class SpeedConfig:
    """Switches that change how fast a step runs, not what it computes (up to float rounding).

    All off by default: each helps on some hardware only, and each has its price (compile time, a layout
    conversion, compressed gradients). Figures and what they mean: docs/benchmarks.md, "Speed features (CPU)". The
    run logs the resolved choices at start (`speed: ...`). (`optim.fused` is the optimizer's own switch.)
    """

    # What cuDNN's fastest convolutions want on tensor-core GPUs (a transpose per layer otherwise). The uint8 batches
    # come from the dataset NHWC-strided already, so only the normalization pass touches them.
    channels_last: bool = key(
        False,
        help="backbone weights and input batches in NHWC memory layout (tensor-core GPUs); refused under DeepSpeed "
        "(its engine needs contiguous parameters)",
    )
    # `nn.Module.compile`: state_dict keys and checkpoints stay as they are. The first step compiles (20-30 s for
    # r_lite or r18 on the 2-core CPU of docs/benchmarks.md, longer for deeper networks), and evaluation its own graph
    # on first use. Under DDP dynamo splits the graph at DDP's buckets, so the all-reduce still overlaps the backward.
    compile: bool = key(
        False,
        help="torch.compile the backbone in place (one process, DDP, DeepSpeed ZeRO-1/2); the first step compiles",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = key(
        "default", help="torch.compile's mode (with compile: true)"
    )
    # The ddp_* keys reach Accelerate's DistributedDataParallelKwargs only. Under DeepSpeed or with one process there is
    # no DDP: non-default values are logged as ignored, not refused, so that one recipe runs on any launch topology.
    ddp_bucket_cap_mb: int = key(
        25,
        help="DDP: gradients are all-reduced in buckets of this many MiB, each as soon as it is ready (small buckets "
        "overlap more of the backward, each pays a latency)",
    )
    # `fp16`/`bf16` round each gradient to 16 bits; `bf16` needs the NCCL or XCCL backend (refused at start on gloo,
    # where torch refuses the hook). `power_sgd` sends a rank-`ddp_power_sgd_rank` approximation with error feedback.
    ddp_comm_hook: Literal["none", "fp16", "bf16", "power_sgd"] = key(
        "none",
        help="DDP: gradient compression before the all-reduce: fp16, bf16 (half the bytes) or power_sgd (low rank)",
    )
    # With `compile`, torch warns "Grad strides do not match bucket view strides": inductor lays some gradients out
    # otherwise, and those are copied as without this option (correct, just not faster).
    ddp_gradient_as_bucket_view: bool = key(
        False, help="DDP: .grad tensors are views into DDP's buckets (a gradient-sized copy less per step, less memory)"
    )
    # Its error-feedback state is not checkpointed: a resumed run warms up again.
    ddp_power_sgd_rank: int = key(1, help="DDP power_sgd: rank of the gradients' approximation")
    ddp_power_sgd_warmup_steps: int = key(
        1000, help="DDP power_sgd: optimizer steps with the plain all-reduce before it compresses (>= 2)"
    )


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

    name: Literal["polynomial", "step", "cosine"] = key(
        "polynomial",
        help="the lr after the warm-up: polynomial ((1 - progress) ** power, to 0), step (x decay_factor at each of "
        "decay_epochs) or cosine (to 0)",
    )
    epochs: int = key(20, help="epochs to train")
    warmup_epochs: float = key(0.0, help="linear warm-up from 0 over this many epochs (a fraction is fine)")
    power: float = key(1.0, help="polynomial: the exponent (1 = linear, insightface's PolynomialLRWarmup)")
    decay_epochs: list[float] = key(
        factory=list, help="step: increasing epochs (completed) at which the lr is multiplied by decay_factor"
    )
    decay_factor: float = key(0.1, help="step: the lr's factor at each of decay_epochs, in (0, 1]")
    max_steps: int = key(
        0, help="> 0: stop after this many optimizer steps, the schedule stretched over them instead of epochs"
    )

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

    batch_size: int = key(128, help="samples per process and micro-step")
    global_batch_size: int = key(
        0,
        help="> 0: the batch over all processes and accumulation steps (batch_size is then derived and must divide "
        "evenly); 0 = batch_size x processes x accumulation",
    )
    gradient_accumulation_steps: int = key(1, help="micro-steps per optimizer step")
    clip_grad_norm: float = key(5.0, help="the backbone's gradient norm is clipped to this, as insightface; 0 = off")
    seed: int = key(2048, help="seed of initialisation, sampling and augmentation")
    log_every: int = key(50, help="optimizer steps between log lines and tracker points")
    save_every: int = key(0, help="optimizer steps between checkpoints; 0 = only at the end")
    save_every_minutes: float = key(
        0.0, help="also a checkpoint once this many minutes passed since the last one (preemptible machines); 0 = off"
    )
    keep_checkpoints: int = key(2, help="how many of the newest checkpoints are kept")
    # Divergence guard (trainer/guard.py): a step with a non-finite loss or gradient norm moves nothing and is
    # logged; max_bad_steps in a row end the run (exit code 3, the newest checkpoint is the last good one) or, with
    # on_divergence: rollback, reload the newest checkpoint, multiply the lr by rollback_lr_factor and go on (at
    # most max_rollbacks times, then stop).
    max_bad_steps: int = key(5, help="divergence guard: this many non-finite steps in a row end the run or roll back")
    on_divergence: Literal["stop", "rollback"] = key(
        "stop",
        help="after max_bad_steps: stop (exit code 3) or rollback (reload the newest checkpoint, lower the lr, go on)",
    )
    rollback_lr_factor: float = key(0.5, help="rollback: the lr is multiplied by this at each rollback, in (0, 1]")
    max_rollbacks: int = key(3, help="rollback: at most this many rollbacks, then stop")
    # Replaces `tensorboard: true` (a recipe with the old key is refused as an unknown key, naming this one).
    trackers: list[TrackerName] = key(
        factory=list, help="experiment trackers through Accelerate, e.g. [tensorboard, wandb]; each needs its package"
    )


@dataclass
class EvalConfig:
    """`.bin` verification during training (main process only)."""

    bins: list[str] = key(
        factory=list,
        help="verification .bin files: paths, or names under data.root (lfw: <root>/lfw.bin); source generated "
        "adds its own val.bin",
    )
    every: int | Literal["epoch"] = key(
        2000, help="optimizer steps between evaluations, or epoch (at each epoch's end); 0 = only at the end of the run"
    )
    batch_size: int = key(64, help="images per forward pass of the evaluation")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (`trainer.distill`, docs/distill.md). Off while `teacher` is
    empty. The loss is head_weight x the margin head's plus weight x an embedding loss between the L2-normalized
    student (projected to the teacher's size when they differ) and teacher embeddings, plus relation_weight x the
    mean squared difference of the global batch's cosine-similarity matrices."""

    teacher: str = key(
        "",
        help="the teacher: a run folder, a checkpoint folder or a model.safetensors of this project, an insightface "
        "backbone .pth (with teacher_network), or an .onnx model; '' = no distillation",
    )
    teacher_network: str = key("", help="an insightface .pth teacher: its network name (e.g. r100)")
    teacher_precision: Literal["fp32", "bf16", "fp16"] = key(
        "fp32", help="the teacher's own autocast precision (a torch teacher; fp16 needs a GPU)"
    )
    teacher_channels: Literal["rgb", "bgr"] = key(
        "rgb", help="the channel order the teacher was trained on (insightface's released ONNX models: bgr)"
    )
    head_weight: float = key(1.0, help="weight of the margin head's loss")
    weight: float = key(1.0, help="weight of the embedding loss")
    loss: Literal["cosine", "l2"] = key(
        "cosine", help="embedding loss on L2-normalized embeddings: cosine (1 - cos) or l2 (squared distance)"
    )
    relation_weight: float = key(
        0.0, help="weight of the relation term: the batch's student similarity matrix against the teacher's"
    )
    cache: bool = key(
        False,
        help="write the teacher's embeddings (both flips, by record index) during the first epoch and read them "
        "afterwards instead of running the teacher",
    )
    cache_dir: str = key("", help="where the cache lives ('' = <output>/teacher_cache)")


@dataclass
class ExperimentConfig:
    """The whole experiment: a recipe's top level."""

    output: str = key(
        "runs/default", help="the run's folder: config.yaml, train.log, checkpoints/, model.safetensors, curves.png"
    )
    network: NetworkConfig = key(factory=NetworkConfig, help="the backbone (models/config.py)")
    head: HeadConfig = key(
        factory=lambda: HeadConfig.resolve_section()(),
        help="the head: which one, its margin, Partial FC's sampling (heads/config.py)",
    )
    data: DataConfig = key(factory=DataConfig, help="the training images and their loader (data/config.py)")
    optim: OptimConfig = key(factory=OptimConfig, help="the optimizer")
    speed: SpeedConfig = key(
        factory=SpeedConfig, help="how fast a step runs, not what it computes; all off (docs/benchmarks.md)"
    )
    schedule: ScheduleConfig = key(factory=ScheduleConfig, help="the learning rate per optimizer step")
    train: TrainConfig = key(factory=TrainConfig, help="the loop: batch, clipping, logging, checkpoints, divergence")
    eval: EvalConfig = key(factory=EvalConfig, help="verification on .bin files during training (main process)")
    distill: DistillConfig = key(
        factory=DistillConfig, help="knowledge distillation from a frozen teacher (trainer/distill.py); off by default"
    )


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
    given: set[str] = set()  # the keys as given: a section an override created holds defaults too, from neither
    for dotted, value in parse_overrides(overrides or []):
        from_command_line.update(_set_dotted(raw, dotted, value))
        given.add(dotted)
    cfg = from_dict(ExperimentConfig, raw, source=str(path), overridden=frozenset(from_command_line))
    validate(cfg, check_files=check_files, source=str(path), overridden=frozenset(given))
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


def _from_command_line(key: str, overridden: frozenset[str]) -> bool:
    """Whether `key` (or the list or section holding it) was set on the command line."""
    return any(key == o or key.startswith((f"{o}.", f"{o}[")) for o in overridden)


def _where(source: str, key: str, overridden: frozenset[str]) -> str:
    """`--key` when `key` (or the list or section holding it) was set on the command line, else `<file>: key`."""
    return f"--{key}" if _from_command_line(key, overridden) else f"{source}: {key}"


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
    unknown = next((name for name in raw if name not in fields), None)
    if unknown is not None:
        known = ", ".join(sorted(fields))
        where = _where(source, f"{prefix}{unknown}", overridden)
        where = where if where.startswith("--") else source  # "<file>: unknown key 'a.b'", not "a.b" twice
        raise ConfigError(f"{where}: unknown key '{prefix}{unknown}' (known in this section: {known})")
    kwargs = {}
    for name in fields:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", source, overridden)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section that validates itself (head, data.generated): "<field> must ..."
        raise ConfigError(
            _section_error(str(exc), [n for n in fields if n in raw], source, prefix, overridden)
        ) from None


def _section_error(message: str, given: list[str], source: str, prefix: str, overridden: frozenset[str]) -> str:
    """A section's own "<field> must ..." message, blamed as `_where` blames: on `--<prefix><field>` when that field
    came from the command line, else on another key the message names that did (`--head.magface_u_m: head.magface_l_m
    must be in [0, magface_u_m] ...`), else on the recipe file. Only the fields the mapping sets (`given`) count (a
    default came from neither), and past the leading word only names with an underscore: a plain word of the
    message (`epochs`, `name`) may be English."""
    words = re.findall(r"[\w']+", message)
    lead = words[0] if words and words[0] in given else None
    if lead is not None and _from_command_line(f"{prefix}{lead}", overridden):
        return f"--{prefix}{message}"
    for word in words:
        if word != lead and word in given and "_" in word and _from_command_line(f"{prefix}{word}", overridden):
            return f"--{prefix}{word}: {prefix}{message}"
    return f"{source}: {prefix}{message}"


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


def validate(
    cfg: ExperimentConfig, check_files: bool = True, source: str = "recipe", overridden: frozenset[str] = frozenset()
) -> None:
    """Checks that need more than one key, or the file system. Each error names the key, blamed as `from_dict`
    blames: `--key` when it (or the list or section holding it) is one of the dotted keys given on the command line
    (`overridden`), else `source` (the recipe file). An error about several keys is blamed on the first of them
    that came from the command line.

    `eval.bins` entries that are not existing paths resolve against `data.root` (`lfw` -> `<root>/lfw.bin`),
    as insightface's `val_targets`.
    """
    from heads import list_heads
    from models import list_backbones

    def where(key: str) -> str:  # "--key" or "<file>: key", for a message about one key
        return _where(source, key, overridden)

    def blame(*keys: str) -> str:  # "--key" or "<file>", for a message that names several keys itself
        return next((f"--{key}" for key in keys if _from_command_line(key, overridden)), source)

    if cfg.network.name not in list_backbones():
        raise ConfigError(
            f"{where('network.name')}: unknown backbone {cfg.network.name!r} (known: {', '.join(list_backbones())})"
        )
    if cfg.head.name not in list_heads():
        raise ConfigError(f"{where('head.name')}: unknown head {cfg.head.name!r} (known: {', '.join(list_heads())})")
    positive = {
        "network.embedding_size": cfg.network.embedding_size,
        "optim.lr": cfg.optim.lr,
        "train.batch_size": cfg.train.batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.log_every": cfg.train.log_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.max_bad_steps": cfg.train.max_bad_steps,
        "eval.batch_size": cfg.eval.batch_size,
        "speed.ddp_bucket_cap_mb": cfg.speed.ddp_bucket_cap_mb,
        "data.prefetch": cfg.data.prefetch,
        "speed.ddp_power_sgd_rank": cfg.speed.ddp_power_sgd_rank,
    }
    for dotted, value in positive.items():
        if not value > 0:  # not `<= 0`: nan is refused too
            raise ConfigError(f"{where(dotted)} must be > 0, got {value}")
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
        "distill.head_weight": cfg.distill.head_weight,
        "distill.weight": cfg.distill.weight,
        "distill.relation_weight": cfg.distill.relation_weight,
    }
    for dotted, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{where(dotted)} must be >= 0, got {value}")
    if isinstance(cfg.eval.every, int) and cfg.eval.every < 0:
        raise ConfigError(f"{where('eval.every')} must be >= 0 or 'epoch', got {cfg.eval.every}")
    if cfg.schedule.epochs == 0 and cfg.schedule.max_steps == 0:
        raise ConfigError(
            f"{blame('schedule.epochs', 'schedule.max_steps')}: schedule.epochs and schedule.max_steps are both 0: "
            "nothing to train"
        )
    if not 0.0 < cfg.train.rollback_lr_factor <= 1.0:  # > 1 would raise the lr of a run that just diverged
        raise ConfigError(f"{where('train.rollback_lr_factor')} must be in (0, 1], got {cfg.train.rollback_lr_factor}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"{where('data.max_bad_fraction')} must be in [0, 1], got {cfg.data.max_bad_fraction}")
    if not 0.0 <= cfg.network.dropout < 1.0:
        raise ConfigError(f"{where('network.dropout')} must be in [0, 1), got {cfg.network.dropout}")
    if cfg.speed.ddp_power_sgd_warmup_steps < 2:
        # torch's PowerSGDState: error feedback and warm start need two plain all-reduce steps first.
        raise ConfigError(
            f"{where('speed.ddp_power_sgd_warmup_steps')} must be >= 2 (PowerSGD needs two plain all-reduce steps "
            f"first), got {cfg.speed.ddp_power_sgd_warmup_steps}"
        )
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"{where('optim.betas')} must have two values, got {cfg.optim.betas}")
    if cfg.optim.name == "adamw" and cfg.head.update != "dense":
        # AdamW's step divides by the running second moment: not linear in its state, so no closed-form catch-up
        # (lazy), and Partial FC v1's frozen rows (sparse) would be a different optimizer than the one configured.
        raise ConfigError(
            f"{blame('head.update', 'optim.name')}: head.update: {cfg.head.update} needs optim.name: sgd; with adamw "
            "only head.update: dense is exact (set it in the recipe's head section)"
        )
    data = cfg.data
    if data.source == "synthetic" and (data.num_classes <= 0 or data.num_images <= 0):
        raise ConfigError(
            f"{blame('data.source', 'data.num_classes', 'data.num_images')}: data.source 'synthetic' needs "
            "data.num_classes > 0 and data.num_images > 0"
        )
    if not check_files:
        return
    if data.decode == "gpu" and data.source not in ("recordio", "generated"):
        raise ConfigError(
            f"{blame('data.decode', 'data.source')}: data.decode 'gpu' reads RecordIO; data.source is {data.source!r}"
        )
    if data.source == "image_folder":
        if not data.root or not Path(data.root).is_dir():
            raise ConfigError(f"{where('data.root')}: image folder {data.root!r} does not exist")
    if data.source == "recordio":
        if not data.root:
            raise ConfigError(
                f"{blame('data.root', 'data.source')}: data.root is empty: data.source 'recordio' needs a folder "
                "with train.rec and train.idx"
            )
        for name in ("train.rec", "train.idx"):
            if not (Path(data.root) / name).is_file():
                raise ConfigError(f"{where('data.root')}: {Path(data.root) / name} does not exist")
    if cfg.network.init_weights:
        # A weights file, or a run or checkpoint folder standing for the model.safetensors inside it (as every
        # reader of trained models takes it: models.weights).
        from models.weights import WeightsError, resolve_weights_path

        try:
            resolve_weights_path(cfg.network.init_weights)
        except WeightsError as exc:
            raise ConfigError(f"{where('network.init_weights')}: {exc}") from None
    distill = cfg.distill
    if distill.teacher:
        if not Path(distill.teacher).exists():
            raise ConfigError(f"{where('distill.teacher')}: {distill.teacher} does not exist")
        if distill.teacher.endswith((".pth", ".pt")) and not distill.teacher_network:
            raise ConfigError(
                f"{blame('distill.teacher_network', 'distill.teacher')}: distill.teacher {distill.teacher} is an "
                "insightface .pth: set distill.teacher_network to its network (e.g. r100)"
            )
    for i, entry in enumerate(cfg.eval.bins):
        candidates = [Path(entry)]
        if data.root and not Path(entry).is_absolute():
            candidates += [Path(data.root) / entry, Path(data.root) / f"{entry}.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(
                f"{where(f'eval.bins[{i}]')}: {entry!r} not found (looked at {', '.join(map(str, candidates))})"
            )
        cfg.eval.bins[i] = str(found)


def resolve_batch_size(train: TrainConfig, world_size: int) -> None:
    """`train.global_batch_size`, when given, decides the per-process batch (written back into the config, so
    config.yaml and the checkpoint say what ran)."""
    if train.global_batch_size:
        per_step = world_size * train.gradient_accumulation_steps
        if train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={train.global_batch_size} is not divisible by {world_size} "
                f"processes x {train.gradient_accumulation_steps} accumulation steps"
            )
        train.batch_size = train.global_batch_size // per_step


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved tree as plain data (for config.yaml and checkpoint compatibility checks)."""
    return dataclasses.asdict(cfg)


def config_text(cfg: ExperimentConfig) -> str:
    """The resolved tree as a recipe (YAML that `load_config` reads back into an equal tree): `<output>/config.yaml`
    and `--print-config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    """`config_text` into `path`, atomically."""
    from models.cli import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(config_text(cfg))


# Keys whose change makes a checkpoint unusable: the shapes of what it stores, or the meaning of its classes. The
# chosen head adds the settings it declares `structural` (`structural_keys`).
STRUCTURAL_KEYS = (
    "network.name",
    "network.embedding_size",
    "head.name",
    "optim.name",
)


def structural_keys(cfg: ExperimentConfig) -> tuple[str, ...]:
    """`STRUCTURAL_KEYS` and the chosen head's settings that shape its class-center table (declared with
    `key(..., structural=True)`, e.g. `head.num_subcenters`)."""
    from heads.registry import head_settings

    settings = head_settings(cfg.head.name)
    fields = dataclasses.fields(settings) if settings is not None else ()
    return (*STRUCTURAL_KEYS, *(f"head.{f.name}" for f in fields if is_structural(f)))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out
