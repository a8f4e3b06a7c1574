"""Held-out accuracy: greedy pass@1, sampled pass@1, and majority vote over k samples.

Used by ``grpo-lab eval`` and by the demo for start-vs-end accuracy. A completion is correct when
:func:`grpo_lab.rewards.score_batch` scores it 1.0 against the gold answer.

Majority vote (maj@k): the k sampled answers of a problem are grouped by their extracted answer
(whitespace and thousands separators removed); the largest group wins, ties going to the answer
seen first; samples without an answer do not vote. maj@k is the fraction of problems whose winning
answer is correct. pass@k is the fraction with at least one correct sample.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from grpo_lab.data import Problem, render_prompt
from grpo_lab.rewards import score_batch
from grpo_lab.rollout import RolloutBackend, decode_completions, generate


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
    backend: str | RolloutBackend = "hf",
) -> dict[str, float]:
    """Accuracy of `model` on `problems`.

    `backend` is a rollout engine or its name in :data:`grpo_lab.rollout.ROLLOUT_BACKENDS`.
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

    def run(group_size: int, temp: float):
        batch = generate(
            model,
            tokenizer,
            prompts,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            temperature=temp,
            top_p=top_p,
            batch_size=batch_size,
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
        sampled = run(k, temperature)
        groups = [sampled[i * k : (i + 1) * k] for i in range(len(problems))]
        out["eval/pass@1"] = sum(r.score for r in sampled) / len(sampled)
        out[f"eval/maj@{k}"] = sum(
            majority_vote([r.extracted for r in g], [r.score for r in g]) for g in groups
        ) / len(groups)
        out[f"eval/pass@{k}"] = sum(max(r.score for r in g) for g in groups) / len(groups)
    return out
