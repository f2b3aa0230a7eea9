"""Entry point: `accelerate launch [--config_file accelerate_configs/X.yaml] trainer/main.py [--config RECIPE]
[--resume [auto|PATH] | --overwrite] [--section.key value ...]`.

With no arguments it trains the embedded default (`launch/recipes/default.yaml`): generated faces, a small iresnet,
a few minutes on a CPU. Precision and backend come from the Accelerate config file, never from here.

Exit codes (README.md, "Output folder, resume, signals, exit codes", also lists what the launcher returns):

    0  the run finished, or stopped on SIGTERM/SIGINT with its checkpoint
    2  bad input, one line on stderr: config, data, checkpoint, an output folder in use or holding an earlier run,
       a verification file too small for its 10 folds, an Accelerate config asking for GPUs where there are none
    3  the run diverged (`train.max_bad_steps` non-finite steps in a row; the newest checkpoint predates them)
    4  evaluation failed during training: its traceback is in train.log, the step it evaluated is saved
    5  a data worker process died (killed, out of memory): the step in progress completed and is saved

Only the standard library is imported before `main` records SIGTERM/SIGINT: a Ctrl-C while torch is imported
must not end in a KeyboardInterrupt traceback (the run stops after its first step instead, with a checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from trainer.config import ExperimentConfig
    from trainer.loop import Trainer

logger = logging.getLogger(__name__)
_EARLY_SIGNALS: list[str] = []  # received before `StopSignal.install()` (while the libraries were imported)


def _record_early(signum: int, frame: FrameType | None) -> None:
    _EARLY_SIGNALS.append(signal.Signals(signum).name)
    os.write(2, f"received {_EARLY_SIGNALS[-1]} while starting: the run stops after its first step\n".encode())


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the `--section.key value` overrides of the recipe (every other argument).

    `--help` lists every recipe key (`trainer.keys`); `--print-config` prints the resolved recipe as YAML and, as
    `--help` does, exits here (0, or 2 with one `config error:` line), before anything is created or read.
    """
    from trainer.config import DEFAULT_RECIPE, ConfigError, config_text, load_config
    from trainer.keys import render_help

    parser = argparse.ArgumentParser(
        prog="trainer/main.py",
        usage="%(prog)s [-h] [--config RECIPE] [--resume [auto|PATH] | --overwrite] [--print-config] [--output DIR] "
        "[--section.key VALUE ...]",
        description="Train a face embedder with margin softmax through Partial FC.",
        epilog=render_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_RECIPE), metavar="RECIPE", help="YAML recipe (default: %(default)s)"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="newest",
        metavar="auto|PATH",
        help="continue from the newest checkpoint in the output folder (an error if there is none); 'auto': "
        "continue if there is one, else start fresh (for preemptible jobs); PATH: from that checkpoint folder",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in an output folder that holds an earlier run: its checkpoints/, model.safetensors, "
        "config.yaml, train.log, tensorboard/, wandb/ and curves.png are moved to <output>/replaced-<time>/",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the recipe as it resolves (overrides applied, keys checked) as YAML and exit; the output "
        "folder and the data are not touched (their checks wait for the run)",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.print_config:
        try:
            cfg = load_config(args.config, overrides, check_files=False)
        except ConfigError as exc:
            parser.exit(2, f"config error: {exc}\n")
        sys.stdout.write(config_text(cfg))
        parser.exit(0)
    return args, overrides


def run(cfg: ExperimentConfig, accelerator: Accelerator, resume_from: Path | None = None) -> Trainer:
    """Build, resume from `resume_from` if given (`main` chose it: trainer.runlock), train.

    The resolved config goes to `<output>/config.yaml` only once the resume checks passed: a refused resume leaves
    the folder's config.yaml the one of the run that wrote its checkpoints.
    """
    from trainer.config import config_text
    from trainer.loop import Trainer
    from trainer.trackers import start_trackers

    trainer = Trainer(cfg, accelerator)
    if resume_from is not None:
        trainer.resume(resume_from)
    if accelerator.is_main_process:  # after the Trainer: derived values (batch_size from global_batch_size) included
        trainer.folder.write_text(trainer.folder.config, config_text(cfg))
    start_trackers(accelerator, cfg)  # train.trackers, if any; the resolved config as hyper-parameters
    if trainer.state.step >= trainer.schedule.total_steps:
        logger.info("nothing to do: step %d of %d", trainer.state.step, trainer.schedule.total_steps)
    trainer.train()
    return trainer


def main(argv: list[str] | None = None) -> int:
    # First, before any library is imported: a signal during start-up must not kill the process (it stops the run
    # at the first step boundary); then the kernel must tell this process when its launcher dies.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _record_early)
    from models.cli import FILE_ONLY
    from models.errors import EXIT_BAD_INPUT, InputError
    from trainer.config import ConfigError, load_config
    from trainer.distributed import StopSignal, check_launch_devices, exit_with_launcher
    from trainer.faults import RunStopped
    from trainer.guard import EXIT_DIVERGED, DivergenceError

    StopSignal.install(already=_EARLY_SIGNALS)
    exit_with_launcher()
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    first = os.environ.get("RANK", "0") == "0"  # every rank refuses alike below: one line is enough
    try:
        check_launch_devices()
    except ConfigError as exc:
        if first:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        if first:
            print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from models.cli import setup_logging
    from models.run_folder import RunFolder
    from trainer.checkpoint import remove_leftovers
    from trainer.distributed import RefusedByMainProcess, build_accelerator, main_process_decides
    from trainer.reporting import console
    from trainer.runlock import RunLock, RunPlan, check_checkpoints_writable, plan_run

    folder = RunFolder(cfg.output)
    resume = args.resume if args.resume in (None, "newest", "auto") else Path(args.resume)
    lock = RunLock(folder)
    try:
        accelerator = build_accelerator(
            cfg.output, cfg.train.gradient_accumulation_steps, cfg.train.trackers, cfg.speed
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def open_run() -> RunPlan:
        """Main process: take the folder, then decide fresh/resume/refuse; only then may train.log be written."""
        lock.acquire()
        plan = plan_run(folder, resume, args.overwrite)  # --overwrite moves the old train.log away first
        check_checkpoints_writable(folder)  # at start, not at the first save hours later
        leftovers = remove_leftovers(folder)  # what a killed save or prune left; the lock says no save is running
        setup_logging(True, console=console, log_file=folder.log)
        if lock.took_over:
            logger.warning("took over %s: its holder (%s) is no longer running", lock.path, lock.took_over)
        if leftovers:
            logger.info("removed the leftovers of an interrupted save or prune: %s", ", ".join(map(str, leftovers)))
        if plan.moved_to is not None:
            logger.info("moved %s (%s) to %s", plan.why, ", ".join(plan.moved), plan.moved_to)
        return plan

    if not accelerator.is_main_process:
        setup_logging(False, console=console)
    code, reason = 0, "finished"
    try:
        plan = main_process_decides(open_run)
        trainer = run(cfg, accelerator, resume_from=plan.resume_from)
        if StopSignal.received:
            reason = f"stopped by {StopSignal.received[0]} at step {trainer.state.step}, with its checkpoint"
    except InputError as exc:
        # Bad input: one clear line naming the file, key or value, not a traceback; in train.log too, once this
        # run holds the folder (a run refused for a busy folder must not write into the other run's log).
        if isinstance(exc, RefusedByMainProcess):
            return EXIT_BAD_INPUT  # the main process says why
        if accelerator.is_main_process and lock.fd is not None:
            setup_logging(True, console=console, log_file=folder.log)
            logger.error("refused: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        code, reason = EXIT_BAD_INPUT, "bad input"
    except DivergenceError as exc:
        # Not bad input: the run itself went non-finite (trainer.guard). Its checkpoints end before it diverged.
        logger.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        code, reason = EXIT_DIVERGED, "diverged"
    except RunStopped as exc:
        # A failure outside the step (trainer.faults): every rank saved the same step and raised the same error.
        if accelerator.is_main_process:
            logger.error("%s", exc)
            print(f"error: {exc}", file=sys.stderr)
        code, reason = exc.exit_code, exc.reason
    finally:
        if lock.fd is not None:
            logger.info("exit: %s (exit code %d)", reason, code, extra={FILE_ONLY: True})
        lock.release()
    return code


if __name__ == "__main__":
    exit_code = main()
    from trainer.distributed import release_process_group  # imported by main() already

    release_process_group()
    # The run is over: saved, logged, its folder released. A signal that arrives now must not turn its exit code
    # into "killed by SIGTERM": Python puts the default handlers back while it shuts down, and a launcher that takes
    # its time to die after a Ctrl-C (Accelerate's plain launcher) sends its parent-death SIGTERM just then.
    for late in (signal.SIGTERM, signal.SIGINT):
        signal.signal(late, signal.SIG_IGN)
    sys.exit(exit_code)
