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
