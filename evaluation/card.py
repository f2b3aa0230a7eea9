"""The model card: what a trained model is, how to feed it, how it was trained and measured.

Every model this project writes carries its card twice: as JSON in the file's own metadata (key `card`: the
safetensors header, or the ONNX model's `metadata_props`) and as a `README.md` rendered from that metadata, beside
the file (`card_path`):

* a run's `<output>/model.safetensors`: `<output>/README.md` (`models.run_folder.RunFolder.card`), written at the end
  of the run (`write_card`, called by `trainer.reporting.finish_run`);
* any other model file (an export: `model.onnx`, `model_int8.onnx`, a `model.safetensors` copied out of a
  checkpoint): `<file name>.README.md` in the same folder (`model_int8.onnx.README.md`), so that several exports in
  one folder keep their own cards.

The metadata is the source of truth; the README is rendered from it (`render_card`) every time the metadata
changes. The tools that measure a model add their numbers to it (`update_card`): `evaluation.verification --card`,
`evaluation.ijb --card`, `evaluation.rfw --card`, `evaluation.tinyface --card`, `evaluation.all_to_all --card`, and
`trainer.export onnx --int8` (the INT8 model's cosine to FP32 and both accuracies). `evaluation.calibrate` writes
its threshold under the metadata key `calibration` (`evaluation.calibration`) and re-renders the README. A model
inside a checkpoint folder is never rewritten (its manifest checksums it).

The card JSON (`version` 1):

    network, embedding_size, parameters, macs       what the network is (`models.count_flops`: MACs per face)
    input                                           channels, size, layout, normalization, alignment template
    format                                          file type, precision, opset / quantization of an export
    training                                        data name, licence (as the recipe states it), source, steps
    recipe                                          the config.yaml keys that decide the model (`RECIPE_KEYS`)
    results                                         section -> {title, columns, rows, values, measured, note}

This module imports no other evaluation module, so the trainer, the exporter and every evaluation tool can use it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.cli import atomic_output
from models.errors import InputError
from models.run_folder import RunFolder

__all__ = [
    "CARD_KEY",
    "CardError",
    "card_path",
    "describe_input",
    "input_line",
    "print_input_line",
    "model_facts",
    "read_card",
    "read_model_metadata",
    "recipe_summary",
    "render_card",
    "result_section",
    "run_card",
    "update_card",
    "write_card",
    "write_card_for",
    "write_model_metadata",
]

logger = logging.getLogger(__name__)

CARD_KEY = "card"
CALIBRATION_KEY = "calibration"  # evaluation.calibration.METADATA_KEY (that module imports this one's neighbours)
CARD_VERSION = 1
DEFAULT_LICENCE = "not stated"

# Where insightface's ArcFace template puts the eyes, nose tip and mouth corners (evaluation.alignment holds the
# array the tools use; a test checks the two agree).
ARCFACE_TEMPLATE = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
]
NORMALIZATION = "(x / 255 - 0.5) / 0.5"

# The recipe keys that decide what the model is (dotted, as config.yaml nests them). A head's own keys (`adaface_m`,
# `magface_l_a`, ...) are added for the head the recipe chose (`_head_keys`).
RECIPE_KEYS = (
    "network.name",
    "network.embedding_size",
    "network.dropout",
    "network.init_weights",
    "head.name",
    "head.sample_rate",
    "head.s",
    "data.name",
    "data.licence",
    "data.source",
    "data.root",
    "data.random_flip",
    "optim.name",
    "optim.lr",
    "optim.momentum",
    "optim.weight_decay",
    "schedule.name",
    "schedule.epochs",
    "schedule.warmup_epochs",
    "schedule.max_steps",
    "train.batch_size",
    "train.global_batch_size",
    "train.gradient_accumulation_steps",
    "train.seed",
    "distill.teacher",
    "distill.weight",
)
# A head's own keys, by the prefix its settings use (heads/*.py); `partial_fc` and `subcenter_arcface` share the
# combined margin.
_HEAD_PREFIXES = {
    "partial_fc": ("m1", "m2", "m3", "interclass_filtering_threshold"),
    "subcenter_arcface": ("m1", "m2", "m3", "num_subcenters", "subcenter_drop_epoch"),
    "adaface": ("adaface_",),
    "curricularface": ("curricular_",),
    "elasticface": ("elastic_",),
    "magface": ("magface_",),
}


class CardError(InputError):
    """A model file whose metadata cannot be read or written; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# The model file's metadata (safetensors header or ONNX metadata_props)


def read_model_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a `.safetensors` or `.onnx` model (`CardError` naming an unreadable file)."""
    path = Path(path)
    if path.suffix == ".onnx":
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # onnx raises DecodeError, OSError, ... on a bad file
            raise CardError(f"{path}: not a readable ONNX model ({err})") from None
        return {entry.key: entry.value for entry in model.metadata_props}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CardError(f"{path}: not a readable safetensors file ({err})") from None


def write_model_metadata(path: Path, updates: Mapping[str, str]) -> None:
    """Merge `updates` into a model file's metadata: the safetensors header (tensors kept) or the ONNX model's
    `metadata_props`, rewritten through a temporary file and renamed (`models.cli.atomic_output`: the file keeps its
    permissions; a failed write leaves it untouched and is an `OutputError`)."""
    path = Path(path)
    if path.suffix == ".onnx":
        _write_onnx_metadata(path, updates)
    else:
        _write_safetensors_metadata(path, updates)


def _write_safetensors_metadata(path: Path, updates: Mapping[str, str]) -> None:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CardError(f"{path}: not a readable safetensors file ({err})") from None
    metadata.update(updates)
    metadata.setdefault("format", "pt")
    # Serialized here and written by Python: a failed write is an OSError with its reason (safetensors' own writer
    # reports it as a SafetensorError), which atomic_output turns into one line naming the model.
    data = save(tensors, metadata=metadata)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def _write_onnx_metadata(path: Path, updates: Mapping[str, str]) -> None:
    try:
        import onnx
    except ImportError:
        raise CardError("writing into an ONNX model needs the onnx package: pip install onnx") from None
    try:
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises DecodeError, OSError, ... on a bad file
        raise CardError(f"{path}: not a readable ONNX model ({err})") from None
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in updates]
    del model.metadata_props[:]
    for key, value in [*kept, *updates.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    data = model.SerializeToString()
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------------------------------------------
# The facts


def card_path(model: Path) -> Path:
    """Where the README of `model` goes: a run's `README.md` for its `model.safetensors` (`RunFolder.card`),
    `<file name>.README.md` beside any other model file."""
    model = Path(model)
    folder = RunFolder(model.parent)
    if model.name == RunFolder.MODEL and folder.config.is_file():
        return folder.card
    return model.with_name(f"{model.name}.README.md")


def model_facts(network: str, embedding_size: int) -> dict[str, Any]:
    """Parameters and forward MACs per 112x112 face of the registered backbone (built on the meta device: no
    memory, no compute). Empty when the network is not registered here (an ONNX model of another project)."""
    import torch

    from models import build_backbone, count_flops, list_backbones

    if network not in list_backbones():
        return {}
    with torch.device("meta"):
        backbone = build_backbone(network, num_features=embedding_size)
    return {
        "parameters": int(sum(p.numel() for p in backbone.parameters())),
        "macs": int(count_flops(backbone)),
    }


def describe_input(file_format: str = "safetensors") -> dict[str, Any]:
    """What the model takes: the same for every backbone here (`data.dataset.normalize_images`)."""
    facts: dict[str, Any] = {
        "channels": "RGB",
        "size": [112, 112],
        "layout": "NCHW float32",
        "normalization": NORMALIZATION,
        "alignment": "5-point similarity transform (eyes, nose tip, mouth corners) onto the ArcFace template",
        "template": ARCFACE_TEMPLATE,
        "output": "embedding, not normalized: L2-normalize, then a dot product is the cosine similarity",
        "flip_test": "optional: sum the embeddings of the face and its mirror image before normalizing",
    }
    if file_format in ("onnx", "onnx-int8"):
        facts.update(input_name="data", output_name="embedding", batch="dynamic")
    return facts


def input_line(metadata: Mapping[str, str]) -> str:
    """One line saying how to feed the model (what `evaluation.embed` and `evaluation.compare` print at start)."""
    card = _card_json(metadata, "")
    facts = card.get("input") or describe_input()
    size = "x".join(str(v) for v in facts.get("size", [112, 112]))
    network = card.get("network") or metadata.get("network", "?")
    dim = card.get("embedding_size") or metadata.get("embedding_size", "?")
    return (
        f"model {network} ({dim}-d): input aligned {size} {facts.get('channels', 'RGB')} faces (5-point ArcFace "
        f"template), {facts.get('normalization', NORMALIZATION)}"
    )


def print_input_line(metadata: Mapping[str, str]) -> None:
    """`input_line` on standard output, where the tools print their results: standard error stays for one line of
    bad input (every tool's contract), so the line is not a log record."""
    from rich.console import Console

    Console(soft_wrap=True).print(input_line(metadata), markup=False, highlight=False)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _head_keys(flat: Mapping[str, Any]) -> list[str]:
    head = str(flat.get("head.name", ""))
    for name, prefixes in _HEAD_PREFIXES.items():
        if head == name or head.startswith(f"{name}_"):
            return sorted(k for k in flat if k.startswith("head.") and k[5:].startswith(prefixes))
    return []


def recipe_summary(config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a resolved recipe (config.yaml as a nested mapping) that decide the model, dotted."""
    flat = _flatten(config)
    keys = [k for k in RECIPE_KEYS if k in flat] + _head_keys(flat)
    summary = {k: flat[k] for k in keys}
    if not summary.get("distill.teacher"):
        summary.pop("distill.teacher", None)
        summary.pop("distill.weight", None)
    if not summary.get("network.init_weights"):
        summary.pop("network.init_weights", None)
    return summary


def _card_json(metadata: Mapping[str, str], source: str) -> dict[str, Any]:
    text = metadata.get(CARD_KEY)
    if not text:
        return {}
    try:
        card = json.loads(text)
    except ValueError as err:
        raise CardError(f"{source}: metadata '{CARD_KEY}' is not JSON ({err})") from None
    if not isinstance(card, dict):
        raise CardError(f"{source}: metadata '{CARD_KEY}' is not a JSON object")
    return card


def read_card(model: Path) -> dict[str, Any]:
    """The card JSON stored in a model file (empty for a model written before cards existed)."""
    return _card_json(read_model_metadata(model), str(model))


def base_card(metadata: Mapping[str, str], file_format: str) -> dict[str, Any]:
    """A card from what every model file of this project states (network, embedding size), for a model that has
    none yet: the facts of its network, its input, its format."""
    card: dict[str, Any] = {"version": CARD_VERSION}
    network, size = metadata.get("network"), metadata.get("embedding_size")
    if network and size and size.isdigit():
        card.update(network=network, embedding_size=int(size), **model_facts(network, int(size)))
    card["input"] = describe_input(file_format)
    card["format"] = {"file": file_format}
    return card


def result_section(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    values: Mapping[str, Any] | None = None,
    note: str = "",
    tool: str = "",
) -> dict[str, Any]:
    """One section of the card's results: a table to show and the numbers behind it (`values`, machine-readable)."""
    return {
        "title": title,
        "columns": list(columns),
        "rows": [[_cell(v) for v in row] for row in rows],
        "values": dict(values or {}),
        "measured": time.strftime("%Y-%m-%d"),
        "tool": tool,
        "note": note,
    }


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a number not measured (a non-finite evaluation) is stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.5f}"
    return str(value)


# --------------------------------------------------------------------------------------------------------------
# Writing


def _check_not_in_checkpoint(model: Path) -> None:
    if (model.parent / "manifest.json").is_file():
        raise CardError(
            f"{model} is inside a checkpoint (its manifest.json checksums it): its card is not rewritten; export it "
            "first (python -m trainer.export safetensors --checkpoint ... --out model.safetensors)"
        )


def write_card_for(model: Path, card: Mapping[str, Any] | None = None) -> Path:
    """Store `card` (default: the one already in the file) in `model`'s metadata and render its README; returns the
    README's path. The README is rendered from the metadata as written, so the two always agree."""
    model = Path(model)
    _check_not_in_checkpoint(model)
    if card is not None:
        write_model_metadata(model, {CARD_KEY: json.dumps(_finite(card), default=str)})
    readme = card_path(model)
    text = render_card(read_model_metadata(model), model.name)
    with atomic_output(readme) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return readme


def update_card(model: Path, section: str, values: Mapping[str, Any]) -> Path:
    """Add (or replace) the results section `section` of `model`'s card, creating the card from the file's
    metadata when it has none; returns the README written."""
    model = Path(model)
    _check_not_in_checkpoint(model)
    metadata = read_model_metadata(model)
    card = _card_json(metadata, str(model)) or base_card(metadata, _file_format(model, metadata))
    card.setdefault("results", {})[section] = dict(values)
    readme = write_card_for(model, card)
    logger.info("card: %s results -> %s (and the metadata of %s)", section, readme, model)
    return readme


def _file_format(model: Path, metadata: Mapping[str, str]) -> str:
    if model.suffix == ".onnx":
        return "onnx-int8" if metadata.get("quantization") else "onnx"
    return "safetensors"


def run_card(
    metadata: Mapping[str, str],
    config: Mapping[str, Any],
    verification: Mapping[str, Mapping[str, float]] | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The card of a model trained by a run: its network's facts, the recipe's keys that matter, the training
    data's name and licence, and the given verification results (`{target: {acc, std, xnorm, num_pairs}}`)."""
    card = base_card(metadata, "safetensors")
    flat = _flatten(config)
    card["recipe"] = recipe_summary(config)
    card["training"] = {
        "data": flat.get("data.name") or _default_data_name(flat),
        "licence": flat.get("data.licence") or DEFAULT_LICENCE,
        "source": flat.get("data.source", ""),
        "steps": step,
        "producer": "arcface-accelerate",
    }
    if verification:
        section = verification_section(verification, step=step, tool="the run's last evaluation")
        card["results"] = {"verification": section}
    return card


def write_card(
    folder: RunFolder,
    config: Mapping[str, Any],
    verification: Mapping[str, Mapping[str, float]] | None = None,
    step: int | None = None,
) -> Path:
    """The card of a finished run (`trainer.reporting.finish_run` calls it after publishing `model.safetensors`):
    `run_card` into the model's metadata and `<output>/README.md`. Returns the README's path."""
    card = run_card(read_model_metadata(folder.model), config, verification, step)
    return write_card_for(folder.model, card)


def _default_data_name(flat: Mapping[str, Any]) -> str:
    source = str(flat.get("data.source", ""))
    if source == "generated":
        return "generated faces (data/faces.py, procedural)"
    root = str(flat.get("data.root", ""))
    return Path(root).name if root else source or "not stated"


def verification_section(
    results: Mapping[str, Mapping[str, float]], step: int | None = None, tool: str = "evaluation.verification"
) -> dict[str, Any]:
    """The `.bin` verification results as a card section: per set accuracy +- std, XNorm, pairs, and their mean."""
    rows: list[list[Any]] = []
    accuracies: list[float] = []
    for name, r in results.items():
        acc, std = float(r["acc"]), float(r["std"])
        shown = f"{acc:.5f} +- {std:.5f}" if math.isfinite(acc) else "not evaluated (non-finite embeddings)"
        rows.append([name, int(r["num_pairs"]), shown, float(r["xnorm"])])
        if math.isfinite(acc):
            accuracies.append(acc)
    if len(rows) > 1 and accuracies:
        rows.append(["mean", sum(int(r["num_pairs"]) for r in results.values()), sum(accuracies) / len(accuracies), ""])
    note = "insightface's protocol: image + mirror embeddings summed, 10 folds, best threshold per fold"
    if step is not None:
        note += f"; at step {step}"
    values = {name: {k: float(v) for k, v in r.items()} for name, r in results.items()}
    return result_section("Verification (.bin)", ["set", "pairs", "accuracy", "XNorm"], rows, values, note, tool)


# --------------------------------------------------------------------------------------------------------------
# Rendering


def _human(count: int, unit: str = "") -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f} {suffix}{unit}"
    return f"{count} {unit}".strip()


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def render_card(metadata: Mapping[str, str], file_name: str = "model") -> str:
    """The README of a model, from its metadata alone (card JSON, calibration, network, embedding size)."""
    card = _card_json(metadata, file_name)
    network = card.get("network") or metadata.get("network", "unknown network")
    dim = card.get("embedding_size") or metadata.get("embedding_size", "?")
    fmt = card.get("format") or {"file": "onnx" if file_name.endswith(".onnx") else "safetensors"}
    lines = [f"# {file_name}: {network} face embedding model ({dim}-d)", ""]
    lines += [
        "Written by ArcFace-Accelerate. This card is rendered from the model file's own metadata (key `card`, JSON);",
        "the tools that measure the model add their numbers to it.",
        "",
        "## Model",
        "",
    ]
    model_rows: list[list[Any]] = [["network", network], ["embedding size", dim]]
    if "parameters" in card:
        model_rows.append(["parameters", f"{_human(int(card['parameters']))} ({card['parameters']:,})"])
    if "macs" in card:
        model_rows.append(["MACs per face (112x112)", f"{_human(int(card['macs']))} ({card['macs']:,})"])
    described = [str(fmt.get("file", ""))] + [f"{k} {v}" for k, v in fmt.items() if k != "file"]
    model_rows.append(["file", f"{file_name} ({', '.join(d for d in described if d)})"])
    lines += _table(["", ""], model_rows) + [""]

    facts = card.get("input") or describe_input(str(fmt.get("file", "safetensors")))
    lines += ["## Input", ""]
    size = "x".join(str(v) for v in facts.get("size", [112, 112]))
    lines.append(
        f"- **Faces**: aligned {size} crops, **{facts.get('channels', 'RGB')}** channel order "
        f"({facts.get('layout', 'NCHW float32')}); normalized per channel as `{facts.get('normalization')}`."
    )
    lines.append(
        f"- **Alignment**: {facts.get('alignment')}: `{facts.get('template')}` (x, y in pixels; "
        "`evaluation/alignment.py`, `python -m evaluation.embed --landmarks`)."
    )
    lines.append(f"- **Output**: {facts.get('output')}; {facts.get('flip_test')}.")
    if "input_name" in facts:
        lines.append(
            f"- **ONNX**: input `{facts['input_name']}`, output `{facts['output_name']}`, batch axis "
            f"{facts.get('batch', 'dynamic')}."
        )
    lines.append("")

    training = card.get("training")
    if training or card.get("recipe"):
        lines += ["## Training", ""]
        if training:
            lines += _table(
                ["", ""],
                [
                    ["data", training.get("data", "not stated")],
                    ["data licence (as the recipe states it)", training.get("licence", DEFAULT_LICENCE)],
                    ["source", training.get("source", "")],
                    ["optimizer steps", training.get("steps", "")],
                ],
            ) + [""]
        if card.get("recipe"):
            lines += ["Recipe (the keys of the run's config.yaml that decide the model):", "", "```yaml"]
            lines += [f"{k}: {json.dumps(v)}" for k, v in card["recipe"].items()] + ["```", ""]

    results = card.get("results") or {}
    calibration = metadata.get(CALIBRATION_KEY)
    if results or calibration:
        lines += ["## Results", ""]
        for name, section in results.items():
            if not isinstance(section, Mapping):
                continue
            lines += [f"### {section.get('title', name)}", ""]
            if section.get("rows"):
                lines += _table(section.get("columns", []), section["rows"]) + [""]
            meta = [f"measured {section['measured']}" if section.get("measured") else ""]
            meta.append(f"by `{section['tool']}`" if section.get("tool") else "")
            extra = " ".join(m for m in meta if m)
            note = section.get("note", "")
            if note or extra:
                lines += [f"{note}{' (' + extra + ')' if extra else ''}".strip(), ""]
        if calibration:
            lines += _calibration_lines(calibration)
    lines += [
        "## Use",
        "",
        "```bash",
        f"python -m evaluation.embed faces/ --model {file_name} --out faces.safetensors",
        f"python -m evaluation.compare --model {file_name} a.jpg b.jpg",
        "```",
        "",
    ]
    return "\n".join(lines)


def _calibration_lines(text: str) -> list[str]:
    try:
        cal = json.loads(text)
        rows = [
            ["target FAR", f"{cal['far_target']:g}"],
            ["threshold (cosine; same if above)", f"{cal['threshold']:.5f}"],
            ["TAR there", f"{cal['tar']:.5f} ({cal['confidence']:.0%} interval {cal['tar_interval']})"],
            ["true FAR interval", str(cal["far_interval"])],
            ["pairs (genuine / impostor)", f"{cal['genuine_pairs']} / {cal['impostor_pairs']}"],
            ["flip-summed embeddings", str(cal.get("flip"))],
            ["measured on", cal.get("source", "")],
        ]
    except (ValueError, KeyError, TypeError):
        return ["### Calibration", "", "(metadata `calibration` unreadable)", ""]
    return ["### Calibrated threshold (`evaluation.calibrate`)", "", *_table(["", ""], rows), ""]
