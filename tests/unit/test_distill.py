"""Distillation (trainer/distill.py) in this process: the loss against a hand computation, a teacher from each kind
of file giving the same embeddings, the teacher frozen and never saved, the projection in the checkpoint and out of
the model file and its export, the cache (both flips by record index, its fingerprint refusal), and which samples a
batch is made of (`TrainInput.batch_samples`) against what the loader really delivered."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from safetensors.torch import load_file

from data import build_train_input
from models import build_backbone
from models.weights import load_backbone
from tests.launching import TINY
from trainer.config import DistillConfig, load_config
from trainer.distill import Distillation, DistillError, Teacher, TeacherCache, load_teacher

TEACHER_SIZE, STUDENT_SIZE = 16, 12


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher `model.safetensors` of this project (an untrained r_lite, 16-d), written as the trainer writes one."""
    from models.cli import atomic_output
    from trainer.checkpoint import model_metadata, save_model

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    with atomic_output(path) as tmp:
        save_model(tmp, build_backbone("r_lite", num_features=TEACHER_SIZE).eval(), model_metadata("r_lite", 16))
    return path


@pytest.fixture
def fresh_accelerator() -> Iterator[None]:
    AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate keeps one global state per process
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _teacher(embeddings: torch.Tensor) -> Teacher:
    return Teacher(lambda images: embeddings, embeddings.shape[1], "fixed", Path("fixed"))


def test_the_loss_equals_its_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, STUDENT_SIZE, generator=generator, dtype=torch.float64)
    teacher = torch.randn(6, TEACHER_SIZE, generator=generator, dtype=torch.float64)
    for loss in ("cosine", "l2"):
        cfg = DistillConfig(teacher="x", weight=0.7, loss=loss, relation_weight=0.3)  # type: ignore[arg-type]
        distillation = Distillation(cfg, _teacher(teacher), STUDENT_SIZE, None, None, seed=5)  # type: ignore[arg-type]
        assert distillation.projection is not None
        distillation.projection.double()
        got = distillation.loss(student, teacher).detach()
        # By hand: project, normalize both, compare; the relation term compares the two cosine-similarity matrices.
        projected = student @ distillation.projection.weight.detach().T
        p, t = projected / projected.norm(dim=1, keepdim=True), teacher / teacher.norm(dim=1, keepdim=True)
        cos = [float(p[i] @ t[i]) for i in range(6)]
        embedding = (
            sum(1 - c for c in cos) / 6
            if loss == "cosine"
            else sum(float((p[i] - t[i]).norm() ** 2) for i in range(6)) / 6
        )
        s = student / student.norm(dim=1, keepdim=True)
        relation = sum(float((s[i] @ s[j] - t[i] @ t[j]) ** 2) for i in range(6) for j in range(6)) / 36
        assert math.isclose(float(got), 0.7 * embedding + 0.3 * relation, rel_tol=1e-12), loss


def test_same_size_needs_no_projection_and_the_head_weight_scales_the_head() -> None:
    teacher = F.normalize(torch.randn(4, TEACHER_SIZE))
    cfg = DistillConfig(teacher="x", head_weight=0.25, weight=2.0)
    distillation = Distillation(cfg, _teacher(teacher), TEACHER_SIZE, None, None, seed=5)  # type: ignore[arg-type]
    assert distillation.projection is None and distillation.modules() == {}
    samples = (np.arange(4), np.zeros(4, dtype=bool))
    total = distillation.total(torch.tensor(3.0), teacher * 5, torch.zeros(4, 3, 112, 112), samples)
    assert math.isclose(float(total), 0.25 * 3.0, abs_tol=1e-6)  # the student equals the teacher: no distance


def test_a_teacher_from_every_kind_of_file_gives_the_same_embeddings(teacher_file: Path, tmp_path: Path) -> None:
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    backbone, _ = load_backbone(teacher_file)
    expected = backbone(images).detach()
    # A run folder (as a user passes runs/teacher), an insightface-style .pth state dict, an ONNX export.
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(teacher_file.read_bytes())
    torch.save({f"module.{k}": v for k, v in backbone.state_dict().items()}, tmp_path / "backbone.pth")
    from trainer.export import export_onnx

    export_onnx(backbone, tmp_path / "teacher.onnx")
    teachers = {
        "safetensors": DistillConfig(teacher=str(teacher_file)),
        "run folder": DistillConfig(teacher=str(run)),
        "pth": DistillConfig(teacher=str(tmp_path / "backbone.pth"), teacher_network="r_lite"),
        "onnx": DistillConfig(teacher=str(tmp_path / "teacher.onnx")),
    }
    for kind, cfg in teachers.items():
        teacher = load_teacher(cfg, torch.device("cpu"))
        assert teacher.embedding_size == TEACHER_SIZE, kind
        torch.testing.assert_close(teacher.embed(images), expected, rtol=1e-4, atol=1e-4, msg=kind)
    bgr = load_teacher(DistillConfig(teacher=str(teacher_file), teacher_channels="bgr"), torch.device("cpu"))
    torch.testing.assert_close(bgr.embed(images.flip(1)), expected)  # it swaps the channels back before its forward
    with pytest.raises(DistillError, match="fp16 needs a GPU"):
        load_teacher(DistillConfig(teacher=str(teacher_file), teacher_precision="fp16"), torch.device("cpu"))


def test_the_cache_keeps_both_flips_by_record_index_and_refuses_another_fingerprint(tmp_path: Path) -> None:
    fingerprint = {"format": 1, "teacher": "aaa", "num_samples": 10, "world_size": 1}
    cache = TeacherCache(tmp_path, fingerprint, 10, 4, rank=0)
    both = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    cache.add(np.array([7, 2, 5]), both)
    assert cache.lookup(np.array([2, 7]), np.array([True, False])).tolist() == [
        both[1, 1].tolist(),
        both[0, 0].tolist(),
    ]
    assert cache.lookup(np.array([2, 3]), np.array([False, False])) is None  # 3 was never embedded
    cache.flush()
    # Another process (a resumed run; another rank count reads it too) finds the entries in the shard on disk.
    again = TeacherCache(tmp_path, {**fingerprint, "world_size": 2}, 10, 4, rank=1)
    assert again.entries == 3 and again.written == 0
    assert again.lookup(np.array([5]), np.array([True])).tolist() == [both[2, 1].tolist()]
    with pytest.raises(DistillError, match=r"made with another teacher \('aaa'.*'bbb'\): delete it"):
        TeacherCache(tmp_path, {**fingerprint, "teacher": "bbb"}, 10, 4, rank=0)


def test_batch_samples_are_what_the_loader_delivered(tmp_path: Path, face_cache: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("ARCFACE_CACHE", str(face_cache))
    cfg = load_config(TINY, ["--data.num_workers", "1"])
    train_input = build_train_input(
        cfg.data, batch_size=8, seed=5, rank=0, world_size=1, device=torch.device("cpu"), bins=[]
    )
    try:
        images, _, _ = next(iter(train_input.batches(1)))
        indices, flips = train_input.batch_samples(1, 0, 8)
        assert flips.any() and not flips.all()  # both kinds in the batch: the check below means something
        plain = torch.zeros(8, 112, 112, 3, dtype=torch.uint8)
        train_input.dataset.fill_batch(list(indices), plain.numpy(), flip=False)  # type: ignore[attr-defined]
        for image, original, flipped in zip(images, plain, flips.tolist(), strict=True):
            expected = original.flip(1) if flipped else original  # (H, W, C): mirrored along W
            assert torch.equal(image.permute(1, 2, 0), expected)
    finally:
        train_input.close()


def test_the_teacher_gets_no_gradient_and_is_never_saved(
    teacher_file: Path, tmp_path: Path, fresh_accelerator: None, face_cache: Path, monkeypatch: Any
) -> None:
    """Three optimizer steps of the real trainer with a 16-d teacher and a 12-d student (so a projection)."""
    from trainer.main import run

    monkeypatch.setenv("ARCFACE_CACHE", str(face_cache))
    overrides = [
        *("--output", str(tmp_path / "run"), "--network.embedding_size", str(STUDENT_SIZE)),
        *("--distill.teacher", str(teacher_file), "--distill.cache", "true", "--schedule.max_steps", "3"),
        *("--train.save_every", "3", "--eval.every", "0"),
    ]
    trainer = run(load_config(TINY, overrides), Accelerator(cpu=True))
    distill = trainer.distill
    assert distill is not None and distill.projection is not None
    optimized = {id(p) for o in trainer.stepper.optimizers for g in o.param_groups for p in g["params"]}
    assert id(distill.projection.weight) in optimized
    teacher = distill.teacher.module
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad and p.grad is None and id(p) not in optimized for p in teacher.parameters())
    untouched = load_file(str(teacher_file))
    assert all(torch.equal(v, untouched[k]) for k, v in teacher.state_dict().items())
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000003"
    student_keys = set(build_backbone("r_lite", num_features=STUDENT_SIZE).state_dict())
    assert set(load_file(str(checkpoint / "model.safetensors"))) == student_keys
    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) == student_keys  # no projection, no teacher
    saved = load_file(str(checkpoint / "distill.safetensors"))
    assert set(saved) == {"weight", "weight::momentum_buffer"} and saved["weight"].shape == (16, STUDENT_SIZE)
    assert torch.equal(saved["weight"], distill.projection.weight.detach())
    # Nothing else in the checkpoint is the teacher's: no file, no tensor of its shape family beyond the student's.
    names = {p.name for p in checkpoint.iterdir()}
    assert names == {
        "model.safetensors",
        "optimizer.safetensors",
        "head-rank00000-of-00001.safetensors",
        "rng-rank00000.safetensors",
        "distill.safetensors",
        "trainer_state.json",
        "manifest.json",
    }
    with safe_open(str(checkpoint / "optimizer.safetensors"), framework="pt") as handle:
        assert {key.split("::")[0] for key in handle.keys()} <= student_keys
    # The cache holds the 48 samples the three steps of 16 saw, both flips, the teacher's size.
    shards = sorted((tmp_path / "run" / "teacher_cache").glob("shard-rank*.safetensors"))
    assert sum(load_file(str(s))["index"].numel() for s in shards) == 48
    assert load_file(str(shards[0]))["embeddings"].shape[1:] == (2, TEACHER_SIZE)
    # The exported model is the student alone: 12-d embeddings.
    from trainer.export import main as export

    assert (
        export(["onnx", "--weights", str(tmp_path / "run" / "model.safetensors"), "--out", str(tmp_path / "s.onnx")])
        == 0
    )
    import onnx

    output = onnx.load(str(tmp_path / "s.onnx")).graph.output[0]
    assert output.type.tensor_type.shape.dim[1].dim_value == STUDENT_SIZE


def test_every_head_distils(teacher_file: Path, tmp_path: Path, fresh_accelerator: None) -> None:
    """One optimizer step of the real trainer per registered head, with a teacher and Partial FC sampling (the heads'
    own tests check their numbers; this checks each composes with distillation)."""
    from heads import list_heads
    from trainer.main import run

    for name in list_heads():
        overrides = [
            *("--output", str(tmp_path / name), "--head.name", name, "--head.sample_rate", "0.5"),
            *("--data.source", "synthetic", "--data.num_classes", "20", "--data.num_images", "32"),
            *("--network.embedding_size", str(STUDENT_SIZE), "--distill.teacher", str(teacher_file)),
            *("--train.batch_size", "8", "--schedule.max_steps", "1", "--eval.every", "0"),
        ]
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        trainer = run(load_config(TINY, overrides), Accelerator(cpu=True))
        losses = [loss for _, loss in trainer.state.losses()]
        assert len(losses) == 1 and math.isfinite(losses[0]), name
