"""A reward with a controlled success rate, for cost benchmarks.

A randomly initialised model scores 0 on every math problem, so every GRPO group has zero reward
variance, zero advantage and (with ``trainer.skip_zero_advantage``) almost no update at all: a
cost comparison on such rewards measures nothing. :class:`ControlledReward` ignores the
completion text and decides each group's rewards from a seeded hash of its key (the gold answer
column, which benchmarks fill with a unique prompt id):

- with probability ``zero_std_fraction`` the group has no signal: all G rewards are equal (all 0
  or all 1, half the time each);
- otherwise k of its G rewards are 1, with k uniform on 1 .. G-1, at seeded positions, so the
  group's rewards vary and every one of its rows has a non-zero advantage.

``zero_std_fraction=0`` (the default) gives every group signal. The rewards depend only on
(seed, key, position within the group), so grpo_lab and TRL scoring the same prompts get the same
rewards whatever order the prompts come in, and every process computes them alike.

Usage::

    reward = ControlledReward(group_size=8, zero_std_fraction=0.0, seed=0)
    setup(cfg, reward_fn=reward)                        # grpo_lab: score_batch's signature
    GRPOTrainer(..., reward_funcs=[reward.for_trl()])   # TRL: the key in column "answer"

Position within a group: calls hold whole groups, prompt-major (grpo_lab's rollout layout, and
TRL's ``RepeatSampler``), so the j-th row with a given key in one call is position ``j mod G``.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Sequence
from typing import Any

from grpo_lab.rewards.score import ScoreResult

__all__ = ["ControlledReward", "TrlControlledReward", "zero_std_fraction"]


class ControlledReward:
    """Group rewards drawn from (seed, key) alone; see the module docstring.

    Args:
        group_size: G, the samples per prompt (at least 2, else no group can have signal).
        zero_std_fraction: probability in [0, 1] that a group's G rewards are all equal.
        seed: changes every group's draw.
    """

    def __init__(self, group_size: int, zero_std_fraction: float = 0.0, seed: int = 0) -> None:
        if group_size < 2:
            raise ValueError(
                f"group_size must be >= 2 for a group to have signal, got {group_size}"
            )
        if not 0.0 <= zero_std_fraction <= 1.0:
            raise ValueError(f"zero_std_fraction must be in [0, 1], got {zero_std_fraction}")
        self.group_size = group_size
        self.zero_std_fraction = zero_std_fraction
        self.seed = seed

    def group_rewards(self, key: str) -> list[float]:
        """The G rewards of the group keyed ``key``, by position."""
        G = self.group_size
        digest = hashlib.sha256(f"{self.seed}\0{key}".encode()).digest()
        rng = random.Random(struct.unpack("<Q", digest[:8])[0])
        if rng.random() < self.zero_std_fraction:
            return [float(rng.random() < 0.5)] * G
        k = rng.randint(1, G - 1)
        rewards = [1.0] * k + [0.0] * (G - k)
        rng.shuffle(rewards)
        return rewards

    def scores(self, keys: Sequence[str]) -> list[float]:
        """One reward per row; the j-th row with a given key is position ``j mod G``."""
        seen: dict[str, int] = {}
        groups: dict[str, list[float]] = {}
        out = []
        for key in keys:
            j = seen.get(key, 0)
            seen[key] = j + 1
            if key not in groups:
                groups[key] = self.group_rewards(key)
            out.append(groups[key][j % self.group_size])
        return out

    def __call__(self, completions: Sequence[str], golds: Sequence[str]) -> list[ScoreResult]:
        """grpo_lab's reward signature (:func:`grpo_lab.rewards.score_batch`'s); the completions
        are not read."""
        if len(completions) != len(golds):
            raise ValueError(
                f"completions and golds must have the same length, got {len(completions)} "
                f"and {len(golds)}"
            )
        return [
            ScoreResult(score=s, status="correct" if s > 0.5 else "wrong", extracted=None)
            for s in self.scores([str(g) for g in golds])
        ]

    def for_trl(self, key_column: str = "answer") -> TrlControlledReward:
        """The same rewards in TRL's reward-function convention."""
        return TrlControlledReward(self, key_column)


def zero_std_fraction(rewards: Sequence[float], group_size: int) -> float:
    """The fraction of consecutive groups of ``group_size`` rewards that are all equal."""
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    return sum(max(g) == min(g) for g in groups) / len(groups) if groups else 0.0


class TrlControlledReward:
    """:class:`ControlledReward` as a TRL ``GRPOTrainer`` reward function (keywords
    ``prompts``, ``completions``, ``completion_ids`` and one list per dataset column; see
    :mod:`grpo_lab.rewards.trl`). ``zero_std_fractions`` records, per call, the fraction of
    groups whose rewards were all equal."""

    __name__ = "controlled_reward"

    def __init__(self, reward: ControlledReward, key_column: str = "answer") -> None:
        self.reward = reward
        self.key_column = key_column
        self.zero_std_fractions: list[float] = []

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] = (),
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        if self.key_column not in kwargs:
            raise KeyError(f"controlled_reward reads column '{self.key_column}', which is missing")
        keys = [str(k) for k in kwargs[self.key_column]]
        if len(keys) != len(completions):
            raise ValueError(f"{len(keys)} keys for {len(completions)} completions")
        rewards = self.reward.scores(keys)
        self.zero_std_fractions.append(zero_std_fraction(rewards, self.reward.group_size))
        return rewards
