"""Entry point: `accelerate launch [--config_file accelerate_configs/X.yaml] trainer/main.py [--config RECIPE]
[--resume] [--section.key value ...]`.

With no arguments it trains the embedded default (`launch/recipes/default.yaml`): generated faces, a small iresnet,
a few minutes on a CPU. Precision and backend come from the Accelerate config file, never from here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.checkpoint import CheckpointError
from trainer.config import DEFAULT_RECIPE, ConfigError, load_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="trainer/main.py",
        description="Train a face embedder with margin softmax through Partial FC.",
        epilog="Any other --section.key value pair overrides the recipe, e.g. --optim.lr 0.05 --train.batch_size 64.",
    )
    parser.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML recipe (default: %(default)s)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in the output folder"
    )
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from data.recordio import RecordIOError
    from evaluation.verification import BinFormatError
    from trainer.distributed import build_accelerator
    from trainer.loop import run
    from trainer.reporting import setup_logging

    accelerator = build_accelerator(
        cfg.output, cfg.train.gradient_accumulation_steps, cfg.train.tensorboard, speed=cfg.speed
    )
    setup_logging(Path(cfg.output), accelerator.is_main_process)
    try:
        run(cfg, accelerator, resume=args.resume)
    except (ConfigError, CheckpointError, RecordIOError, BinFormatError) as exc:
        # Bad input: one clear line naming the file, key or value, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
