"""Held-out accuracy: greedy pass@1, sampled pass@1, and majority vote over k samples.

Used by ``grpo-lab eval`` and by the demo for start-vs-end accuracy. A completion is correct when
:func:`grpo_lab.rewards.score_batch` scores it 1.0 against the gold answer.

Majority vote (maj@k): the k sampled answers of a problem are grouped by their extracted answer
(whitespace and thousands separators removed); the largest group wins, ties going to the answer
seen first; samples without an answer do not vote. maj@k is the fraction of problems whose winning
answer is correct. pass@k is the fraction with at least one correct sample.

:func:`eval_plan` says what a run evaluates on and how (problems, prompt template, token
budget); the trainer's own evaluation and ``grpo-lab eval RUN`` both take it from there, so they
score the same prompts the same way.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grpo_lab.config import Config, RolloutConfig
from grpo_lab.data import Problem, load_problems, render_prompt
from grpo_lab.rewards import score_batch
from grpo_lab.rollout import RolloutBackend, build_backend, decode_completions, generate


@dataclass(frozen=True)
class EvalPlan:
    """Which held-out problems to score, and the :func:`evaluate` settings to score them with."""

    dataset: str
    split: str = "test"
    path: str | None = None  # local file; None = generated (arith) or the hub
    limit: int | None = None  # the first `limit` problems; None = all
    seed: int = 0  # which problems (arith) and the sampled rows' RNG seed
    arith: dict[str, Any] = field(default_factory=dict)  # make_arith settings (arith only)
    template: str = "plain"
    use_chat_template: bool = False
    system_prompt: str | None = None
    max_new_tokens: int = 6
    timeout_s: float = 2.0
    batch_size: int = 256
    backend: str = field(default_factory=lambda: RolloutConfig().backend)  # the config's engine
    sampler: str = "multinomial"

    def problems(self) -> list[Problem]:
        return load_problems(
            self.dataset,
            split=self.split,
            path=self.path,
            limit=self.limit,
            seed=self.seed,
            **self.arith,
        )

    def engine(self) -> RolloutBackend:
        """The rollout engine to pass to :func:`evaluate` (``rollout.backend`` and ``sampler``)."""
        return build_backend(self.backend, sampler=self.sampler)

    def settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`evaluate` (all but the rollout engine)."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "template": self.template,
            "use_chat_template": self.use_chat_template,
            "system_prompt": self.system_prompt,
            "batch_size": self.batch_size,
            "timeout_s": self.timeout_s,
            "seed": self.seed,
        }


def eval_plan(
    cfg: Config | None,
    *,
    dataset: str | None = None,
    split: str | None = None,
    path: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
    template: str | None = None,
    max_new_tokens: int | None = None,
) -> EvalPlan:
    """The evaluation of run config ``cfg`` (the one its trainer runs), with any argument that
    is not None overriding it.

    From the run: the dataset, its evaluation file (``data.eval_path``; ``data.path`` for
    ``split="train"``), ``data.num_eval`` problems, the arithmetic settings and seed, the prompt
    template, chat template and system prompt, ``rollout.max_new_tokens``, the rollout engine and
    ``reward.timeout_s``. Another ``dataset`` than the run's takes none of the run's files or
    arithmetic settings. Without a run (``cfg=None``): arith, all problems, the dataset's own
    template (plain / gsm8k), 6 new tokens.
    """
    if cfg is None:
        name = dataset or "arith"
        plan = EvalPlan(dataset=name, template="plain" if name == "arith" else "gsm8k")
    else:
        d, r = cfg.data, cfg.rollout
        same_data = dataset is None or dataset == d.name
        split_path = {"test": d.eval_path, "train": d.path}.get(split or "test")
        plan = EvalPlan(
            dataset=d.name if same_data else dataset,
            path=split_path if same_data else None,
            limit=d.num_eval,
            seed=cfg.seed,
            arith=(
                {"max_value": d.max_value, "num_operands": d.num_operands, "ops": tuple(d.ops)}
                if same_data and d.name == "arith"
                else {}
            ),
            template=d.template,
            use_chat_template=d.use_chat_template,
            system_prompt=d.system_prompt,
            max_new_tokens=r.max_new_tokens,
            timeout_s=cfg.reward.timeout_s,
            batch_size=r.batch_size or 256,
            backend=r.backend,
            sampler=r.sampler,
        )
    overrides = {
        "split": split,
        "path": path,
        "limit": limit,
        "seed": seed,
        "template": template,
        "max_new_tokens": max_new_tokens,
    }
    return dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def _vote_key(answer: str) -> str:
    return answer.replace(",", "").replace(" ", "").strip()


def majority_vote(extracted: Sequence[str | None], scores: Sequence[float]) -> float:
    """Score of the most common extracted answer (0.0 when no sample has an answer)."""
    keys = [_vote_key(a) for a in extracted if a is not None]
    if not keys:
        return 0.0
    winner, _ = Counter(keys).most_common(1)[0]
    for a, s in zip(extracted, scores):
        if a is not None and _vote_key(a) == winner:
            return float(s)
    return 0.0


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    k: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    template: str = "plain",
    use_chat_template: bool = False,
    system_prompt: str | None = None,
    batch_size: int = 256,
    timeout_s: float = 2.0,
    backend: str | RolloutBackend | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on `problems`.

    `backend` is a rollout engine or its name in :data:`grpo_lab.rollout.ROLLOUT_BACKENDS`; None
    is the config's default engine (``rollout.backend``). Settings for a run come from
    :func:`eval_plan`: ``evaluate(..., backend=plan.engine(), **plan.settings())``.
    `seed` makes the sampled rows reproducible: they are drawn under a seed taken from
    ``torch.Generator().manual_seed(seed)`` in a forked RNG state (the caller's random stream is
    left as it was), so two models scored with one seed see the same random numbers; None draws
    from torch's global RNG. Greedy rows use no randomness.
    Returns ``eval/greedy_acc`` always, and with ``k > 1`` also ``eval/pass@1`` (mean accuracy of
    k samples at `temperature`), ``eval/maj@k`` and ``eval/pass@k``.
    """
    prompts = [
        render_prompt(
            p.question,
            template=template,
            tokenizer=tokenizer,
            use_chat_template=use_chat_template,
            system_prompt=system_prompt,
        )
        for p in problems
    ]
    golds = [p.answer for p in problems]
    if backend is None:
        backend = RolloutConfig().backend

    def run(group_size: int, temp: float, generator: torch.Generator | None = None):
        batch = generate(
            model,
            tokenizer,
            prompts,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            temperature=temp,
            top_p=top_p,
            batch_size=batch_size,
            generator=generator,
            backend=backend,
        )
        texts = decode_completions(tokenizer, batch)
        return score_batch(
            texts, [g for g in golds for _ in range(group_size)], timeout_s=timeout_s
        )

    greedy = run(1, 0.0)
    out = {
        "eval/greedy_acc": sum(r.score for r in greedy) / len(greedy),
        "eval/n": float(len(problems)),
    }
    if k > 1:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        sampled = run(k, temperature, generator)
        groups = [sampled[i * k : (i + 1) * k] for i in range(len(problems))]
        out["eval/pass@1"] = sum(r.score for r in sampled) / len(sampled)
        out[f"eval/maj@{k}"] = sum(
            majority_vote([r.extracted for r in g], [r.score for r in g]) for g in groups
        ) / len(groups)
        out[f"eval/pass@{k}"] = sum(max(r.score for r in g) for g in groups) / len(groups)
    return out
