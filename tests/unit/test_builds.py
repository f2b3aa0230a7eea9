"""Each package builds its part from its recipe section: `models.config.build_network`, `data.build_train_input`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from data import build_train_input
from data.config import DataConfig
from data.faces import FacesConfig
from models.config import NetworkConfig, build_network
from tests.launching import TINY
from trainer.config import ConfigError, load_config


def _grads(gradient_checkpointing: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_network(
        NetworkConfig(name="r_lite", embedding_size=16, gradient_checkpointing=gradient_checkpointing)
    )
    assert model.gradient_checkpointing is gradient_checkpointing  # the recipe key reaches the backbone
    model.train()
    images = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    model(images).square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_gradient_checkpointing_from_the_recipe_gives_the_same_gradients() -> None:
    plain, recomputed = _grads(False), _grads(True)
    assert len(plain) == len(recomputed) > 10
    for a, b in zip(plain, recomputed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_eval_every_accepts_epoch() -> None:
    assert load_config(TINY, ["--eval.every", "epoch"], check_files=False).eval.every == "epoch"
    assert load_config(TINY, ["--eval.every", "7"], check_files=False).eval.every == 7
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(TINY, ["--eval.every", "weekly"], check_files=False)
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(TINY, ["--eval.every", "-1"], check_files=False)


def test_build_train_input_gives_the_loop_everything(face_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCFACE_CACHE", str(face_cache))
    generated = FacesConfig(**yaml.safe_load(TINY.read_text())["data"]["generated"])
    cfg = DataConfig(source="generated", num_workers=0, generated=generated)
    train_input = build_train_input(cfg, batch_size=8, seed=3, rank=1, world_size=2, device=torch.device("cpu"))
    try:
        assert train_input.num_classes == 12 and train_input.num_samples == 96
        assert [Path(b).name for b in train_input.bins] == ["val.bin"]
        assert len(train_input.sampler) == 48  # this rank's half
        batch = next(train_input.batches(epoch=0))
        images, labels, bad_keys = train_input.to_device(batch, torch.bfloat16, torch.channels_last)
        assert images.shape == (8, 3, 112, 112) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
        assert bad_keys.tolist() == [-1] * 8 and train_input.bad_data.seen == 8
        # The keys a log line names are the records the batch was made of (their labels agree).
        dataset = train_input.dataset
        by_key = {dataset.sample_key(i): i for i in range(len(dataset))}  # type: ignore[attr-defined]
        keys = train_input.sample_keys(0, 0, 8)
        assert [int(dataset.labels[by_key[k]]) for k in keys] == labels.tolist()  # type: ignore[attr-defined]
        state = train_input.state_dict()
        assert state["bad_data"]["seen"] == 8
    finally:
        train_input.close()


def test_gpu_decoding_on_a_cpu_is_refused_by_the_data_package() -> None:
    with pytest.raises(ValueError, match="data.decode 'gpu' needs a CUDA device"):
        build_train_input(
            DataConfig(source="generated", decode="gpu"),
            batch_size=8,
            seed=0,
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
        )
