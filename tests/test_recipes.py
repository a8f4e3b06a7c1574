"""Every recipe, launch config and sweep file in recipes/ is valid and headed by its command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grpo_lab.config import load_config

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
LAUNCH_CONFIGS = sorted((RECIPES_DIR / "accelerate").glob("*.yaml"))
SWEEPS = sorted((RECIPES_DIR / "sweeps").glob("*.yaml"))


def _first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_there_is_something_to_check():
    assert len(RECIPES) >= 6 and len(LAUNCH_CONFIGS) >= 4 and len(SWEEPS) >= 2


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_names_its_launch_command(recipe):
    cfg = load_config(recipe)
    first = _first_line(recipe)
    assert first.startswith(("# grpo-lab train", "# accelerate launch")), first
    assert f"recipes/{recipe.name}" in first
    assert cfg.output_dir.endswith(recipe.stem)


@pytest.mark.parametrize("launch", LAUNCH_CONFIGS, ids=[p.name for p in LAUNCH_CONFIGS])
def test_launch_config_is_read_by_accelerate(launch):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(launch))
    assert config.num_processes >= 1
    assert _first_line(launch).startswith(
        "# accelerate launch --config_file " + f"recipes/accelerate/{launch.name}"
    )
    data = yaml.safe_load(launch.read_text())
    if data["distributed_type"] == "DEEPSPEED":
        assert data["deepspeed_config"]["zero_stage"] in (2, 3)


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_file_names_its_command(sweep):
    assert _first_line(sweep).startswith(f"# grpo-lab sweep recipes/sweeps/{sweep.name}")
