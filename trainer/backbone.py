"""The backbone as the trainer uses it: built by `models` from the `network:` section, then the training-side
choices applied before `accelerator.prepare`: fine-tuning weights, frozen BatchNorm, and the speed switches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from models.config import NetworkConfig, build_network
from trainer.config import ConfigError, SpeedConfig
from trainer.distributed import check_speed_choices, uses_ddp

logger = logging.getLogger(__name__)


def build_backbone(
    network: NetworkConfig, speed: SpeedConfig, accelerator: Accelerator
) -> tuple[nn.Module, torch.memory_format]:
    """The backbone (models/), with fine-tuning weights, frozen BatchNorm and speed applied; and the memory format
    its input batches must have. Speed choices this launch cannot run are refused first (`check_speed_choices`)."""
    check_speed_choices(speed, accelerator)
    backbone = build_network(network)
    if network.init_weights:
        load_pretrained(backbone, Path(network.init_weights))
    if network.freeze_batchnorm:
        freeze_batchnorm(backbone)
    return backbone, apply_speed(backbone, speed)  # channels_last, compile: before prepare


def load_pretrained(backbone: nn.Module, path: Path) -> None:
    """Fine-tuning: the backbone's weights from a model.safetensors, or a run or checkpoint folder holding one
    (`models.weights.load_weights_into`: the first missing, unexpected or wrongly shaped key is named)."""
    from models.weights import WeightsError, load_weights_into

    try:
        load_weights_into(backbone, path)
    except WeightsError as exc:
        raise ConfigError(f"network.init_weights: {exc}") from None
    logger.info("backbone initialised from %s", path)


def freeze_batchnorm(module: nn.Module) -> None:
    """Keep every BatchNorm in eval mode (running statistics, no update) whatever `.train()` says later.

    For fine-tuning with frozen statistics, and for exact multi-process equivalence: batch statistics differ
    between one batch of 2B and two ranks' batches of B, running statistics do not. Affine weights still train.
    """
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.register_forward_pre_hook(lambda m, _: setattr(m, "training", False))


def apply_speed(backbone: nn.Module, speed: SpeedConfig, compile_backend: str = "inductor") -> torch.memory_format:
    """`speed.channels_last` and `speed.compile` on a bare backbone, before `accelerator.prepare`; returns the memory
    format its input batches must have. (`bench/gpu_bench.py` goes through here too, with its own backend.)

    Before prepare: DDP's buckets and DeepSpeed's flat buffers are laid out from the parameters' strides, and every
    backend then runs the same compiled module: DDP calls it inside its forward, where dynamo splits the graph at
    DDP's buckets (each bucket's all-reduce still overlaps the backward); a DeepSpeed engine calls it as its module.
    Compiled in place (`nn.Module.compile`): state_dict keys, checkpoints and `unwrap_model` stay as they are, where
    a `torch.compile(module)` wrapper would prefix every key with `_orig_mod.`. Compilation happens at the first
    step, and again at the first evaluation (eval mode, another batch size).
    """
    memory_format = torch.channels_last if speed.channels_last else torch.contiguous_format
    backbone.to(memory_format=memory_format)  # type: ignore[call-overload]  # torch's stubs lack memory_format
    if speed.compile:
        backbone.compile(mode=speed.compile_mode, backend=compile_backend)
    return memory_format


def describe_speed(speed: SpeedConfig, accelerator: Accelerator, fused_optimizer: bool) -> str:
    """The resolved speed choices, logged at start."""
    on_off = {True: "on", False: "off"}
    fused = on_off[fused_optimizer]
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fused += " (head only; the engine keeps its own)"
    parts = [
        f"channels_last {on_off[speed.channels_last]}",
        f"compile {speed.compile_mode if speed.compile else 'off'}",
        f"fused optimizer {fused}",
    ]
    if uses_ddp(accelerator):
        hook: str = speed.ddp_comm_hook
        if hook == "power_sgd":
            hook += f" (rank {speed.ddp_power_sgd_rank}, after {speed.ddp_power_sgd_warmup_steps} plain steps)"
        view = on_off[speed.ddp_gradient_as_bucket_view]
        parts.append(f"DDP buckets {speed.ddp_bucket_cap_mb} MiB, comm hook {hook}, gradient as bucket view {view}")
    else:
        parts.append("no DDP")
    return ", ".join(parts)
