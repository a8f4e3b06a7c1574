"""Rule-based math reward: completion + gold answer -> 1.0 (correct) or 0.0.

Pipeline per item: reduce the gold to its answer (``markers.gold_answer``), extract the final
answer of the completion (``extract.extract_final``; several values offered for a gold with as
many parts are joined into one answer, ``hedging.resolve_parts``), then compare
(``equivalence.compare``: in-process fast path, in-process pre-screen, otherwise a sandboxed
worker with a hard time bound).

Statuses (``ScoreResult.status``)
---------------------------------
``correct``      the extracted answer equals the gold (score 1.0). The only status scoring 1.
``wrong``        an answer was extracted and compared, and it is not equal to the gold.
``no_answer``    no final answer was found (no marker, unbalanced ``\\boxed{``, answer only inside
                 ``<think>``, unclosed ``<think>``, ...).
``hedged``       the completion commits to more than one final answer (``extract.py`` defines it);
                 several values against a gold with as many parts are one multi-part answer
                 instead (``hedging.resolve_parts``) and are compared. Values that all equal
                 the gold (``$2\\pi$, or equivalently $4\\pi/2$``; at most 4 of them) are one
                 answer written in several forms: ``correct``.
``timeout``      the symbolic comparison ran past ``timeout_s`` and its worker was killed.
``parse_error``  the answer was refused by the pre-screen (too long, dangerous), math-verify could
                 not read it, or the worker raised (e.g. ``MemoryError``) or died.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpo_lab.rewards.equivalence import DEFAULT_MAX_CHARS, compare
from grpo_lab.rewards.extract import extract_final
from grpo_lab.rewards.hedging import resolve_parts
from grpo_lab.rewards.markers import gold_answer
from grpo_lab.rewards.sandbox import VerifierPool

__all__ = ["STATUSES", "ScoreResult", "math_reward", "score_batch"]

STATUSES = ("correct", "wrong", "no_answer", "hedged", "timeout", "parse_error")
# A hedge offering more values than this is not checked value by value (it scores 0 at once).
MAX_HEDGE_PARTS = 4


@dataclass(frozen=True)
class ScoreResult:
    """The reward for one completion.

    Attributes:
        score: 1.0 when ``status == "correct"``, else 0.0.
        status: one of :data:`STATUSES` (see the module docstring).
        extracted: the extracted final answer (a multi-part answer joined as the gold is written);
            for ``"hedged"`` the last candidate; ``None`` when nothing was extracted.
    """

    score: float
    status: str
    extracted: str | None


def score_batch(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    timeout_s: float = 2.0,
    max_chars: int = DEFAULT_MAX_CHARS,
    pool: VerifierPool | None = None,
) -> list[ScoreResult]:
    """Score ``completions[i]`` against ``golds[i]``.

    Args:
        completions: model outputs (plain text; thinking inside ``<think>`` is ignored).
        golds: gold answers (``"72"``, ``"\\frac{1}{2}"``), or worked solutions ending in
            ``#### N`` / containing ``\\boxed{}``, which are reduced to their answer.
        timeout_s: hard wall-clock bound per item that needs the symbolic checker.
        max_chars: longest extracted answer (and gold) sent to the parser; longer is
            ``"parse_error"``.
        pool: worker pool for symbolic checks; default: the process-wide pool.

    Returns:
        One :class:`ScoreResult` per completion, in order.

    Raises:
        ValueError: the two sequences differ in length, or a gold is not a non-empty string.
        TypeError: a single string was passed instead of a sequence.
    """
    if isinstance(completions, str) or isinstance(golds, str):
        raise TypeError("completions and golds must be sequences of strings, not a single string")
    if len(completions) != len(golds):
        raise ValueError(
            f"completions and golds must have the same length, got {len(completions)} "
            f"completions and {len(golds)} golds"
        )
    for i, gold in enumerate(golds):
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"golds[{i}] must be a non-empty string, got {gold!r}")
    results: list[ScoreResult | None] = [None] * len(completions)
    to_compare: list[tuple[str, str]] = []
    compare_index: list[tuple[int, int]] = []  # (item, its pair in to_compare)
    # Hedged items whose every offered value may equal the gold: (item, first pair, pair count).
    hedges: list[tuple[int, int, int]] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        found = extract_final(completion)
        gold_text = gold_answer(gold)
        answer = resolve_parts(found, gold_text) if found.hedged else found.answer
        if found.answer is None:
            results[i] = ScoreResult(0.0, "no_answer", None)
        elif answer is not None:
            compare_index.append((i, len(to_compare)))
            to_compare.append((answer, gold_text))
        elif 1 < len(found.parts) <= MAX_HEDGE_PARTS:
            hedges.append((i, len(to_compare), len(found.parts)))
            to_compare.extend((part, gold_text) for part in found.parts)
        else:
            results[i] = ScoreResult(0.0, "hedged", found.answer)
    statuses = compare(to_compare, timeout_s=timeout_s, max_chars=max_chars, pool=pool)
    for i, position in compare_index:
        status = statuses[position]
        results[i] = ScoreResult(
            1.0 if status == "correct" else 0.0, status, to_compare[position][0]
        )
    for i, first, count in hedges:
        # The same answer written in several forms (`2\pi`, or equivalently `4\pi/2`) is one
        # answer; any value that differs from the gold makes it a hedge.
        same = all(status == "correct" for status in statuses[first : first + count])
        answer = extract_final(completions[i]).answer
        results[i] = (
            ScoreResult(1.0, "correct", answer) if same else ScoreResult(0.0, "hedged", answer)
        )
    return results


def math_reward(completion: str, gold: str, *, timeout_s: float = 2.0) -> float:
    """1.0 if ``completion``'s final answer equals ``gold``, else 0.0 (see :func:`score_batch`)."""
    return score_batch([completion], [gold], timeout_s=timeout_s)[0].score
