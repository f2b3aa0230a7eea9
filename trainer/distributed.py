"""Process-group set-up, rank helpers and seeding: the trainer's one place for distribution.

The differentiable collectives (all-gather with gradient, distributed cross-entropy) live in `heads.distributed`.
Nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, TypeVar, cast

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    DistributedType,
    KwargsHandler,
    ProjectConfiguration,
)

from models.errors import InputError
from models.launch import process_group_kwargs
from trainer.config import ConfigError, ExperimentConfig, SpeedConfig, to_dict
from trainer.faults import RunStopped, share_fault

logger = logging.getLogger(__name__)
T = TypeVar("T")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Set in the trainer's environment by `accelerate launch` (its plain launcher), torchrun / DeepSpeed, and Open MPI.
_LAUNCHER_VARIABLES = ("ACCELERATE_USE_CPU", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK")

_COMM_HOOKS = {
    "none": DDPCommunicationHookType.NO,
    "fp16": DDPCommunicationHookType.FP16,
    "bf16": DDPCommunicationHookType.BF16,
    "power_sgd": DDPCommunicationHookType.POWER_SGD,
}
# The process-group backends whose all-reduce takes bf16 tensors; torch refuses its bf16 hook on any other (gloo).
_BF16_BACKENDS = ("nccl", "xccl")


def build_accelerator(
    output: str,
    gradient_accumulation_steps: int = 1,
    trackers: Sequence[str] = (),
    speed: SpeedConfig | None = None,
) -> Accelerator:
    """The Accelerator for this run; precision and backend come from the `accelerate launch` config file only.

    `trackers`: the recipe's `train.trackers` (trainer/trackers.py), checked installed here, before any work.
    `speed`: the recipe's DDP choices (`speed.ddp_*`), handed to Accelerate for when it wraps the backbone in DDP.
    The Trainer checks them against the backend the launch chose (`check_speed_choices`), once logging is set up.
    """
    from models.run_folder import RunFolder
    from trainer.trackers import check_trackers

    log_with = check_trackers(trackers)
    speed = speed or SpeedConfig()
    # Before the group forms (the trainer imports it anyway, with its first optimizer): torch._dynamo imports
    # torch.distributed.nn.functional, whose functions take `group=group.WORLD` as a default argument. Imported after
    # init_process_group, those defaults would hold the live group, which destroy_process_group then cannot free
    # (release_process_group, docs/testing.md). Imported now, the defaults are None.
    import torch._dynamo  # noqa: F401

    # Several processes on CPUs: gloo, and Accelerate told so (the rule evaluation.ijb shares, models.launch).
    kwargs_handlers: list[KwargsHandler] = [ddp_kwargs(speed), *process_group_kwargs()]
    return Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=output, logging_dir=str(RunFolder(output).tensorboard)),
        kwargs_handlers=kwargs_handlers,
    )


def release_process_group() -> None:
    """End this process's part in the process group while the interpreter is whole: the last thing a trainer does.

    A finished run has destroyed its group (`trainer.reporting.finish_run`), a refused or failed one has not; and
    what the run built (the DDP-wrapped backbone, its hooks, the optimizer) holds the group in reference cycles. Left
    to the interpreter's shutdown, gloo's threads would be torn down during its finalization while the other ranks
    exit too (docs/testing.md, the SIGABRT); destroyed and collected here, they end now.
    """
    import gc

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()


def check_launch_devices() -> None:
    """Refuse (`ConfigError`, one line naming the CPU configs) an Accelerate config that asks for GPUs on a machine
    where torch finds no CUDA device: Accelerate would silently train on the CPU instead.

    How the request is known: Accelerate's plain launcher (one process) passes the config's `use_cpu` (or `--cpu`)
    as `ACCELERATE_USE_CPU`. Its torchrun path (`distributed_type: MULTI_GPU` or `DEEPSPEED`, several processes)
    passes nothing of the kind, so the config is read from the launcher's command line (`--config_file`, else
    Accelerate's default config file); the repository's CPU configs say `use_cpu: true`. A trainer started by
    another launcher (torchrun, srun, mpirun) or by hand is not checked: nothing says what it asked for."""
    if torch.cuda.is_available():
        return
    config, cpu_flag = _launcher_config()
    if "ACCELERATE_USE_CPU" in os.environ and "LOCAL_RANK" not in os.environ:  # the plain launcher
        asks_for_gpu = os.environ["ACCELERATE_USE_CPU"].lower() in ("false", "0", "no")
    elif config is not None and not cpu_flag:  # torchrun under `accelerate launch`: the config file says
        try:
            settings = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return  # the launcher read it; if this process cannot, it cannot tell either
        asks_for_gpu = isinstance(settings, dict) and not settings.get("use_cpu", False)
    else:
        return
    if asks_for_gpu:
        named = f"the Accelerate config {config}" if config is not None else "this Accelerate config"
        configs = Path(__file__).resolve().parent.parent / "accelerate_configs"
        cpu = ", ".join(f"accelerate_configs/{p.name}" for p in sorted(configs.glob("cpu*.yaml")))
        raise ConfigError(
            f"{named} asks for GPUs (use_cpu: false), but torch finds no CUDA device on this machine: launch with a "
            f"CPU config instead (accelerate_configs/cpu.yaml for one process; all of them: {cpu})"
        )


def _launcher_config() -> tuple[Path | None, bool]:
    """(the config file of the `accelerate launch` that started this process, whether it was given `--cpu`);
    (None, False) when the parent is not `accelerate launch` (Linux: read from /proc)."""
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = Path(os.readlink(f"/proc/{parent}/cwd"))
    except OSError:
        return None, False
    if not any("accelerate" in Path(arg).name for arg in argv[:3]):  # `accelerate launch`, `-m accelerate...`
        return None, False
    config: str | None = None
    for i, arg in enumerate(argv):
        if arg in ("--config_file", "--config-file") and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith(("--config_file=", "--config-file=")):
            config = arg.split("=", 1)[1]
    if config is None:
        from accelerate.commands.config import default_config_file

        config = default_config_file if os.path.isfile(default_config_file) else None
    return (cwd / config if config is not None else None), "--cpu" in argv


def ddp_kwargs(speed: SpeedConfig) -> DistributedDataParallelKwargs:
    """The recipe's `speed.ddp_*` as Accelerate's DDP arguments (used only where Accelerate wraps the model in DDP)."""
    state = {}
    if speed.ddp_comm_hook == "power_sgd":
        state = {
            "matrix_approximation_rank": speed.ddp_power_sgd_rank,
            "start_powerSGD_iter": speed.ddp_power_sgd_warmup_steps,
        }
    return DistributedDataParallelKwargs(
        bucket_cap_mb=speed.ddp_bucket_cap_mb,
        gradient_as_bucket_view=speed.ddp_gradient_as_bucket_view,
        comm_hook=_COMM_HOOKS[speed.ddp_comm_hook],
        comm_state_option=state,
    )


def uses_ddp(accelerator: Accelerator) -> bool:
    """Whether `accelerator.prepare` wraps a model in DDP (Accelerate's own rule; DeepSpeed has its engine)."""
    return accelerator.multi_device or accelerator.distributed_type == DistributedType.MULTI_CPU


def check_speed_choices(speed: SpeedConfig, accelerator: Accelerator) -> None:
    """Before anything is prepared: refuse a speed choice this launch cannot run (`ConfigError`, not a failure
    inside `accelerator.prepare` or the first backward), and say which DDP choices it ignores (no DDP)."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if speed.channels_last and deepspeed:
        # DeepSpeed broadcasts each parameter as `p.view(torch.uint8)` and flattens them into contiguous buffers:
        # an NHWC conv weight (innermost stride != 1) fails in deepspeed.initialize.
        raise ConfigError(
            "speed.channels_last true is not supported under DeepSpeed (its engine needs contiguous parameters): "
            "set it false, or train with DDP"
        )
    changed = {
        f"speed.{f.name}": getattr(speed, f.name)
        for f in dataclasses.fields(SpeedConfig)
        if f.name.startswith("ddp_") and getattr(speed, f.name) != f.default
    }
    if not uses_ddp(accelerator):
        if changed:
            shown = ", ".join(f"{key}={value!r}" for key, value in changed.items())
            why = "the DeepSpeed engine reduces the gradients" if deepspeed else "one process"
            logger.warning("%s: ignored, this run has no DDP (%s)", shown, why)
        return
    if (accelerator.ddp_handler or DistributedDataParallelKwargs()) != ddp_kwargs(speed):  # a caller's bug
        raise ValueError("the Accelerator's DDP arguments are not the recipe's: use build_accelerator(speed=...)")
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    if speed.ddp_comm_hook == "bf16" and not any(name in backend for name in _BF16_BACKENDS):
        raise ConfigError(
            f"speed.ddp_comm_hook 'bf16' needs the NCCL or XCCL backend (GPUs); this run's is {backend}: "
            "use 'fp16', 'power_sgd' or 'none'"
        )


def effective_precision(accelerator: Accelerator) -> str:
    """What the run really computes in. Accelerate keeps `mixed_precision == "fp16"` on a CPU but applies neither
    autocast nor loss scaling there: say so instead of letting a user believe the run is fp16."""
    requested = accelerator.mixed_precision
    if requested == "fp16" and accelerator.device.type == "cpu" and accelerator.distributed_type.value != "DEEPSPEED":
        logger.warning(
            "fp16 was requested, but Accelerate runs fp16 as fp32 on a CPU (no autocast, no loss scaling); "
            "use a bf16 config for mixed precision on CPUs"
        )
        return "fp32 (fp16 requested; ignored on CPU)"
    return {"no": "fp32"}.get(requested, requested)


def check_same_on_every_rank(values: dict[str, object]) -> None:
    """Raise, on every rank, if any value differs between ranks (e.g. one machine launched with another batch size).

    Collective: every rank must call it. A mismatch caught here stops the run before the first step instead of
    deadlocking or silently mis-sharding the classes.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    gathered: list[dict[str, object] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    for key in values:
        per_rank = [g[key] if g is not None else None for g in gathered]
        if any(v != per_rank[0] for v in per_rank):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(per_rank))
            raise ConfigError(f"{key} differs between ranks ({shown}); every process must run the same recipe")


def check_same_run_on_every_rank(cfg: ExperimentConfig, num_classes: int, num_samples: int) -> None:
    """Every rank runs the same recipe on the same data (one machine launched with another batch size would
    deadlock or mis-shard the classes), and there is a class center for every rank. Collective."""
    check_same_on_every_rank(
        {
            "train.batch_size": cfg.train.batch_size,
            "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
            "train.seed": cfg.train.seed,
            "network": to_dict(cfg.network),
            "head": to_dict(cfg.head),
            "data.num_classes": num_classes,
            "dataset size": num_samples,
        }
    )
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if num_classes < world_size:
        raise ConfigError(
            f"data.num_classes={num_classes} is smaller than the {world_size} processes: every rank needs at least "
            "one class center"
        )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Every rank uses the same seed: the backbone starts identical
    on every rank and the sampler's permutation is shared; per-rank randomness (data augmentation) is derived
    from (seed, rank, worker) in `data.dataset`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StopSignal:
    """SIGTERM / SIGINT ask the run to stop; every rank stops after the same optimizer step and saves it.

    The handler only records the signal (nothing unsafe runs inside a signal handler) and writes one raw line to
    stderr. Whatever process receives it (the launcher, which forwards it or dies and so fires the parent-death
    signal, the whole process group, or a single rank), `poll` makes every rank agree: one MAX all-reduce per
    optimizer step, which also carries the time-based checkpoint decision (ranks' clocks differ; they must all save
    the same step).

    The record is process-wide, as signal handlers are: `install()` (trainer/main.py, at start) keeps a signal
    during start-up or at the end of the run from killing the process, and the loop's `with StopSignal(...)` sees it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    received: ClassVar[list[str]] = []  # signal names, in arrival order (process-wide)

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.previous: dict[int, Any] = {}
        self.clock = time.monotonic()  # since the loop started or the last checkpoint
        self.announced = False

    @classmethod
    def install(cls, already: Sequence[str] = ()) -> None:
        """Record SIGTERM / SIGINT from now on, for the rest of the process; `already`: the names of those received
        before (trainer/main.py records them while it imports the libraries)."""
        cls.received.extend(already)
        for sig in cls.SIGNALS:
            signal.signal(sig, cls._handle)

    @classmethod
    def _handle(cls, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        cls.received.append(name)
        # os.write, not logging: a handler can interrupt a log call halfway, and re-entering it may fail.
        rank = os.environ.get("RANK", "0")
        os.write(2, f"rank {rank}: received {name}: stopping after the current step, with a checkpoint\n".encode())

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def poll(
        self, step: int, save_every_minutes: float = 0.0, fault: RunStopped | None = None
    ) -> tuple[bool, bool, RunStopped | None]:
        """(stop now, save now by the clock, the fault that stops the run), the same on every rank. Collective:
        every rank calls it once per optimizer step, after step `step`. `fault`: this rank's failure outside the
        step (`trainer.faults`), if any; when a rank has one, every rank gets it (that rank's; the highest such
        rank's if several) and stops."""
        due = save_every_minutes > 0 and time.monotonic() - self.clock >= save_every_minutes * 60
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        flags = [1.0 if self.received else 0.0, 1.0 if due else 0.0, float(rank + 1) if fault else 0.0]
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            tensor = torch.tensor(flags, device=self.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flags = tensor.tolist()
        stop, save = flags[0] > 0, flags[1] > 0
        shared = share_fault(fault, int(flags[2]) - 1) if flags[2] > 0 else None
        if stop and not self.announced:
            self.announced = True
            if self.received:
                logger.warning("received %s: every rank stops after step %d and saves it", self.received[0], step)
            else:
                logger.warning("another rank received a stop signal: every rank stops after step %d", step)
        return stop or shared is not None, save, shared

    def restart_clock(self) -> None:
        """A checkpoint was just saved: the next time-based one is `save_every_minutes` from now."""
        self.clock = time.monotonic()


def main_process_decides(decide: Callable[[], T]) -> T:
    """Run `decide` on the main process only and hand its result, or its refusal, to every rank.

    Collective. The other ranks wait in the broadcast, so a main process that raises must still answer: they then
    raise `RefusedByMainProcess` (the main process prints the reason) instead of hanging.
    """
    several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if not several:
        return decide()
    message: list[Any] = [None]
    if torch.distributed.get_rank() == 0:
        try:
            message[0] = ("ok", decide())
        except BaseException as exc:
            torch.distributed.broadcast_object_list([("refused", str(exc))], src=0)
            raise
    torch.distributed.broadcast_object_list(message, src=0)
    kind, value = message[0]
    if kind == "refused":
        raise RefusedByMainProcess(f"the main process refused to start: {value}")
    return cast(T, value)


def main_process_builds(build: Callable[[], T]) -> T | None:
    """`build()` on the main process only; its result stays there (None on the other ranks), but its refusal reaches
    every rank as in `main_process_decides` (they raise `RefusedByMainProcess` instead of waiting at the next
    collective for a main process that left). Collective."""
    built: list[T] = []
    main_process_decides(lambda: built.append(build()))
    return built[0] if built else None


class RefusedByMainProcess(InputError):
    """Raised on the other ranks when the main process refused the run (it reports the reason)."""


def exit_with_launcher() -> None:
    """Linux: have the kernel send this process SIGTERM when its parent, the launcher, dies, so the trainer never
    outlives it; it then saves a checkpoint and exits as on any SIGTERM. Call after `StopSignal.install()`.

    Only under a launcher (`accelerate launch`, torchrun, mpirun set these variables): a trainer started by hand keeps
    running when the shell that started it exits (`nohup python trainer/main.py &`)."""
    if not sys.platform.startswith("linux") or not any(name in os.environ for name in _LAUNCHER_VARIABLES):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.warning(
            "prctl(PR_SET_PDEATHSIG) failed (errno %d): this process may outlive its launcher", ctypes.get_errno()
        )
        return
    if os.getppid() != parent:  # the parent died before the prctl: no signal will come, send it ourselves
        os.kill(os.getpid(), signal.SIGTERM)
