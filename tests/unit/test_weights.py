"""models.weights: the one backbone-weights loader (files, run and checkpoint folders, metadata, key/shape checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models import build_backbone, list_backbones
from models.errors import InputError
from models.run_folder import CheckpointError, CheckpointFolder
from models.weights import (
    WeightsError,
    infer_embedding_size,
    load_backbone,
    load_state_into,
    load_weights_into,
    read_weights,
    resolve_weights_path,
)

EMBEDDING = 24


def _backbone(seed: int = 0, embedding_size: int = EMBEDDING) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("r_lite", num_features=embedding_size)
    with torch.no_grad():  # non-trivial BatchNorm statistics: a buffer that is not loaded would show
        for name, buffer in model.named_buffers():
            if "running_mean" in name:
                buffer.uniform_(-0.2, 0.2)
            elif "running_var" in name:
                buffer.uniform_(0.5, 2.0)
    return model.eval()


def _save(path: Path, model: nn.Module, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def _meta(network: str = "r_lite", embedding_size: int = EMBEDDING) -> dict[str, str]:
    return {"network": network, "embedding_size": str(embedding_size), "producer": "test"}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _same_outputs(loaded: nn.Module, original: nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), original.eval()(images))


def test_good_file(tmp_path: Path, images: torch.Tensor) -> None:
    original = _backbone()
    path = _save(tmp_path / "model.safetensors", original, _meta())
    loaded, metadata = load_backbone(path)
    assert not loaded.training
    assert metadata == _meta()  # the file's own metadata, network and size as built
    _same_outputs(loaded, original, images)


@pytest.mark.parametrize("layout", ["run folder", "checkpoint folder"])
def test_a_folder_stands_for_its_model_file(tmp_path: Path, images: torch.Tensor, layout: str) -> None:
    original = _backbone(seed=3)
    folder = tmp_path / "run" if layout == "run folder" else tmp_path / "run" / "checkpoints" / "step-00000010"
    _save(folder / "model.safetensors", original, _meta())
    loaded, metadata = load_backbone(folder)
    assert metadata["network"] == "r_lite"
    _same_outputs(loaded, original, images)


def test_a_checkpoint_model_must_match_its_manifest(tmp_path: Path, images: torch.Tensor) -> None:
    """Every way of naming a checkpoint's model (the folder, the file, a link to it) checks its sha256 first."""
    original = _backbone(seed=4)
    folder = CheckpointFolder(tmp_path / "run" / "checkpoints" / "step-00000020")
    _save(folder.model, original, _meta())
    (folder.path / "notes.safetensors").write_bytes(b"not listed: never checked")
    folder.write_manifest(step=20, world_size=1)
    (tmp_path / "link.safetensors").symlink_to(folder.model)
    _same_outputs(load_backbone(folder.path)[0], original, images)  # intact: loads
    _save(folder.model, _backbone(seed=5), _meta())  # replaced after sealing: a loadable, finite, wrong model
    for name in (folder.path, folder.model, tmp_path / "link.safetensors"):
        with pytest.raises(CheckpointError, match=f"checkpoint {folder.path}: model.safetensors does not match"):
            load_backbone(name)
        with pytest.raises(InputError, match="does not match its checksum"):
            load_weights_into(_backbone(), name)
    assert resolve_weights_path(folder.path, verify=False) == folder.model  # the caller has just verified it


def test_nan_or_infinite_weights_are_refused(tmp_path: Path) -> None:
    model = _backbone()
    with torch.no_grad():
        model.get_parameter("fc.weight")[0, :2] = float("nan")
        model.get_buffer("features.running_var")[3] = float("inf")
    path = _save(tmp_path / "model.safetensors", model, _meta())
    message = (
        f"{path}: 2 of its {len(model.state_dict())} tensors hold NaN or infinite values (first: key 'fc.weight', "
        "2 values): a diverged or damaged model, refused"
    )
    with pytest.raises(WeightsError) as info:
        load_backbone(path)
    assert str(info.value) == message
    with pytest.raises(WeightsError, match="NaN or infinite"):
        load_weights_into(_backbone(), path)  # fine-tuning from a diverged model is refused too


def test_missing_file_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"absent\.safetensors: no such file$"):
        load_backbone(tmp_path / "absent.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"empty: a folder without model\.safetensors"):
        load_backbone(tmp_path / "empty")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(WeightsError, match=f"^{path}: not a readable safetensors file"):
        read_weights(path)


def test_wrong_network(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors", _backbone(), _meta())
    with pytest.raises(WeightsError) as info:
        load_backbone(path, network="r18")
    message = str(info.value)
    # r18 has two blocks per stage, r_lite one: the first key r_lite lacks is named, with the count.
    assert message.startswith(f"{path} does not fit network 'r18' (embedding size {EMBEDDING}): missing key ")
    assert "'layer1.1." in message and " missing)" in message
    with pytest.raises(WeightsError, match=r"unknown network 'r_nonexistent'; registered: .*r_lite"):
        load_backbone(path, network="r_nonexistent")


def test_wrong_shapes(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors", _backbone(), _meta())
    with pytest.raises(WeightsError) as info:
        load_backbone(path, embedding_size=8)
    # fc.weight is the first key whose shape follows the embedding size; then fc.bias and the 4 of features.
    assert f"key 'fc.weight' has shape [{EMBEDDING}, " in str(info.value)
    assert "the network needs [8, " in str(info.value) and "(6 wrongly shaped)" in str(info.value)


def test_metadata_less_file_needs_the_network(tmp_path: Path, images: torch.Tensor) -> None:
    original = _backbone(seed=5)
    path = _save(tmp_path / "bare.safetensors", original)  # no metadata: what another tool might write
    with pytest.raises(WeightsError, match=r"no 'network' in its metadata: pass --network"):
        load_backbone(path)
    loaded, metadata = load_backbone(path, network="r_lite")  # the embedding size is read from the shapes
    assert metadata == {"network": "r_lite", "embedding_size": str(EMBEDDING)}
    _same_outputs(loaded, original, images)


def test_bad_metadata_embedding_size(tmp_path: Path) -> None:
    path = _save(tmp_path / "model.safetensors", _backbone(), {"network": "r_lite", "embedding_size": "lots"})
    with pytest.raises(WeightsError, match=r"metadata embedding_size 'lots' is not a positive integer"):
        load_backbone(path)
    loaded, _ = load_backbone(path, embedding_size=EMBEDDING)  # the argument wins over the metadata
    assert loaded(torch.zeros(2, 3, 112, 112)).shape == (2, EMBEDDING)


# One small network per file that registers backbones: the shapes follow the embedding size the same way within a
# family, and building every depth (r2060) would cost a minute. The test below keeps this list complete.
FAMILIES = {"models.iresnet": "r_lite", "models.mobilefacenet": "mbf", "models.vit": "vit_t"}


def test_every_backbone_family_has_a_representative() -> None:
    from models.registry import BACKBONES

    modules = {BACKBONES._factories[name].__module__ for name in list_backbones()}
    assert modules <= set(FAMILIES), f"add a small network of {sorted(modules - set(FAMILIES))} to FAMILIES"


@pytest.mark.parametrize("network", sorted(FAMILIES.values()))
def test_embedding_size_is_read_from_the_shapes(network: str) -> None:
    if network not in list_backbones():
        pytest.skip(f"{network} is not registered")
    with torch.device("meta"):  # no memory, no init cost: only the shapes matter
        state = build_backbone(network, num_features=40).state_dict()
    assert infer_embedding_size(state, network) == 40


def test_fine_tuning_loads_into_a_built_backbone(tmp_path: Path, images: torch.Tensor) -> None:
    original = _backbone(seed=7)
    run = tmp_path / "pretrained"
    _save(run / "model.safetensors", original, _meta())
    target = _backbone(seed=8)
    assert load_weights_into(target, run) == _meta()
    _same_outputs(target, original, images)
    other = build_backbone("r_lite", num_features=EMBEDDING * 2)
    with pytest.raises(WeightsError, match=r"does not fit the network: key 'fc.weight' has shape"):
        load_weights_into(other, run)


def test_half_precision_and_old_batchnorm_files_load(images: torch.Tensor) -> None:
    """An fp16 export becomes the network's fp32; files from before torch 0.4.1 lack `num_batches_tracked`."""
    original = _backbone(seed=9)
    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in original.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    target = build_backbone("r_lite", num_features=EMBEDDING).eval()
    load_state_into(target, state, "old.pth")
    assert all(v.dtype == torch.float32 for v in target.state_dict().values() if v.is_floating_point())
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value.float()), key
    unexpected = dict(state, extra=torch.zeros(1))
    with pytest.raises(
        WeightsError, match=r"^old\.pth does not fit the network: unexpected key 'extra' \(1 unexpected\)"
    ):
        load_state_into(target, unexpected, "old.pth")


def test_weights_errors_are_input_errors() -> None:
    assert issubclass(WeightsError, InputError)
