"""A head is one file: a toy head registered from this test file (its class, its settings and its registration, as
docs/architecture.md, "A new head is one file", says) is accepted by the recipe loader, built by `heads.build_head`
and trained by the real trainer, with no change anywhere else. Also: the `head:` section's composition, and the
registrations the registry refuses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file
from torch import Tensor

from heads import HeadConfig, PartialFC, PartialFCOptions, ScaleSettings, build_head, list_heads
from heads.registry import register_head, unregister_head
from models.recipe import key, key_help
from trainer.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "e2e" / "tiny.yaml"
TOY = "toy_cosface"


@pytest.fixture
def toy() -> Iterator[type[PartialFC]]:
    """Register the toy head for one test, and forget it after (other tests count the registered heads)."""

    # ---- the whole toy head: what a new head module holds ----
    @dataclasses.dataclass
    class ToySettings(ScaleSettings):  # `s` is declared by ScaleSettings, shared alike with every head
        toy_margin: float = key(0.2, help="the toy's additive cosine margin")

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0.0 <= self.toy_margin < 1.0:
                raise ValueError(f"toy_margin must be in [0, 1), got {self.toy_margin}")

    @register_head(TOY, settings=ToySettings)
    class ToyHead(PartialFC):
        """CosFace: s * (cos(theta_y) - toy_margin) on the target, s * cos elsewhere."""

        def __init__(self, options: PartialFCOptions, settings: ToySettings) -> None:
            self.s, self.toy_margin = settings.s, settings.toy_margin
            super().__init__(options)

        def logits(self, cos_theta: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
            if cos_theta.shape[1] == 0:  # this rank holds no scored center
                return cos_theta * self.s
            column = labels.clamp_min(0).unsqueeze(1)
            cos_target = cos_theta.gather(1, column).squeeze(1)
            target = torch.where(labels >= 0, cos_target - self.toy_margin, cos_target)
            return cos_theta.scatter(1, column, target.unsqueeze(1)) * self.s

    # ---- end of the toy head ----
    try:
        yield ToyHead
    finally:
        unregister_head(TOY)
        assert TOY not in list_heads()
        assert "toy_margin" not in {f.name for f in dataclasses.fields(HeadConfig.resolve_section())}


def test_toy_head_key_is_a_recipe_key_and_builds(toy: type[PartialFC]) -> None:
    cfg = load_config(TINY, ["--head.name", TOY, "--head.toy_margin", "0.35"], check_files=False)
    assert (cfg.head.name, cfg.head.toy_margin, cfg.head.s) == (TOY, 0.35, 16.0)  # type: ignore[attr-defined]
    field = {f.name: f for f in dataclasses.fields(cfg.head)}["toy_margin"]
    assert key_help(field) == "the toy's additive cosine margin"  # its meaning travels with the key (--help)
    head = build_head(cfg.head, embedding_size=8, num_classes=5, rank=0, world_size=1)
    assert isinstance(head, toy) and head.toy_margin == 0.35  # type: ignore[attr-defined]
    assert (head.update, head.lazy_sync_every, head.sample_rate) == ("lazy", 100, 1.0)  # the shared options

    # Its loss is CosFace's, computed here independently.
    head = head.double()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, dtype=torch.float64, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
    expected = F.cross_entropy(16.0 * (cos - 0.35 * F.one_hot(labels, 5).double()), labels)
    torch.testing.assert_close(head(x, labels), expected, rtol=1e-12, atol=1e-12)


def test_toy_head_settings_are_validated_at_load(toy: type[PartialFC]) -> None:
    with pytest.raises(ConfigError, match=r"head\.toy_margin must be in \[0, 1\), got 1\.5"):
        load_config(TINY, ["--head.name", TOY, "--head.toy_margin", "1.5"], check_files=False)
    # Every registered head's settings are checked, whichever head the recipe chooses (as for the built-in heads).
    with pytest.raises(ConfigError, match=r"head\.toy_margin must be in \[0, 1\), got -0\.1"):
        load_config(TINY, ["--head.toy_margin", "-0.1"], check_files=False)


def test_toy_head_trains_in_the_real_trainer(toy: type[PartialFC], tmp_path: Path) -> None:
    """`trainer.main.run` in this process: 2 optimizer steps of r_lite on synthetic images with the toy head."""
    from trainer.main import run

    overrides = {
        "output": str(tmp_path / "run"),
        "head.name": TOY,
        "head.toy_margin": 0.3,
        "head.sample_rate": 0.5,  # Partial FC's sampling and the lazy row update come with the base class
        "data.source": "synthetic",
        "data.num_classes": 10,
        "data.num_images": 32,
        "train.batch_size": 8,
        "train.save_every": 2,
        "schedule.max_steps": 2,
    }
    cfg = load_config(TINY, [item for k, v in overrides.items() for item in (f"--{k}", str(v))])
    AcceleratorState._reset_state(reset_partial_state=True)  # Accelerate keeps one global state per process
    GradientState._reset_state()
    try:
        trainer = run(cfg, Accelerator(cpu=True))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert isinstance(trainer.head, toy) and trainer.state.step == 2
    losses = [loss for _, loss in trainer.state.losses()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    # The centers moved from their seeded start; the run's config.yaml holds the toy's key.
    start = build_head(cfg.head, embedding_size=32, num_classes=10, rank=0, world_size=1)
    start.reset_parameters(seed=cfg.train.seed)
    shard = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "head-rank00000-of-00001.safetensors"))
    assert shard["weight"].shape == (10, 32) and not torch.allclose(shard["weight"], start.weight.detach())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["head"]["name"], saved["head"]["toy_margin"]) == (TOY, 0.3)


def test_section_is_composed_once_per_set_of_heads(toy: type[PartialFC]) -> None:
    section = HeadConfig.resolve_section()
    assert section is HeadConfig.resolve_section() and issubclass(section, HeadConfig)
    names = [f.name for f in dataclasses.fields(section)]
    assert names[:4] == ["name", "sample_rate", "update", "lazy_sync_every"]  # the keys every head shares
    assert names.count("s") == 1 and {"m2", "adaface_m", "num_subcenters", "toy_margin"} <= set(names)


def test_a_head_section_lacking_a_head_builds_it_with_its_defaults() -> None:
    """A head registered after a section class was composed: build_head takes its settings' defaults."""
    head = build_head(HeadConfig(name="adaface"), embedding_size=4, num_classes=3, rank=0, world_size=1)
    assert (head.s, head.m, head.h) == (64.0, 0.4, 0.333)  # type: ignore[attr-defined]


def _settings(name: str, tp: type, default: object, help: str = "a key") -> type:
    return dataclasses.make_dataclass("Clash", [(name, tp, key(default, help=help))])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            _settings("adaface_m", float, 0.3, "AdaFace's margin"),
            r"'adaface_m' is declared as \(<class 'float'>, default 0\.3, \"AdaFace's margin\"\) by Clash, but as "
            r"\(<class 'float'>, default 0\.4, \"AdaFace's margin\"\) by AdaFaceSettings \(head 'adaface'\)",
        ),
        (_settings("adaface_m", int, 0, "AdaFace's margin"), r"'adaface_m' is declared as \(<class 'int'>, default 0,"),
        (_settings("s", float, 64.0, "the scale"), r"'s' is declared as .*'the scale'.* declared alike"),
        (_settings("sample_rate", float, 1.0), r"'sample_rate' is taken by the section's own keys \(HeadConfig\)"),
        (_settings("settings", float, 1.0), r"'settings' is taken by the section's own keys"),
        (dataclasses.make_dataclass("NoDefault", [("toy_x", float)]), r"'toy_x' needs a default"),
        (dict, "settings must be a dataclass"),
    ],
)
def test_clashing_settings_are_refused_at_registration(settings: type, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        register_head("toy_clash", settings=settings)(PartialFC)
    assert "toy_clash" not in list_heads()


def test_a_key_declared_alike_may_be_shared() -> None:
    """A settings class reusing another head's key with the same declaration (sub-center ArcFace reuses the combined
    margin's keys by inheriting `MarginSettings`) joins the section; the key stays one key."""
    from heads.adaface import AdaFaceSettings

    register_head("toy_shared", settings=AdaFaceSettings)(PartialFC)
    try:
        assert "toy_shared" in list_heads()
        assert [f.name for f in dataclasses.fields(HeadConfig.resolve_section())].count("adaface_m") == 1
    finally:
        unregister_head("toy_shared")
