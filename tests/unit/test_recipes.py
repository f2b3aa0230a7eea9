"""Every recipe in launch/recipes parses and validates (check_files=False: no data here), and says what it means:
each key it sets is in the resolved tree with that value, its backbone and head are registered, and the recipes the
issue asked for exist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from heads import list_heads
from models import list_backbones
from trainer.config import REPO_ROOT, flatten, load_config, to_dict

RECIPES = sorted((REPO_ROOT / "launch" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_keeps_every_key(recipe: Path) -> None:
    cfg = load_config(recipe, check_files=False)
    raw: dict[str, Any] = flatten(yaml.safe_load(recipe.read_text()))
    resolved = flatten(to_dict(cfg))
    for key, value in raw.items():
        assert key in resolved, f"{recipe.name}: {key}"
        assert resolved[key] == value, f"{recipe.name}: {key} = {resolved[key]!r}, the recipe says {value!r}"
    assert cfg.network.name in list_backbones() and cfg.head.name in list_heads()


def test_the_model_zoo_has_its_recipes() -> None:
    names = {p.stem for p in RECIPES}
    assert {"ms1mv3_mbf", "glint360k_mbf"} <= names
    assert {f"webface42m_pfc0{r}_{n}" for r in (2, 3) for n in ("r50", "r100")} <= names
    assert {f"webface42m_vit_{s}" for s in "tsbl"} <= names
    # One recipe per head with its paper's settings.
    heads_with_recipe = {load_config(p, check_files=False).head.name for p in RECIPES}
    assert set(list_heads()) <= heads_with_recipe


@pytest.mark.parametrize("size", "tsbl")
def test_vit_recipes_are_insightface_adamw(size: str) -> None:
    cfg = load_config(REPO_ROOT / "launch" / "recipes" / f"webface42m_vit_{size}.yaml", check_files=False)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 0.001, 0.1)
    assert (cfg.head.sample_rate, cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (0.3, 40, 4.0)
    assert cfg.schedule.name == "polynomial" and cfg.schedule.power == 1.0


def test_the_distillation_and_schedule_recipes() -> None:
    """docs/distill.md's recipes: the CPU pair (the student's teacher is the teacher recipe's output), the MS1MV3
    r100/r50 -> mbf ones, and the full-softmax finish of a sample-rate schedule."""
    recipes = REPO_ROOT / "launch" / "recipes"
    teacher = load_config(recipes / "default_teacher.yaml", check_files=False)
    student = load_config(recipes / "default_distill.yaml", check_files=False)
    assert student.distill.teacher == teacher.output and student.distill.cache
    assert teacher.schedule.epochs > student.schedule.epochs and teacher.train.seed != student.train.seed
    for name in ("r100", "r50"):
        cfg = load_config(recipes / f"ms1mv3_{name}_to_mbf.yaml", check_files=False)
        assert cfg.network.name == "mbf" and cfg.distill.teacher.endswith(f"ms1mv3_{name}")
    finish = load_config(recipes / "glint360k_r100_pfc_finish.yaml", check_files=False)
    assert finish.head.sample_rate == [[0, 0.1], [18, 1.0]] and finish.schedule.epochs == 20
