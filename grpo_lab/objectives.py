"""The objectives grpo_lab compares, by name, as (recipe objective, dotted overrides).

``grpo``, ``ppo_head`` and ``ppo_critic`` are the recipes' own settings (``recipes/*_grpo.yaml``,
``*_ppo_head.yaml``, ``*_ppo_critic.yaml``): PPO makes ``epochs x num_minibatches`` optimizer
updates per rollout batch (4 in the tiny recipes), GRPO one.

The ``*_matched`` variants run PPO with GRPO's update schedule: one epoch over one minibatch, so
every objective makes the same number of optimizer updates on the same samples per batch. The
difference in cost between ``ppo_head_matched`` and ``grpo`` is then the value model alone; the
difference between ``ppo_head`` and ``ppo_head_matched`` is PPO's extra epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MATCHED_UPDATES: dict[str, Any] = {"trainer.epochs": 1, "trainer.num_minibatches": 1}

# name -> (recipe objective: the suffix of recipes/<task>_<objective>.yaml, overrides on top)
OBJECTIVES: dict[str, tuple[str, dict[str, Any]]] = {
    "grpo": ("grpo", {}),
    "ppo_head": ("ppo_head", {}),
    "ppo_critic": ("ppo_critic", {}),
    "ppo_head_matched": ("ppo_head", MATCHED_UPDATES),
    "ppo_critic_matched": ("ppo_critic", MATCHED_UPDATES),
}

LABELS: dict[str, str] = {
    "grpo": "GRPO",
    "ppo_head": "PPO (value head)",
    "ppo_critic": "PPO (critic)",
    "ppo_head_matched": "PPO (value head), matched updates",
    "ppo_critic_matched": "PPO (critic), matched updates",
}


def objective(name: str) -> tuple[str, dict[str, Any]]:
    """The recipe objective and overrides of ``name``; unknown names list the valid ones."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    recipe, overrides = OBJECTIVES[name]
    return recipe, dict(overrides)


def recipe_for(name: str, base: str | Path) -> Path:
    """The recipe of objective ``name`` for the task of ``base``, in ``base``'s folder.

    ``base`` is named ``<task>_<objective>.yaml`` (e.g. ``tiny_arith_grpo.yaml``); the answer is
    ``<task>_<recipe objective of name>.yaml`` beside it (``tiny_arith_ppo_head.yaml`` for
    ``ppo_head_matched``), whether or not that file exists.
    """
    recipe, _ = objective(name)
    base = Path(base)
    for known in sorted({r for r, _ in OBJECTIVES.values()}, key=len, reverse=True):
        if base.stem.endswith(f"_{known}"):
            task = base.stem[: -len(known) - 1]
            return base.with_name(f"{task}_{recipe}{base.suffix}")
    raise ValueError(
        f"{base}: expected a recipe named <task>_<objective>{base.suffix} with objective one of "
        + ", ".join(sorted({r for r, _ in OBJECTIVES.values()}))
    )
