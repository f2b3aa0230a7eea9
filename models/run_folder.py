"""The output folder of a training run: every path in it is named here, and nowhere else.

    <output>/
        .lock                       the run lock (trainer.runlock): pid, host, start time of the holder
        config.yaml                 the resolved recipe
        train.log                   the main process's log
        metrics.jsonl               one JSON record per log line and per evaluation
        model.safetensors           the final backbone (a finished run only)
        README.md                   its model card (evaluation.card: rendered from the model's metadata)
        curves.png                  loss, lr, samples/s, verification against the step
        tensorboard/, wandb/        trackers' files
        teacher_cache/              distillation's teacher embeddings (trainer.distill)
        checkpoints/step-XXXXXXXX/  checkpoints (`CheckpointFolder` names their files)
        checkpoints/.tmp-step-*     a save in progress (or killed); checkpoints/.trash-step-*: a delete
        replaced-<time>/            what --overwrite (or a resume from an older checkpoint) moved out of the way

`RunFolder(root)` is the one value the lock, the checkpointer, the curves, the log, the trackers, the end of the
run, conversion, export and the weights loader use. Writes into it are atomic (a temporary file, then a rename,
`RunFolder.atomic`) or, for the log and the lock, opened without following a symbolic link: a file planted in the
folder as a link is never written through (`RunFolder.refuse_links` names it at start).

It lives in `models/` with the weights loader, the bottom of the import graph, because readers of trained models
(`evaluation`, `trainer.export`) resolve a run or checkpoint folder to its model file too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from models.cli import OutputError, atomic_output
from models.errors import InputError

__all__ = [
    "CheckpointError",
    "CheckpointFolder",
    "RunFolder",
    "sha256",
    "step_of",
]

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")  # the one step-folder pattern
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and file."""


def step_name(step: int) -> str:
    """`step-00001234`: the folder name of the checkpoint of optimizer step `step`."""
    return f"step-{step:08d}"


def step_of(path: Path | str) -> int | None:
    """The step of a `step-XXXXXXXX` folder; None for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointFolder:
    """One checkpoint folder (`checkpoints/step-XXXXXXXX/`, or its temporary twin while it is written): the names of
    its files (docs/checkpoints.md lists what each holds) and its manifest check."""

    MODEL = "model.safetensors"
    OPTIMIZER = "optimizer.safetensors"
    TRAINER_STATE = "trainer_state.json"
    MANIFEST = "manifest.json"
    DEEPSPEED = "deepspeed"
    HEAD_SHARDS = "head-rank*-of-*.safetensors"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"CheckpointFolder({str(self.path)!r})"

    @property
    def step(self) -> int | None:
        return step_of(self.path)

    @property
    def model(self) -> Path:
        return self.path / self.MODEL

    @property
    def optimizer(self) -> Path:
        return self.path / self.OPTIMIZER

    @property
    def trainer_state(self) -> Path:
        return self.path / self.TRAINER_STATE

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def deepspeed(self) -> Path:
        return self.path / self.DEEPSPEED

    def head_shard(self, rank: int, world_size: int) -> Path:
        return self.path / f"head-rank{rank:05d}-of-{world_size:05d}.safetensors"

    def head_shards(self) -> list[Path]:
        return sorted(self.path.glob(self.HEAD_SHARDS))

    def rng(self, rank: int) -> Path:
        return self.path / f"rng-rank{rank:05d}.safetensors"

    def module(self, name: str) -> Path:
        """A module trained beside backbone and head (`distill.safetensors`: distillation's projection)."""
        return self.path / f"{name}.safetensors"

    def is_complete(self) -> bool:
        """Sealed by its manifest (written last)."""
        return self.manifest.is_file()

    def write_manifest(self, step: int, world_size: int) -> None:
        """Seal the folder: sha256 of every file in it (sub-folders included), written last and synced."""
        folder = self.path
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        manifest = {"step": step, "world_size": world_size, "files": {f: sha256(folder / f) for f in files}}
        with self.manifest.open("w") as handle:
            json.dump(manifest, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())

    def read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {self.path}: unreadable {self.MANIFEST} ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"checkpoint {self.path}: {self.MANIFEST} has no 'files' mapping")
        return manifest

    def verify(self, only: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Check every file's sha256 (or those named in `only`) against the manifest; raise naming the first
        mismatch; return the manifest."""
        manifest = self.read_manifest()
        names = manifest["files"] if only is None else only
        for name in names:
            file = self.path / name
            if name not in manifest["files"]:
                raise CheckpointError(f"checkpoint {self.path}: {name} is not listed in {self.MANIFEST}")
            if not file.is_file():
                raise CheckpointError(f"checkpoint {self.path}: {name} is listed in {self.MANIFEST} but missing")
            if sha256(file) != manifest["files"][name]:
                raise CheckpointError(f"checkpoint {self.path}: {name} does not match its checksum in {self.MANIFEST}")
        return manifest


class RunFolder:
    """The output folder of a run (module doc): its paths, its checkpoint folders, its atomic writes."""

    LOCK = ".lock"
    CONFIG = "config.yaml"
    LOG = "train.log"
    METRICS = "metrics.jsonl"
    MODEL = "model.safetensors"
    CARD = "README.md"
    CURVES = "curves.png"
    CHECKPOINTS = CHECKPOINTS
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"
    TEACHER_CACHE = "teacher_cache"
    # What a run leaves here that a fresh run would overwrite or mix with its own (moved away by --overwrite).
    RESULTS = (CHECKPOINTS, MODEL, CARD, CONFIG, LOG, METRICS, TENSORBOARD, WANDB, CURVES)
    # The files a run writes or appends to by name: none of them may be a symbolic link.
    WRITTEN = (LOCK, CONFIG, LOG, METRICS, MODEL, CARD, CURVES, CHECKPOINTS)

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # ----------------------------------------------------------------------------------------------------------
    # Paths

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def log(self) -> Path:
        return self.root / self.LOG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def model(self) -> Path:
        return self.root / self.MODEL

    @property
    def card(self) -> Path:
        """The model card of `model` (`evaluation.card`), written with it at the end of a finished run."""
        return self.root / self.CARD

    @property
    def curves(self) -> Path:
        return self.root / self.CURVES

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def wandb(self) -> Path:
        return self.root / self.WANDB

    @property
    def teacher_cache(self) -> Path:
        """Distillation's cache of teacher embeddings (kept by --overwrite: its fingerprint says what it holds)."""
        return self.root / self.TEACHER_CACHE

    def checkpoint(self, step: int) -> CheckpointFolder:
        """The (final) folder of step `step`'s checkpoint."""
        return CheckpointFolder(self.checkpoints / step_name(step))

    def temporary_checkpoint(self, step: int) -> CheckpointFolder:
        """Where step `step`'s checkpoint is written before its rename: resume ignores it, the next save removes it."""
        return CheckpointFolder(self.checkpoints / f"{_TMP_PREFIX}{step_name(step)}")

    def trash_name(self, checkpoint: Path) -> Path:
        """Where a checkpoint is renamed before it is deleted (out of the `step-*` namespace in one rename)."""
        return checkpoint.with_name(f"{_TRASH_PREFIX}{checkpoint.name}-{os.getpid()}")

    @staticmethod
    def of_checkpoint(checkpoint: Path) -> RunFolder | None:
        """The run folder holding `checkpoint` (`<run>/checkpoints/step-X`), or None if it is not laid out so."""
        checkpoint = Path(checkpoint)
        if step_of(checkpoint) is None or checkpoint.parent.name != CHECKPOINTS:
            return None
        return RunFolder(checkpoint.parent.parent)

    # ----------------------------------------------------------------------------------------------------------
    # Listing

    def step_folders(self) -> list[CheckpointFolder]:
        """Every `step-*` folder in step order, complete or not (`.tmp-*` / `.trash-*` are not checkpoints)."""
        if not self.checkpoints.is_dir():
            return []
        found = [(step, p) for p in self.checkpoints.iterdir() if (step := step_of(p)) is not None and p.is_dir()]
        return [CheckpointFolder(p) for _, p in sorted(found)]

    def complete_checkpoints(self) -> list[CheckpointFolder]:
        """Sealed checkpoints (with a manifest), in step order."""
        return [c for c in self.step_folders() if c.is_complete()]

    def leftovers(self) -> list[Path]:
        """What an interrupted save (`.tmp-step-*`) or delete (`.trash-step-*`) left in `checkpoints/`."""
        if not self.checkpoints.is_dir():
            return []
        patterns = (f"{_TMP_PREFIX}step-*", f"{_TRASH_PREFIX}step-*")
        return sorted(p for pattern in patterns for p in self.checkpoints.glob(pattern))

    def holds_a_run(self) -> list[str]:
        """What an earlier run left that a fresh run must not mix with (empty: nothing)."""
        steps = self.step_folders()
        earlier = [f"checkpoints up to {steps[-1].path.name}"] if steps else []
        if self.model.exists() or self.model.is_symlink():
            earlier.append(self.MODEL)
        return earlier

    def new_replaced_folder(self) -> Path:
        """A new `<output>/replaced-<time>/` for what this run moves out of its way."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder, suffix = self.root / f"replaced-{stamp}", 1
        while folder.exists():  # two runs within a second
            suffix += 1
            folder = self.root / f"replaced-{stamp}-{suffix}"
        folder.mkdir()
        return folder

    # ----------------------------------------------------------------------------------------------------------
    # Writing

    def refuse_links(self) -> None:
        """An `OutputError` naming the first of the run's files that is a symbolic link (a planted `train.log ->
        /etc/passwd` must not be appended to), or the folder itself when it is a dangling link."""
        if self.root.is_symlink() and not self.root.exists():
            raise OutputError(
                f"output folder {self.root} is a symbolic link to {os.readlink(self.root)}, which does not exist: "
                "create its target or choose another --output"
            )
        for name in self.WRITTEN:
            path = self.root / name
            if path.is_symlink():
                raise OutputError(
                    f"{path} is a symbolic link (to {os.readlink(path)}): a run never writes through one; remove it "
                    "or choose another --output"
                )
        for folder in self.step_folders():
            for path in [folder.path, *folder.path.rglob("*")]:
                if path.is_symlink():
                    raise OutputError(
                        f"{path} is a symbolic link (to {os.readlink(path)}): a checkpoint holds plain files only; "
                        "remove it"
                    )

    @contextmanager
    def atomic(self, path: Path) -> Iterator[Path]:
        """`models.cli.atomic_output` for a file of this folder: a temporary path to write, renamed over `path`
        on success (replacing a link, never writing through it), removed on failure."""
        with atomic_output(path) as tmp:
            yield tmp

    def write_text(self, path: Path, text: str) -> None:
        """`path` (one of this folder's files) holds `text`, written atomically."""
        with self.atomic(path) as tmp:
            tmp.write_text(text)

    def append_line(self, path: Path, line: str) -> None:
        """Append one line to `path` (`metrics.jsonl`), opened without following a link."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                os.write(fd, (line.rstrip("\n") + "\n").encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise OutputError(f"{path}: cannot be written ({err.strerror or err})") from None

    def publish_model(self, checkpoint: CheckpointFolder) -> Path:
        """`model.safetensors` of a finished run: its final checkpoint's model file, copied atomically."""
        with self.atomic(self.model) as tmp:
            shutil.copyfile(checkpoint.model, tmp)
        return self.model
