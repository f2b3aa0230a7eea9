"""Knowledge distillation from a frozen teacher (`distill:` in the recipe; docs/distill.md).

    loss = distill.head_weight x margin head  +  distill.weight x embedding loss  +  distill.relation_weight x relation

The teacher is any trained face embedder: a run folder, a checkpoint folder or a `model.safetensors` of this
project, an insightface backbone `.pth` (read as `trainer.convert` reads it), or an ONNX model (onnxruntime). It is
frozen (no gradient, eval mode, its own autocast precision), outside DDP, DeepSpeed, the optimizer and the
checkpoint: it sees the student's batch as it is (the same augmented images) and returns its embeddings.

Both losses are computed on the global batch, gathered on every rank (`heads.distributed.all_gather_replicated`), so
they are the same number on every rank (the divergence guard and the loss log rely on that) and the backbone's
gradient, after DDP averages it, is one process's on the global batch: 2 processes train as 1 does. The student's
embedding is L2-normalized after a learned linear projection to the teacher's size when the sizes differ (applied
to the gathered batch, so it gets the same gradient on every rank, like the head's global state); the projection is
saved in each checkpoint (`distill.safetensors`) and never in `model.safetensors` or an export.

`distill.cache`: the first time a sample is seen the teacher embeds it both ways round (as it is and mirrored) and
the two embeddings are kept by record index; later epochs read them (the sample's flip that epoch picks one) instead
of running the teacher. The entries are written at every checkpoint as safetensors shards per rank
(`<output>/teacher_cache/shard-rank*-*.safetensors`, read back memory-mapped), so a resumed run keeps them. A cache
made with another teacher, other data or another teacher precision is refused by its fingerprint (`meta.json`),
naming what differs; entries are keyed by record index, so a cache written by another number of ranks is read as
it is (said in one line).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import Tensor, nn

from data import TrainInput
from heads.distributed import all_gather_no_grad, all_gather_replicated
from models.cli import atomic_output
from models.errors import InputError
from models.run_folder import RunFolder
from trainer.config import DistillConfig, ExperimentConfig

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class DistillError(InputError):
    """A teacher or a teacher cache that cannot be used; the message names the file and what is wrong."""


# --------------------------------------------------------------------------------------------------------------
# The teacher


class Teacher:
    """A frozen embedder: `embed(images)` -> (N, D) float32, no gradient. `images` are the student's input batch
    ((N, 3, 112, 112), RGB, normalized, any dtype and memory format)."""

    def __init__(
        self,
        embed: Callable[[Tensor], Tensor],
        embedding_size: int,
        description: str,
        file: Path,
        module: nn.Module | None = None,
    ) -> None:
        self._embed, self.embedding_size, self.description, self.file = embed, embedding_size, description, file
        self.module = module  # a torch teacher's backbone (frozen); None for an ONNX one

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return self._embed(images).float()


def load_teacher(cfg: DistillConfig, device: torch.device) -> Teacher:
    """The teacher of `distill.teacher`, on `device`, frozen."""
    path = Path(cfg.teacher)
    bgr = cfg.teacher_channels == "bgr"

    def order(images: Tensor) -> Tensor:
        return images.flip(1) if bgr else images

    if path.suffix == ".onnx":
        from evaluation.ijb import load_onnx_embedder

        if cfg.teacher_precision != "fp32":
            raise DistillError(f"distill.teacher_precision {cfg.teacher_precision}: an ONNX teacher runs as exported")
        session, _ = load_onnx_embedder(path, device)
        return Teacher(
            lambda images: session(order(images.float())).to(images.device),
            int(session(torch.zeros(1, 3, 112, 112)).shape[1]),
            f"{path} (onnxruntime)",
            path,
        )
    if path.suffix in (".pth", ".pt"):
        from trainer.convert import backbone_state_dict, fit_backbone, load_torch_file

        state = backbone_state_dict(load_torch_file(path), path)
        backbone, size = fit_backbone(state, cfg.teacher_network, None, path)
        description, file = f"{path} (insightface {cfg.teacher_network})", path
    else:
        from models.weights import load_backbone, resolve_weights_path

        backbone, metadata = load_backbone(path)
        size, file = int(metadata["embedding_size"]), resolve_weights_path(path)
        description = f"{path} ({metadata['network']})"
    backbone = backbone.to(device).eval().requires_grad_(False)
    if cfg.teacher_precision == "fp16" and device.type != "cuda":
        raise DistillError("distill.teacher_precision fp16 needs a GPU: use bf16 or fp32 on a CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.teacher_precision)

    def run(images: Tensor) -> Tensor:
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with autocast:
            return backbone(order(images.float()))

    return Teacher(run, size, f"{description}, {cfg.teacher_precision}", file, backbone)


def file_digest(path: Path) -> str:
    """sha256 of a teacher's weights file (a teacher folder's model file)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The cache


class TeacherCache:
    """Teacher embeddings by record index, both flips: `(num_samples, 2, D)` float32 entries in shards.

    `lookup(indices, flips)` gives the entries for a batch (None if any is missing); `add` keeps new ones in memory
    until `flush` writes them as this rank's next shard. Shards are read memory-mapped (the page cache is shared by
    the processes of a machine), so a cache of millions of samples costs no resident memory per rank."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], num_samples: int, dim: int, rank: int) -> None:
        self.folder, self.fingerprint, self.dim, self.rank = folder, fingerprint, dim, rank
        self.where = np.full((num_samples, 2), -1, dtype=np.int64)  # (shard number, row) of each sample's entry
        self.shards: list[np.ndarray] = []
        self.mapped: set[str] = set()  # the shard files read so far
        self.pending: dict[int, np.ndarray] = {}
        self.written = 0  # this rank's shards so far (its next shard's number)
        self._check_fingerprint()
        self.read_new_shards()
        if self.shards and self.rank == 0:
            logger.info("teacher cache %s: %d of %d samples", self.folder, self.entries, len(self.where))

    def _check_fingerprint(self) -> None:
        meta_file = self.folder / "meta.json"
        if meta_file.is_file():
            try:
                saved = json.loads(meta_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise DistillError(f"teacher cache {meta_file}: unreadable ({exc})") from None
            for name, value in self.fingerprint.items():
                if name != "world_size" and saved.get(name) != value:
                    raise DistillError(
                        f"teacher cache {self.folder} was made with another {name} ({saved.get(name)!r}, this run "
                        f"has {value!r}): delete it, or set distill.cache_dir to another folder"
                    )
            if saved.get("world_size") != self.fingerprint["world_size"] and self.rank == 0:
                logger.info(
                    "teacher cache %s was written by %s ranks, this run has %d: its entries are keyed by record "
                    "index, so every rank reads all of them",
                    *(self.folder, saved.get("world_size"), self.fingerprint["world_size"]),
                )

    def read_new_shards(self) -> None:
        """Map the shards written since the last call (by any rank: the others' entries of the epoch just done)."""
        for shard in sorted(self.folder.glob("shard-rank*.safetensors")):
            if shard.name in self.mapped:
                continue
            indices, embeddings = _read_shard(shard)
            self.shards.append(embeddings)
            self.mapped.add(shard.name)
            self.where[indices] = np.stack([np.full_like(indices, len(self.shards) - 1), np.arange(len(indices))], 1)
            if shard.name.startswith(f"shard-rank{self.rank:05d}-"):
                self.written += 1
            for index in indices.tolist():
                self.pending.pop(index, None)

    @property
    def entries(self) -> int:
        return int((self.where[:, 0] >= 0).sum()) + len(self.pending)

    def lookup(self, indices: np.ndarray, flips: np.ndarray) -> Tensor | None:
        found = []
        for index, flip in zip(indices.tolist(), flips.tolist(), strict=True):
            if index in self.pending:
                found.append(self.pending[index][int(flip)])
                continue
            shard, row = self.where[index]
            if shard < 0:
                return None
            found.append(self.shards[shard][row, int(flip)])
        return torch.from_numpy(np.stack(found))

    def add(self, indices: np.ndarray, both: Tensor) -> None:
        """`both`: (N, 2, D), the teacher's embedding of each sample as it is and mirrored."""
        values = both.detach().to("cpu", torch.float32).numpy()
        for index, value in zip(indices.tolist(), values, strict=True):
            if self.where[index, 0] < 0:
                self.pending[index] = value

    def flush(self) -> None:
        """Write this rank's new entries as its next shard (atomically; the meta file first, by rank 0)."""
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.folder / "meta.json") as tmp:
                tmp.write_text(json.dumps(self.fingerprint, indent=1))
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        indices = np.array(sorted(self.pending), dtype=np.int64)
        embeddings = np.stack([self.pending[i] for i in indices.tolist()])
        shard = self.folder / f"shard-rank{self.rank:05d}-{self.written:05d}.safetensors"
        with atomic_output(shard) as tmp:
            save_file({"index": torch.from_numpy(indices), "embeddings": torch.from_numpy(embeddings)}, str(tmp))
        self.read_new_shards()  # from now on read from the file (memory-mapped), as a resumed run would


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(index (K,), embeddings (K, 2, D) memory-mapped) of a cache shard: the safetensors layout read directly (an
    8-byte header length, a JSON header of dtypes, shapes and data offsets, then the data)."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        base = 8 + length
        index_info, data_info = header["index"], header["embeddings"]
        assert index_info["dtype"] == "I64" and data_info["dtype"] == "F32"
        index = np.fromfile(
            path, dtype=np.int64, count=index_info["shape"][0], offset=base + index_info["data_offsets"][0]
        )
        start = base + data_info["data_offsets"][0]
        embeddings = np.memmap(path, dtype=np.float32, mode="r", offset=start, shape=tuple(data_info["shape"]))
    except (OSError, ValueError, KeyError, AssertionError) as exc:
        raise DistillError(f"teacher cache shard {path} is unreadable ({exc}): delete the cache folder") from None
    return index, embeddings


# --------------------------------------------------------------------------------------------------------------
# The distillation term


class Distillation:
    """The distillation loss of a step, with its teacher, its cache and its projection (module doc).

    A `trainer.state.Stateful` part: its checkpoint entry says where the cache is, and saving flushes the cache's
    new entries with the checkpoint."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher: Teacher,
        student_size: int,
        train_input: TrainInput,
        cache: TeacherCache | None,
        seed: int,
    ) -> None:
        self.cfg, self.teacher, self.input, self.cache = cfg, teacher, train_input, cache
        self.projection: nn.Module | None = None
        if student_size != teacher.embedding_size:
            self.projection = nn.Linear(student_size, teacher.embedding_size, bias=False)
            generator = torch.Generator().manual_seed(seed * 7907 + 1)  # the same on every rank
            with torch.no_grad():
                bound = 1.0 / student_size**0.5
                self.projection.weight.uniform_(-bound, bound, generator=generator)

    def modules(self) -> dict[str, nn.Module]:
        """What the checkpoint saves of the distillation (`distill.safetensors`): the projection, if any."""
        return {"distill": self.projection} if self.projection is not None else {}

    def start_epoch(self, barrier: Callable[[], None]) -> None:
        """At an epoch's start (every rank): write this rank's new cache entries and read every rank's, so that the
        samples another rank embedded last epoch are found in this one. Collective (a barrier between)."""
        if self.cache is not None:
            self.cache.flush()
            barrier()
            self.cache.read_new_shards()

    def to(self, device: torch.device) -> Distillation:
        if self.projection is not None:
            self.projection.to(device)
        return self

    def teacher_embeddings(self, images: Tensor, samples: tuple[np.ndarray, np.ndarray], clean: bool) -> Tensor:
        """This rank's teacher embeddings of the batch: from the cache when it has every sample (and no sample was
        replaced by another, `clean`), else from the teacher (both ways round when they go into the cache)."""
        indices, flips = samples
        if self.cache is None or not clean:
            return self.teacher.embed(images)
        cached = self.cache.lookup(indices, flips)
        if cached is not None:
            return cached.to(images.device)
        seen = self.teacher.embed(images)
        mirrored = self.teacher.embed(images.flip(3))
        # Entry [0] is the sample as stored, [1] its mirror image: a flipped batch image is the mirror.
        flipped = torch.from_numpy(flips).to(seen.device).view(-1, 1)
        both = torch.stack([torch.where(flipped, mirrored, seen), torch.where(flipped, seen, mirrored)], dim=1)
        self.cache.add(indices, both)
        return seen

    def total(
        self,
        head_loss: Tensor,
        student: Tensor,
        images: Tensor,
        samples: tuple[np.ndarray, np.ndarray],
        bad: Tensor | None = None,
    ) -> Tensor:
        """head_weight x the head's loss + the distillation terms, for this rank's micro-batch: its student
        embeddings and images, which samples they are (`TrainInput.batch_samples`) and, in `bad`, the keys of those
        the loader replaced by another (-1 elsewhere: a replaced sample's cache entry would be another image's)."""
        clean = bad is None or not bool((bad >= 0).any())
        teacher = self.teacher_embeddings(images, samples, clean)
        return self.cfg.head_weight * head_loss + self.loss(student, teacher)

    def loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """weight x embedding loss + relation_weight x relation, on the global batch (the same on every rank)."""
        cfg = self.cfg
        dtype = torch.promote_types(student.dtype, torch.float32)  # fp32 (fp64 in the tests), whatever the autocast
        with torch.autocast(device_type=student.device.type, enabled=False):
            # Every rank computes the whole loss: backward takes its rows' slice, x world size (DDP then averages).
            student = all_gather_replicated(student.to(dtype))
            teacher = F.normalize(all_gather_no_grad(teacher.to(dtype)))
            projected = self.projection(student) if self.projection is not None else student
            cosine = (F.normalize(projected) * teacher).sum(dim=1)
            embedding = (1.0 - cosine).mean() if cfg.loss == "cosine" else (2.0 - 2.0 * cosine).mean()
            total = cfg.weight * embedding
            if cfg.relation_weight > 0:
                unit = F.normalize(student)
                relation = ((unit @ unit.T - teacher @ teacher.T) ** 2).mean()
                total = total + cfg.relation_weight * relation
        return total

    def state_dict(self) -> dict[str, Any]:
        if self.cache is not None:
            self.cache.flush()  # the entries computed so far go with the checkpoint: a resume keeps them
        entries = self.cache.entries if self.cache is not None else 0
        return {"distill": {"teacher": self.teacher.description, "cache_entries": entries}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass  # the projection is a checkpointed module; the cache is read from its folder when built


def build_distillation(
    experiment: ExperimentConfig, folder: RunFolder, train_input: TrainInput, accelerator: Accelerator
) -> Distillation | None:
    """The run's distillation (None when `distill.teacher` is empty): the teacher on this process's device, its
    cache, the projection from `network.embedding_size` to the teacher's."""
    cfg, device, seed = experiment.distill, accelerator.device, experiment.train.seed
    rank, world_size = accelerator.process_index, accelerator.num_processes
    student_size = experiment.network.embedding_size
    if not cfg.teacher:
        return None
    teacher = load_teacher(cfg, device)
    cache = None
    if cfg.cache:
        fingerprint = {
            "format": CACHE_FORMAT,
            "teacher": file_digest(teacher.file),
            "teacher_precision": cfg.teacher_precision,
            "teacher_channels": cfg.teacher_channels,
            "embedding_size": teacher.embedding_size,
            "data": train_input.source,
            "num_samples": train_input.num_samples,
            "num_classes": train_input.num_classes,
            "world_size": world_size,
        }
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else folder.teacher_cache
        cache = TeacherCache(cache_dir, fingerprint, train_input.num_samples, teacher.embedding_size, rank)
    distillation = Distillation(cfg, teacher, student_size, train_input, cache, seed).to(device)
    logger.info(
        "distillation from %s (%d-d%s), loss %g x head + %g x %s%s%s",
        teacher.description,
        teacher.embedding_size,
        f", projected from {student_size}-d" if distillation.projection is not None else "",
        cfg.head_weight,
        cfg.weight,
        cfg.loss,
        f" + {cfg.relation_weight:g} x relation" if cfg.relation_weight else "",
        f"; teacher cache {cache.folder}" if cache is not None else "",
    )
    return distillation
