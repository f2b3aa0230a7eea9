"""Backbones: registry, shapes, insightface state-dict compatibility, independent functional forwards, FLOPs."""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models import (
    BackboneOptionError,
    IResNet,
    MobileFaceNet,
    VisionTransformer,
    build_backbone,
    count_flops,
    list_backbones,
)
from models.vit import drop_path
from tests.fixtures.make_zoo_manifests import NAMES as INSIGHTFACE_NAMES
from tests.fixtures.make_zoo_manifests import OUTPUTS_PATH, seeded_images, seeded_state

MANIFEST_DIR = Path(models.__file__).parent / "manifests"
# Every name of insightface's get_model this project registers; their manifests were written by insightface's own
# code (tests/fixtures/make_zoo_manifests.py; r18..r200 also by make_iresnet_manifests.py).
INSIGHTFACE_BACKBONES = INSIGHTFACE_NAMES
# The registry-wide forward, determinism and checkpointing tests run every backbone in a small variant of its
# family (same classes and code path, tiny widths; same depth except r2060), which costs well under a second on 2
# cores. The full sizes are covered by the meta-device shape and FLOP test, the manifests and the reference outputs.
SMALL_VARIANTS: dict[type[nn.Module], dict[str, Any]] = {
    IResNet: {"widths": (4, 8, 8, 16)},
    MobileFaceNet: {"scale": 1, "blocks": (1, 1, 1, 1)},  # blocks[0] = 1 keeps mbf's grouped-conv first stage
    VisionTransformer: {"embed_dim": 16, "num_heads": 2},
}
# Deeper than r50, an iresnet only repeats the same block: its depth is checked on the meta device (shapes, FLOPs,
# manifests), its blocks at a depth that runs in a fraction of a second.
DEEP_IRESNETS = {"r100", "r200", "r2060"}
# On top of the family's small variant, what distinguishes a name: mbf_large's first stage is residual.
SMALL_OVERRIDES: dict[str, dict[str, Any]] = {"mbf_large": {"blocks": (2, 1, 1, 1)}}


def load_manifest(name: str) -> list[list[object]]:
    path = MANIFEST_DIR / f"{name}.json"
    if not path.exists():  # the very deep ones are stored gzipped
        return json.loads(gzip.decompress((MANIFEST_DIR / f"{name}.json.gz").read_bytes()))
    return json.loads(path.read_text())


def small_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A small variant of ``name``: its family's tiny widths, the registered name's other settings."""
    if name in DEEP_IRESNETS:  # 50 to 1,030 blocks cost seconds even at tiny widths: the same class, shallower
        return IResNet(layers=(1, 2, 2, 1), **SMALL_VARIANTS[IResNet], **kwargs)
    # The family from the name (building the full model, even on the meta device, costs seconds for the deep ones);
    # the meta-device test below checks every name builds the class this assumes.
    family = VisionTransformer if name.startswith("vit") else MobileFaceNet if name.startswith("mbf") else IResNet
    return build_backbone(name, **(SMALL_VARIANTS[family] | SMALL_OVERRIDES.get(name, {})), **kwargs)


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
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        model.train()
        if isinstance(model, VisionTransformer):  # batch statistics of all patches, not of a masked subset
            mask_ratio, model.mask_ratio = model.mask_ratio, 0.0
            model(images)
            model.mask_ratio = mask_ratio
        else:
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
    torch.manual_seed(0)
    model = small_backbone(name, num_features=64)
    images = torch.randn(2, 3, 112, 112)

    embeddings = model(images)  # training mode: patch masking and stochastic depth active where configured
    assert embeddings.shape == (2, 64)
    # A random projection, not sum(x**2): the final BatchNorm1d makes the squared norm of a batch constant.
    (embeddings * torch.randn(2, 64)).sum().backward()

    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, param_name
            continue
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # the stem / patch embedding
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_backbones())
def test_eval_mode_is_deterministic_and_per_sample(name: str) -> None:
    """No masking, drop path or batch statistics in eval: same output whatever the RNG state or the batch."""
    torch.manual_seed(0)
    model = small_backbone(name, num_features=16).eval()
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        first = model(images)
        torch.manual_seed(1)
        again = model(images)
        alone = model(images[1:2])
    assert torch.equal(first, again)
    torch.testing.assert_close(alone, first[1:2], atol=1e-5, rtol=1e-4)
    assert model.training is False


@pytest.mark.parametrize("name", list_backbones())
def test_gradient_checkpointing_gives_same_output_and_grads(name: str) -> None:
    """Training mode, with the same seed: checkpointed blocks replay their randomness (drop path) in backward."""
    torch.manual_seed(0)
    plain = small_backbone(name, num_features=16)
    checkpointed = small_backbone(name, num_features=16, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 112, 112)
    projection = torch.randn(2, 16)

    outputs = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        out = model(images)
        (out * projection).sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    for (param_name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=param_name)


@functools.cache
def meta_backbone(name: str) -> nn.Module:
    """The full-size backbone on the meta device, built once per session (the deep ones take seconds)."""
    with torch.device("meta"):
        return build_backbone(name)


@functools.cache
def full_size_macs(name: str) -> int:
    return count_flops(meta_backbone(name))


# r2060's meta forward alone costs about 15 s of CPU: it is left out here (count_flops runs the same code for it as
# for r200; its figure, 238.9 GMACs, is in the README).
@pytest.mark.parametrize("name", [name for name in list_backbones() if name != "r2060"])
def test_count_flops_is_positive(name: str) -> None:
    family = VisionTransformer if name.startswith("vit") else MobileFaceNet if name.startswith("mbf") else IResNet
    assert isinstance(meta_backbone(name), family)  # the family small_backbone assumes
    assert full_size_macs(name) > 0


@pytest.mark.parametrize("name", INSIGHTFACE_BACKBONES)
def test_state_dict_matches_insightface_manifest(name: str) -> None:
    # Names and shapes only, so the meta device avoids allocating and initialising up to 1.1G parameters.
    assert state_dict_entries(meta_backbone(name)) == load_manifest(name)


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
    # allocating, initialising and copying up to 1.1G parameters. (Assigning same-named, same-shaped tensors leaves
    # the shared meta model as valid for the other tests as before.)
    model = meta_backbone(name)
    model.load_state_dict(state, strict=True, assign=True)
    loaded = model.state_dict()
    assert all(loaded[key].data_ptr() == value.data_ptr() for key, value in state.items())
    if isinstance(model, IResNet):
        assert model.features.weight.requires_grad is False


def test_load_state_dict_copies_into_an_initialised_model() -> None:
    state = state_dict_from_manifest("r18", filled=True)
    model = build_backbone("r18")
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_every_insightface_backbone_is_registered_with_a_manifest() -> None:
    expected = {"r18", "r34", "r50", "r100", "r200", "r2060", "mbf", "mbf_large", "vit_t", "vit_t_dp005_mask0"}
    expected |= {"vit_s", "vit_s_dp005_mask_0", "vit_b", "vit_b_dp005_mask_005", "vit_l_dp005_mask_005", "vit_h"}
    assert set(INSIGHTFACE_BACKBONES) == expected
    assert set(list_backbones()) == expected | {"r_lite"}
    for name in expected:
        assert load_manifest(name), name


def test_lite_backbone_uses_the_same_key_names() -> None:
    lite_keys = set(build_backbone("r_lite").state_dict())
    # r18 has two blocks per stage; dropping each stage's second block (layerN.1.*) leaves r_lite's layout.
    r18_first_blocks = {key for key in build_backbone("r18").state_dict() if not re.match(r"layer\d\.1\.", key)}
    assert lite_keys == r18_first_blocks


def test_iresnet_matches_independent_functional_forward() -> None:
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


# insightface's published GFLOPs (ptflops MACs, plus its extra_gflops for ViT attention): README tables.
@pytest.mark.parametrize(
    ("name", "expected_gmacs", "rel"),
    [
        ("r18", 2.6, 0.03),
        ("r50", 6.3, 0.03),
        ("r100", 12.1, 0.03),
        ("mbf", 0.45, 0.05),  # ptflops also counts BatchNorm and PReLU, a larger share in this small network
        ("vit_t", 1.5, 0.03),
        ("vit_s", 5.7, 0.03),
        ("vit_b", 11.4, 0.03),
        ("vit_l_dp005_mask_005", 25.3, 0.03),
    ],
)
def test_count_flops_matches_published_figures(name: str, expected_gmacs: float, rel: float) -> None:
    assert full_size_macs(name) / 1e9 == pytest.approx(expected_gmacs, rel=rel)


def test_count_flops_closed_form_for_a_small_vit() -> None:
    dim, depth, features, tokens = 16, 2, 8, 144
    model = VisionTransformer(embed_dim=dim, depth=depth, num_heads=2, num_features=features, mask_ratio=0.5)
    expected = tokens * dim * 3 * 9 * 9  # patch embedding: one 9x9x3 kernel per output
    per_block = tokens * (dim * 3 * dim + dim * dim + 2 * dim * 4 * dim)  # qkv, proj, fc1, fc2
    per_block += 2 * tokens * tokens * dim  # q k^T and attn v, over all heads
    expected += depth * per_block + tokens * dim * dim + dim * features  # the feature head's two Linears
    assert count_flops(model) == expected  # eval mode: all 144 tokens, masking is a training-only option
    assert model.training


def test_count_flops_closed_form_for_a_small_mobilefacenet() -> None:
    model = MobileFaceNet(blocks=(1, 1, 1, 1), scale=1, num_features=8)

    def bottleneck(size: int, stride: int, c_in: int, hidden: int, c_out: int) -> int:
        out = size // stride
        return size * size * c_in * hidden + out * out * hidden * 9 + out * out * hidden * c_out

    expected = 56 * 56 * 64 * 27 + 56 * 56 * 64 * 9  # stem; 3x3 conv in 64 groups of 1 channel (scale 1)
    expected += bottleneck(56, 2, 64, 128, 64) + bottleneck(28, 1, 64, 128, 64)
    expected += bottleneck(28, 2, 64, 256, 128) + bottleneck(14, 1, 128, 256, 128)
    expected += bottleneck(14, 2, 128, 512, 128) + bottleneck(7, 1, 128, 256, 128)
    expected += 7 * 7 * 128 * 512 + 512 * 49 + 512 * 8  # conv_sep, GDC depthwise 7x7, Linear
    assert count_flops(model) == expected


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
    expected |= {"r200": (6, 26, 60, 6), "r2060": (3, 128, 896, 3), "r_lite": (1, 1, 1, 1)}
    for name, layers in expected.items():
        model = meta_backbone(name)
        assert isinstance(model, IResNet)
        assert model.layers == layers


# --------------------------------------------------------------------------------------------------------------
# MobileFaceNet and ViT: independent functional forwards, insightface's outputs, options


def _bn(state: dict[str, torch.Tensor], x: torch.Tensor, prefix: str, eps: float = 1e-5) -> torch.Tensor:
    return F.batch_norm(
        x,
        state[f"{prefix}.running_mean"],
        state[f"{prefix}.running_var"],
        state[f"{prefix}.weight"],
        state[f"{prefix}.bias"],
        training=False,
        eps=eps,
    )


def reference_mobilefacenet_forward(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """MobileFaceNet eval forward from the insightface key layout; strides, padding and groups read from shapes."""

    def unit(x: torch.Tensor, prefix: str, stride: int = 1) -> torch.Tensor:
        weight = state[f"{prefix}.layers.0.weight"]
        groups = x.shape[1] // weight.shape[1]
        x = F.conv2d(
            x, weight, stride=stride, padding=weight.shape[-1] // 2 if weight.shape[-1] == 3 else 0, groups=groups
        )
        x = _bn(state, x, f"{prefix}.layers.1")
        prelu = state.get(f"{prefix}.layers.2.weight")
        return x if prelu is None else F.prelu(x, prelu)

    def bottleneck(x: torch.Tensor, prefix: str, stride: int, residual: bool) -> torch.Tensor:
        out = unit(x, f"{prefix}.layers.0")
        out = unit(out, f"{prefix}.layers.1", stride)
        out = unit(out, f"{prefix}.layers.2")
        return out + x if residual else out

    def stage(x: torch.Tensor, prefix: str) -> torch.Tensor:
        block = 0
        while f"{prefix}.layers.{block}.layers.0.layers.0.weight" in state:
            x = bottleneck(x, f"{prefix}.layers.{block}", 1, residual=True)
            block += 1
        return x

    x = unit(images, "layers.0", stride=2)
    x = unit(x, "layers.1") if "layers.1.layers.0.weight" in state else stage(x, "layers.1")
    for index in (2, 4, 6):  # the downsampling bottlenecks, each followed by a residual stage
        x = stage(bottleneck(x, f"layers.{index}", 2, residual=False), f"layers.{index + 1}")
    x = unit(x, "conv_sep")
    x = _bn(
        state, F.conv2d(x, state["features.layers.0.layers.0.weight"], groups=x.shape[1]), "features.layers.0.layers.1"
    )
    x = F.linear(x.flatten(1), state["features.layers.2.weight"])
    return _bn(state, x, "features.layers.3")


def reference_vit_forward(state: dict[str, torch.Tensor], images: torch.Tensor, num_heads: int) -> torch.Tensor:
    """ViT eval forward from the insightface key layout, attention as an explicit softmax of q k^T."""
    patch = state["patch_embed.proj.weight"]
    x = F.conv2d(images, patch, state["patch_embed.proj.bias"], stride=patch.shape[-1]).flatten(2).transpose(1, 2)
    x = x + state["pos_embed"]
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads
    block = 0
    while f"blocks.{block}.norm1.weight" in state:
        p = f"blocks.{block}"
        h = F.layer_norm(x, (dim,), state[f"{p}.norm1.weight"], state[f"{p}.norm1.bias"])
        q, k, v = F.linear(h, state[f"{p}.attn.qkv.weight"]).split(dim, dim=-1)
        q, k, v = (t.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
        h = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + F.linear(h, state[f"{p}.attn.proj.weight"], state[f"{p}.attn.proj.bias"])
        h = F.layer_norm(x, (dim,), state[f"{p}.norm2.weight"], state[f"{p}.norm2.bias"])
        h = F.linear(
            F.relu6(F.linear(h, state[f"{p}.mlp.fc1.weight"], state[f"{p}.mlp.fc1.bias"])),
            state[f"{p}.mlp.fc2.weight"],
            state[f"{p}.mlp.fc2.bias"],
        )
        x = x + h
        block += 1
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"]).reshape(batch, tokens * dim)
    x = _bn(state, F.linear(x, state["feature.0.weight"]), "feature.1", eps=2e-5)
    return _bn(state, F.linear(x, state["feature.2.weight"]), "feature.3", eps=2e-5)


@pytest.mark.parametrize(
    ("name", "options"),
    [("mbf", {}), ("mbf_large", {"scale": 1}), ("vit_t", {"embed_dim": 32, "depth": 3, "num_heads": 4})],
)
def test_matches_independent_functional_forward(name: str, options: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(0)
    model = build_backbone(name, num_features=32, **options)
    calibrate_random_stats(model, torch.randn(4, 3, 112, 112, generator=generator), generator)
    model.eval()
    images = torch.randn(2, 3, 112, 112, generator=generator)
    with torch.no_grad():
        if isinstance(model, VisionTransformer):
            expected = reference_vit_forward(model.state_dict(), images, num_heads=options["num_heads"])
        else:
            expected = reference_mobilefacenet_forward(model.state_dict(), images)
        actual = model(images)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_matches_insightface_outputs(name: str) -> None:
    """Embeddings written by insightface's own get_model(name, num_features=64) with the same seeded weights."""
    fixture = json.loads(OUTPUTS_PATH.read_text())
    expected = torch.tensor(fixture["outputs"][name])
    model = build_backbone(name, num_features=expected.shape[1])
    entries = [(key, list(t.shape)) for key, t in model.state_dict().items()]
    model.load_state_dict(seeded_state(entries), strict=True)
    with torch.no_grad():
        actual = model.eval()(seeded_images())
    assert expected.abs().max() > 1.0
    # insightface runs attention as explicit float32 matmuls, here through SDPA: about 4e-6 apart.
    torch.testing.assert_close(actual, expected, atol=5e-5, rtol=1e-5)


def _tokens_entering_blocks(model: VisionTransformer, images: torch.Tensor) -> int:
    seen: list[int] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("vit_t", 129),  # int(144 * 0.9)
        ("vit_b_dp005_mask_005", 136),  # int(144 * 0.95): insightface masks 10 % here (its issues #2219, #2291)
        ("vit_t_dp005_mask0", 144),
        ("vit_h", 144),
    ],
)
def test_patch_masking_uses_the_configured_ratio_in_training_only(name: str, kept: int) -> None:
    small = {"embed_dim": 16, "num_heads": 2, "depth": 1, "num_features": 8}
    model = build_backbone(name, **small)
    assert isinstance(model, VisionTransformer)
    images = torch.randn(3, 3, 112, 112)
    assert _tokens_entering_blocks(model.train(), images) == kept
    assert _tokens_entering_blocks(model.eval(), images) == 144


def test_masked_positions_hold_the_mask_token() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=16, depth=1, num_heads=2, num_features=8, mask_ratio=0.25)
    seen: list[torch.Tensor] = []
    model.feature.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model.train()(torch.randn(3, 3, 112, 112))
    tokens = seen[0].reshape(3, 144, 16)
    is_mask_token = (tokens == model.mask_token).all(dim=-1)
    assert is_mask_token.sum(dim=1).tolist() == [144 - 108] * 3  # int(144 * 0.75) = 108 kept per sample
    assert not torch.equal(is_mask_token[0], is_mask_token[1])  # drawn per sample

    (model(torch.randn(3, 3, 112, 112)) * torch.randn(3, 8)).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_drop_path_drops_whole_samples_and_keeps_the_mean() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    dropped = drop_path(x, 0.25, training=True)
    per_sample = dropped[:, 0, 0]
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert torch.equal(dropped, per_sample[:, None, None].expand_as(x))
    assert (per_sample == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert drop_path(x, 0.25, training=False) is x
    rates = [block.drop_path_rate for block in build_backbone("vit_t", embed_dim=16, num_heads=2).blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)], abs=1e-7)  # 0 at the first block


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_dropout_is_refused_where_there_is_no_embedding_dropout(name: str) -> None:
    with pytest.raises(BackboneOptionError, match="no embedding dropout.*got 0.1"):
        build_backbone(name, dropout=0.1)


@pytest.mark.parametrize(
    ("name", "embed_dim", "depth", "drop_path_rate", "mask_ratio"),
    [
        ("vit_t", 256, 12, 0.1, 0.1),
        ("vit_t_dp005_mask0", 256, 12, 0.05, 0.0),
        ("vit_s", 512, 12, 0.1, 0.1),
        ("vit_s_dp005_mask_0", 512, 12, 0.05, 0.0),
        ("vit_b", 512, 24, 0.1, 0.1),
        ("vit_b_dp005_mask_005", 512, 24, 0.05, 0.05),
        ("vit_l_dp005_mask_005", 768, 24, 0.05, 0.05),
        ("vit_h", 1024, 48, 0.1, 0.0),
    ],
)
def test_registered_vits_have_insightface_hyperparameters(
    name: str, embed_dim: int, depth: int, drop_path_rate: float, mask_ratio: float
) -> None:
    model = meta_backbone(name)
    assert isinstance(model, VisionTransformer)
    assert (model.embed_dim, len(model.blocks), model.mask_ratio) == (embed_dim, depth, mask_ratio)
    assert model.blocks[-1].drop_path_rate == pytest.approx(drop_path_rate)
    assert model.gradient_checkpointing is False  # insightface turns it on for vit_b/l/h; here the recipe does
