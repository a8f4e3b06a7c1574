"""Adapter from :func:`score_batch` to TRL's ``GRPOTrainer`` reward-function convention.

TRL 1.16 (``GRPOTrainer._calculate_rewards``) calls every plain reward function as::

    reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                **reward_kwargs)

where ``reward_kwargs`` holds every dataset column except ``prompt``/``completion``/
``completion_ids`` as a list aligned with ``completions`` (already repeated per generation), plus
``trainer_state``, ``log_extra(column, values)``, ``log_metric(name, value)`` and, with
environments, ``environments``. ``completions`` is a list of strings for a plain-text dataset, or, for
a conversational one, a list of message lists (``[{"role": "assistant", "content": "..."}]``). The
function must return one float (or ``None`` to skip the row) per completion; its logging name is
taken from ``__name__``.

Usage::

    from grpo_lab.rewards import trl_math_reward, make_trl_reward
    GRPOTrainer(..., reward_funcs=[trl_math_reward])               # gold in column "answer"
    GRPOTrainer(..., reward_funcs=[make_trl_reward("solution")])   # gold in column "solution"

The reward is a callable class instance rather than a closure so that it pickles (TRL's async
rollout worker sends reward functions to a spawned process). Symbolic checks use the process-wide
pool (``sandbox.set_default_pool`` configures it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from grpo_lab.rewards.score import STATUSES, score_batch

__all__ = ["TrlMathReward", "completion_text", "make_trl_reward", "trl_math_reward"]


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The text of one TRL completion: a string, or the last assistant message of a chat list.

    Message content may be a string or a list of parts (``{"type": "text", "text": ...}``); missing
    content (a pure tool call) reads as empty text.
    """
    if isinstance(completion, str):
        return completion
    messages = [m for m in completion if m.get("role", "assistant") == "assistant"]
    if not messages:
        return ""
    content = messages[-1].get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


class TrlMathReward:
    """Math-answer reward in TRL's calling convention (see the module docstring).

    Args:
        answer_column: dataset column holding the gold answer (or a ``#### N`` / ``\\boxed{}``
            solution, reduced to its answer).
        timeout_s: per-item bound for symbolic checks.
        name: ``__name__``, which TRL uses in metric names (``rewards/<name>/mean``).

    When TRL passes ``log_metric``, the fraction of each status is logged as
    ``reward/<name>/<status>_frac``; when it passes ``log_extra``, the status and the extracted
    answer are added to the completions table as ``<name>_status`` / ``<name>_extracted``.
    A row whose gold is ``None`` gets reward ``None`` (TRL skips it).
    """

    def __init__(
        self, answer_column: str = "answer", *, timeout_s: float = 2.0, name: str = "math_reward"
    ) -> None:
        self.answer_column = answer_column
        self.timeout_s = timeout_s
        self.__name__ = name

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] = (),
        completion_ids: Sequence[Any] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if self.answer_column not in kwargs:
            hooks = ("trainer_state", "log_extra", "log_metric", "environments")
            columns = sorted(k for k in kwargs if k not in hooks)
            raise KeyError(
                f"reward '{self.__name__}' reads the gold answer from dataset column "
                f"'{self.answer_column}', which is missing; columns passed: {columns}"
            )
        golds = kwargs[self.answer_column]
        if len(golds) != len(completions):
            raise ValueError(
                f"column '{self.answer_column}' has {len(golds)} values for "
                f"{len(completions)} completions"
            )
        keep = [i for i, gold in enumerate(golds) if gold is not None]
        results = score_batch(
            [completion_text(completions[i]) for i in keep],
            [str(golds[i]) for i in keep],
            timeout_s=self.timeout_s,
        )
        rewards: list[float | None] = [None] * len(completions)
        statuses: list[str | None] = [None] * len(completions)
        extracted: list[str | None] = [None] * len(completions)
        for i, result in zip(keep, results, strict=True):
            rewards[i], statuses[i], extracted[i] = result.score, result.status, result.extracted
        self._log(kwargs, statuses, extracted)
        return rewards

    def _log(self, kwargs: dict[str, Any], statuses: list[str | None], extracted: list) -> None:
        log_metric = kwargs.get("log_metric")
        scored = [s for s in statuses if s is not None]
        if callable(log_metric) and scored:
            counts = Counter(scored)
            for status in STATUSES:
                log_metric(f"reward/{self.__name__}/{status}_frac", counts[status] / len(scored))
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            log_extra(f"{self.__name__}_status", statuses)
            log_extra(f"{self.__name__}_extracted", extracted)


def make_trl_reward(
    answer_column: str = "answer", *, timeout_s: float = 2.0, name: str = "math_reward"
) -> TrlMathReward:
    """A TRL reward function reading the gold answer from ``answer_column``."""
    return TrlMathReward(answer_column, timeout_s=timeout_s, name=name)


trl_math_reward = make_trl_reward()
