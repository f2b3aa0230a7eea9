"""Backbones: registry, shapes, insightface state-dict compatibility, an independent functional forward, FLOPs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import IResNet, build_backbone, count_flops, list_backbones

MANIFEST_DIR = Path(models.__file__).parent / "manifests"
# Backbones whose state dict must match a released insightface checkpoint (manifests made by
# tests/fixtures/make_iresnet_manifests.py from insightface's own code).
INSIGHTFACE_BACKBONES = ["r18", "r34", "r50", "r100", "r200"]
# Above this many forward MACs a full-width forward+backward costs seconds on 2 cores; such backbones run the
# forward test with narrow stages instead (same depth and code path) and are covered at full width by the manifest.
FULL_WIDTH_MAC_LIMIT = 3_000_000_000
NARROW_WIDTHS = (8, 16, 32, 64)


def load_manifest(name: str) -> list[list[object]]:
    return json.loads((MANIFEST_DIR / f"{name}.json").read_text())


def state_dict_entries(model: nn.Module) -> list[list[object]]:
    return [[key, list(tensor.shape)] for key, tensor in model.state_dict().items()]


def calibrate_random_stats(model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> None:
    """Give every BN/PReLU random, non-trivial values while keeping activations at a sane scale.

    Affine BN parameters and PReLU slopes are drawn at random; running statistics are set to one batch's
    statistics (momentum 1) and then jittered, so eval mode differs from train mode and from the identity.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.momentum = 1.0
            elif isinstance(module, nn.PReLU):
                module.weight.copy_(0.5 * torch.rand(module.weight.shape, generator=generator))
        model.train()
        model(images)
        for module in norms:
            module.momentum = 0.1
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.add_(0.05 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.mul_(0.8 + 0.4 * torch.rand(module.running_var.shape, generator=generator))


def reference_iresnet_forward(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """IResNet eval-mode forward written from the insightface layout (docs: formats.md), using only functional ops."""

    def bn(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(
            x,
            state[f"{prefix}.running_mean"],
            state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"],
            state[f"{prefix}.bias"],
            training=False,
            eps=1e-5,
        )

    x = F.prelu(bn(F.conv2d(images, state["conv1.weight"], padding=1), "bn1"), state["prelu.weight"])
    for stage in range(1, 5):
        block = 0
        while f"layer{stage}.{block}.conv1.weight" in state:
            p = f"layer{stage}.{block}"
            stride = 2 if block == 0 else 1  # each stage downsamples in its first block
            out = F.conv2d(bn(x, f"{p}.bn1"), state[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(out, f"{p}.bn2"), state[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in state:
                shortcut = bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            else:
                shortcut = x
            x = out + shortcut
            block += 1
    x = bn(x, "bn2").flatten(1)
    x = F.linear(x, state["fc.weight"], state["fc.bias"])
    return bn(x, "features")


@pytest.mark.parametrize("name", list_backbones())
def test_forward_backward(name: str) -> None:
    with torch.device("meta"):
        full_macs = count_flops(build_backbone(name))
    widths = {} if full_macs <= FULL_WIDTH_MAC_LIMIT else {"widths": NARROW_WIDTHS}
    torch.manual_seed(0)
    model = build_backbone(name, num_features=64, **widths)
    images = torch.randn(2, 3, 112, 112)

    embeddings = model(images)
    assert embeddings.shape == (2, 64)
    # A random projection, not sum(x**2): the final BatchNorm1d makes the squared norm of a batch constant.
    (embeddings * torch.randn(2, 64)).sum().backward()

    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, param_name
            continue
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    assert model.get_submodule("conv1").weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", INSIGHTFACE_BACKBONES)
def test_state_dict_matches_insightface_manifest(name: str) -> None:
    # Names and shapes only, so the meta device avoids allocating and initialising up to 119M parameters.
    with torch.device("meta"):
        model = build_backbone(name)
    assert state_dict_entries(model) == load_manifest(name)


def state_dict_from_manifest(name: str, filled: bool) -> dict[str, torch.Tensor]:
    """A state dict with the manifest's keys and shapes; ``filled``: every tensor holds its own index."""
    state = {}
    for index, (key, shape) in enumerate(load_manifest(name)):
        assert isinstance(key, str) and isinstance(shape, list)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(index, dtype=torch.long)
        else:
            state[key] = torch.full(shape, float(index)) if filled else torch.empty(shape)
    return state


@pytest.mark.parametrize("name", INSIGHTFACE_BACKBONES)
def test_load_state_dict_built_from_manifest(name: str) -> None:
    state = state_dict_from_manifest(name, filled=False)
    # A meta model with assign=True runs the same strict key and shape checks as a copying load, without
    # allocating, initialising and copying up to 119M parameters.
    with torch.device("meta"):
        model = build_backbone(name)
    model.load_state_dict(state, strict=True, assign=True)
    loaded = model.state_dict()
    assert all(loaded[key].data_ptr() == value.data_ptr() for key, value in state.items())
    assert model.features.weight.requires_grad is False


def test_load_state_dict_copies_into_an_initialised_model() -> None:
    state = state_dict_from_manifest("r18", filled=True)
    model = build_backbone("r18")
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_every_insightface_backbone_is_registered() -> None:
    assert set(INSIGHTFACE_BACKBONES) <= set(list_backbones())


def test_lite_backbone_uses_the_same_key_names() -> None:
    lite_keys = set(build_backbone("r_lite").state_dict())
    # r18 has two blocks per stage; dropping each stage's second block (layerN.1.*) leaves r_lite's layout.
    r18_first_blocks = {key for key in build_backbone("r18").state_dict() if not re.match(r"layer\d\.1\.", key)}
    assert lite_keys == r18_first_blocks


def test_matches_independent_functional_forward() -> None:
    generator = torch.Generator().manual_seed(0)
    model = build_backbone("r18")
    calibrate_random_stats(model, torch.randn(4, 3, 112, 112, generator=generator), generator)
    with torch.no_grad():
        model.features.weight.mul_(0.5 + torch.rand(512, generator=generator))
    model.eval()
    images = torch.randn(2, 3, 112, 112, generator=generator)

    with torch.no_grad():
        expected = reference_iresnet_forward(model.state_dict(), images)
        actual = model(images)
    assert expected.abs().max() > 0.1  # a collapsed (e.g. all-zero) output would make the comparison vacuous
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_features_weight_is_frozen_at_one() -> None:
    model = build_backbone("r_lite", num_features=32)
    assert isinstance(model.features, nn.BatchNorm1d)
    assert model.features.weight.requires_grad is False
    assert torch.equal(model.features.weight, torch.ones(32))
    assert model.fc.in_features == 128 * 7 * 7 and model.fc.out_features == 32


def test_init_follows_insightface() -> None:
    model = build_backbone("r_lite")
    conv_std = model.layer4[0].conv2.weight.std().item()  # 128 * 128 * 9 samples
    assert abs(conv_std - 0.1) < 0.005
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dropout_acts_on_train_mode_only(dropout: float) -> None:
    torch.manual_seed(0)
    model = build_backbone("r_lite", num_features=16, dropout=dropout).eval()
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        eval_out = model(images)
        # Only the dropout in train mode: BatchNorm in train mode would change the output on its own.
        model.dropout.train()
        dropout_out = model(images)
    assert torch.equal(eval_out, dropout_out) == (dropout == 0.0)


def test_gradient_checkpointing_gives_same_output_and_grads() -> None:
    torch.manual_seed(0)
    plain = build_backbone("r_lite", num_features=16)
    checkpointed = build_backbone("r_lite", num_features=16, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 112, 112)
    projection = torch.randn(2, 16)

    outputs = []
    for model in (plain, checkpointed):
        out = model(images)
        (out * projection).sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize(("name", "expected_gmacs"), [("r18", 2.6), ("r50", 6.3), ("r100", 12.1)])
def test_count_flops_matches_published_figures(name: str, expected_gmacs: float) -> None:
    with torch.device("meta"):
        model = build_backbone(name)
    assert count_flops(model) / 1e9 == pytest.approx(expected_gmacs, rel=0.03)


def test_count_flops_closed_form_for_lite() -> None:
    model = build_backbone("r_lite", widths=(8, 8, 8, 8), num_features=4)
    # stem 3->8 at 112^2; per stage at input res s: conv1 8->8 at s^2, conv2 at (s/2)^2, 1x1 shortcut at (s/2)^2.
    expected = 112 * 112 * 8 * 3 * 9
    for size in (112, 56, 28, 14):
        expected += size * size * 8 * 8 * 9 + (size // 2) ** 2 * 8 * 8 * (9 + 1)
    expected += 8 * 7 * 7 * 4
    assert count_flops(model) == expected
    assert model.training  # count_flops restores the mode it found


def test_unknown_backbone_names_the_bad_name() -> None:
    with pytest.raises((KeyError, ValueError), match="r9000") as error:
        build_backbone("r9000")
    assert "r50" in str(error.value) and "r_lite" in str(error.value)


def test_registered_insightface_backbones_are_iresnets_with_documented_layers() -> None:
    expected = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}
    expected |= {"r200": (6, 26, 60, 6), "r_lite": (1, 1, 1, 1)}
    for name, layers in expected.items():
        with torch.device("meta"):
            model = build_backbone(name)
        assert isinstance(model, IResNet)
        assert model.layers == layers
