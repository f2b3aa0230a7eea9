"""The typed config tree: recipes parse, overrides apply with YAML types, every bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.in_process import assert_one_line, main_in_process
from tests.launching import TINY
from trainer.config import (
    DEFAULT_RECIPE,
    REPO_ROOT,
    ConfigError,
    ExperimentConfig,
    load_config,
    parse_overrides,
    save_config,
)

RECIPES = sorted((REPO_ROOT / "launch" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses(recipe: Path) -> None:
    cfg = load_config(recipe, check_files=False)
    assert isinstance(cfg, ExperimentConfig)
    raw = yaml.safe_load(recipe.read_text())
    # What the recipe says is what the tree holds (nothing silently dropped).
    assert cfg.network.name == raw["network"]["name"]
    assert cfg.train.batch_size == raw["train"]["batch_size"]


def test_default_recipe_is_the_embedded_dataset() -> None:
    cfg = load_config()
    assert cfg.data.source == "generated"
    assert DEFAULT_RECIPE.is_file()


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(
        None,
        [
            "--optim.lr",
            "0.05",
            "--train.batch_size=32",
            "--data.random_flip",
            "false",
            "--eval.bins",
            "[]",
            "--network.name",
            "r18",
        ],
    )
    assert cfg.optim.lr == 0.05 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == 32
    assert cfg.data.random_flip is False
    assert cfg.network.name == "r18"


def test_int_is_accepted_for_float() -> None:
    cfg = load_config(None, ["--optim.lr", "1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--optim.lrr", "0.1"], "unknown key 'optim.lrr'"),
        (["--nosuchsection.x", "1"], "unknown key 'nosuchsection'"),
        (["--optim.lr", "fast"], "optim.lr expects a number, got 'fast'"),
        (["--train.batch_size", "1.5"], "train.batch_size expects an integer, got 1.5"),
        (["--data.random_flip", "maybe"], "data.random_flip expects true/false"),
        (["--optim.name", "lamb"], "optim.name must be one of 'sgd', 'adamw', got 'lamb'"),
        (["--network.name", "r9000"], "network.name: unknown backbone 'r9000'"),
        (["--head.sample_rate", "0"], "head.sample_rate must be in (0, 1]"),
        (["--head.update", "eager"], "head.update must be one of 'dense', 'lazy', 'sparse', got 'eager'"),
        (["--head.lazy_sync_every", "0"], "head.lazy_sync_every must be >= 1"),
        (["--optim.name", "adamw"], "head.update: lazy needs optim.name: sgd; with adamw only head.update: dense"),
        (["--optim.name", "adamw", "--head.update", "sparse"], "head.update: sparse needs optim.name: sgd"),
        (["--train.batch_size", "0"], "train.batch_size must be > 0"),
        (["--data.prefetch", "0"], "data.prefetch must be > 0"),
        (["--data.pin_memory", "sometimes"], "data.pin_memory expects true/false"),
        (["--optim.lr"], "override --optim.lr has no value"),
        (["positional"], "unexpected argument 'positional'"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_speed_section_parses_and_defaults_off(tmp_path: Path) -> None:
    default = load_config(None).speed
    assert (default.channels_last, default.compile, default.ddp_comm_hook) == (False, False, "none")
    assert (default.ddp_bucket_cap_mb, default.ddp_gradient_as_bucket_view) == (25, False)
    recipe = tmp_path / "fast.yaml"
    recipe.write_text(
        "speed:\n  channels_last: true\n  compile: true\n  compile_mode: max-autotune\n"
        "  ddp_bucket_cap_mb: 100\n  ddp_comm_hook: power_sgd\n  ddp_power_sgd_rank: 4\n"
    )
    speed = load_config(recipe, ["--speed.ddp_gradient_as_bucket_view", "true"], check_files=False).speed
    assert (speed.channels_last, speed.compile, speed.compile_mode) == (True, True, "max-autotune")
    assert (speed.ddp_bucket_cap_mb, speed.ddp_comm_hook, speed.ddp_power_sgd_rank) == (100, "power_sgd", 4)
    assert speed.ddp_gradient_as_bucket_view is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--speed.channels_last", "yes please"], "speed.channels_last expects true/false, got 'yes please'"),
        (["--speed.compile_mode", "turbo"], "speed.compile_mode must be one of 'default', 'reduce-overhead'"),
        (["--speed.ddp_comm_hook", "int8"], "speed.ddp_comm_hook must be one of 'none', 'fp16', 'bf16', 'power_sgd'"),
        (["--speed.ddp_bucket_cap_mb", "0"], "speed.ddp_bucket_cap_mb must be > 0, got 0"),
        (["--speed.ddp_bucket_cap_mb", "2.5"], "speed.ddp_bucket_cap_mb expects an integer, got 2.5"),
        (["--speed.ddp_power_sgd_rank", "0"], "speed.ddp_power_sgd_rank must be > 0"),
        (["--speed.ddp_power_sgd_warmup_steps", "1"], "speed.ddp_power_sgd_warmup_steps must be >= 2"),
        (["--speed.fast", "true"], "unknown key 'speed.fast'"),
    ],
)
def test_bad_speed_keys_are_named(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.root: .*nowhere/train.rec does not exist"):
        load_config(None, ["--data.source", "recordio", "--data.root", str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match="data.root is empty"):
        load_config(None, ["--data.source", "recordio"])


def test_eval_bins_resolve_against_data_root(tmp_path: Path) -> None:
    for name in ("train.rec", "train.idx", "lfw.bin"):
        (tmp_path / name).write_bytes(b"")
    cfg = load_config(None, ["--data.source", "recordio", "--data.root", str(tmp_path), "--eval.bins", "[lfw]"])
    assert cfg.eval.bins == [str(tmp_path / "lfw.bin")]
    with pytest.raises(ConfigError, match=r"eval.bins\[0\]: 'agedb_30' not found"):
        load_config(None, ["--data.source", "recordio", "--data.root", str(tmp_path), "--eval.bins", "[agedb_30]"])


def test_unknown_key_in_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  batch_size: 8\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.learning_rate'"):
        load_config(recipe)


def test_missing_recipe_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["--optim.lr", "0.02", "--head.m2", "0.3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_parse_overrides_pairs() -> None:
    assert parse_overrides(["--a.b", "3", "--c=x"]) == [("a.b", 3), ("c", "x")]


@pytest.mark.parametrize(
    ("text", "value"), [("1e-3", 1e-3), ("5e-4", 5e-4), ("1.0e12", 1e12), ("1e12", 1e12), ("1.0e+12", 1e12)]
)
def test_exponent_floats_are_numbers_in_recipes_and_overrides(tmp_path: Path, text: str, value: float) -> None:
    """YAML 1.1 (PyYAML) reads `1e-3`, `5e-4`, `1e12`, `1.0e12` as strings; recipes and overrides must not."""
    recipe = tmp_path / "exp.yaml"
    recipe.write_text(f"optim:\n  lr: {text}\n  weight_decay: 5e-4\n")
    cfg = load_config(recipe, check_files=False)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (value, 5e-4)
    assert load_config(None, ["--optim.lr", text]).optim.lr == value
    assert load_config(None, [f"--optim.lr={text}"]).optim.lr == value
    assert parse_overrides(["--x", f"-{text}"]) == [("x", -value)]


def test_ints_stay_ints_and_yaml_elsewhere_is_untouched() -> None:
    assert parse_overrides(["--a", "3", "--b", "1_000", "--c", "0x10", "--d", "1.5", "--e", "1e"]) == [
        ("a", 3),
        ("b", 1000),
        ("c", 16),
        ("d", 1.5),
        ("e", "1e"),
    ]
    assert isinstance(parse_overrides(["--a", "3"])[0][1], int)
    with pytest.raises(ConfigError, match=r"--train.batch_size expects an integer, got 100.0"):
        load_config(None, ["--train.batch_size", "1e2"])
    # The loader is a subclass with its own resolver table: yaml.safe_load everywhere else keeps YAML 1.1.
    assert yaml.safe_load("1e-3") == "1e-3"


def test_errors_blame_the_command_line_or_the_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, check_files=False)
    assert str(info.value).startswith(f"{recipe}: unknown key 'optim.momentun'")
    recipe.write_text("optim:\n  lr: 0.1\n")
    cases = {
        "--optim.lrr": "--optim.lrr: unknown key 'optim.lrr' (known in this section: ",
        "--optimm.lr": "--optimm: unknown key 'optimm' (known in this section: ",
        "--optim.lr": "--optim.lr expects a number, got 'fast'",
    }
    for flag, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(recipe, [flag, "fast"], check_files=False)
        assert str(info.value).startswith(message) and str(recipe) not in str(info.value)
    # A recipe value that is wrong stays the recipe's fault even when another key of its section is overridden.
    recipe.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}: optim.lr expects a number"):
        load_config(recipe, ["--optim.momentum", "0.8"], check_files=False)


@pytest.mark.parametrize("factor", ["0", "-0.5", "1.5", ".nan"])
def test_rollback_lr_factor_is_in_0_1(factor: str) -> None:
    """A rollback lowers the lr of a run that just diverged: 0 would stop it learning, > 1 raise it."""
    with pytest.raises(ConfigError, match=r"^--train.rollback_lr_factor must be in \(0, 1\], got "):
        load_config(None, ["--train.rollback_lr_factor", factor])
    assert load_config(None, ["--train.rollback_lr_factor", "1"]).train.rollback_lr_factor == 1.0


def _recipe(tmp_path: Path, text: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    return recipe


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        # A section that checks itself (__post_init__): the key it names, from the command line or the file.
        ("", ["--schedule.power", "-1"], "--schedule.power must be > 0, got -1.0"),
        ("schedule:\n  power: -1\n", [], "{recipe}: schedule.power must be > 0, got -1.0"),
        ("schedule:\n  power: -1\n", ["--schedule.epochs", "3"], "{recipe}: schedule.power must be > 0"),
        ("head:\n  s: 32.0\n", ["--head.m2", "4"], "--head.m2 must be in [0, pi), got 4.0"),
        ("head:\n  m2: 4\n", ["--head.s", "32"], "{recipe}: head.m2 must be in [0, pi), got 4.0"),
        (
            "data:\n  generated:\n    jpeg_quality: 90\n",
            ["--data.generated.jpeg_quality_min", "95"],
            "--data.generated.jpeg_quality_min must be in [1, jpeg_quality]",
        ),
        # The message leads with the recipe's key; the other key it names came from the command line.
        (
            "data:\n  generated:\n    jpeg_quality_min: 80\n",
            ["--data.generated.jpeg_quality", "70"],
            "--data.generated.jpeg_quality: data.generated.jpeg_quality_min must be in [1, jpeg_quality]",
        ),
        # ... but a plain word of the message is not taken for a key ("positive epochs" is not schedule.epochs).
        (
            "schedule:\n  decay_epochs: [5, 3]\n",
            ["--schedule.epochs", "8"],
            "{recipe}: schedule.decay_epochs must be increasing positive epochs",
        ),
        # Checks across sections (validate): one key, or the first named key that came from the command line.
        ("", ["--optim.lr", "-1"], "--optim.lr must be > 0, got -1.0"),
        ("optim:\n  lr: -1\n", [], "{recipe}: optim.lr must be > 0, got -1.0"),
        ("", ["--optim.lr", ".nan"], "--optim.lr must be > 0, got nan"),
        ("network:\n  name: r9000\n", [], "{recipe}: network.name: unknown backbone 'r9000'"),
        ("", ["--network.dropout", "1"], "--network.dropout must be in [0, 1), got 1.0"),
        ("optim:\n  name: adamw\n", [], "{recipe}: head.update: lazy needs optim.name: sgd"),
        ("", ["--optim.name", "adamw"], "--optim.name: head.update: lazy needs optim.name: sgd"),
        ("optim:\n  name: adamw\n", ["--head.update", "sparse"], "--head.update: head.update: sparse needs"),
        ("schedule:\n  max_steps: 0\n", ["--schedule.epochs", "0"], "--schedule.epochs: schedule.epochs and"),
        ("schedule:\n  epochs: 0\n", [], "{recipe}: schedule.epochs and schedule.max_steps are both 0"),
        ("", ["--data.source", "recordio"], "--data.source: data.root is empty"),
        # A section the recipe lacks, made by an override, holds defaults: those came from neither.
        ("optim:\n  lr: 0.1\n", ["--data.source", "recordio"], "--data.source: data.root is empty"),
        ("optim:\n  lr: 0.1\n", ["--schedule.name", "step"], "{recipe}: schedule.decay_epochs is empty"),
        ("data:\n  source: recordio\n", [], "{recipe}: data.root is empty"),
        ("", ["--eval.bins", "[nowhere]"], "--eval.bins[0]: 'nowhere' not found"),
    ],
)
def test_errors_name_the_source_of_the_value(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    """#25: a bad value is blamed on the `--key` that gave it, or on the recipe file that did; never the other."""
    recipe = _recipe(tmp_path, text or "data:\n  source: generated\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, overrides)
    expected = message.format(recipe=recipe)
    assert str(info.value).startswith(expected), str(info.value)
    if expected.startswith("--"):
        assert str(recipe) not in str(info.value)


@pytest.mark.e2e
def test_a_bad_override_is_blamed_on_the_command_line_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same through the entry point (`trainer.main.main`, in-process): exit 2, one line naming
    `--schedule.power`, nothing written."""
    out = tmp_path / "out"
    code, err = main_in_process(
        ["--schedule.power", "-1", "--output", str(out)], tmp_path / "cache", monkeypatch, capsys
    )
    assert assert_one_line(code, err) == "config error: --schedule.power must be > 0, got -1.0"
    assert str(TINY) not in err
    assert not out.exists() and not (tmp_path / "cache").exists()
