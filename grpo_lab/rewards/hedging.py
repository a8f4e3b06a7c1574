"""Hedging and multi-part answers: when candidates agree, "or" answers, and gold parts.

Candidates agree when they parse to the same plain number (``1/2`` and ``0.5``; ``x = 3`` and
``3``), are the same word answer (``\\text{Even}`` and ``even``) or, otherwise, are the same
string after light normalisation (:func:`distinct_answers`). An answer that offers alternatives
joined by "or" is a disjunction (:func:`is_disjunction`); inequalities joined by "or" are one
answer, their union (:func:`as_union`).

A hedged extraction's distinct values become one answer when the gold has exactly as many parts
(:func:`gold_parts`, :func:`resolve_parts`), joined in the gold's shape: a list ``a, b``, a set
``\\{a, b\\}`` or a tuple ``(a, b)``. The rules are spelled out in
:mod:`grpo_lab.rewards.extract` ("Hedging", "Multi-part answers").
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from grpo_lab.rewards.markers import gold_answer
from grpo_lab.rewards.normalize import (
    assignment_value,
    compact_latex,
    inequality_interval,
    parse_number,
    text_key,
)

if TYPE_CHECKING:
    from grpo_lab.rewards.extract import Extraction

__all__ = [
    "as_union",
    "disjuncts",
    "distinct_answers",
    "gold_parts",
    "is_disjunction",
    "is_word_answer",
    "resolve_parts",
]

_OR_WORD = re.compile(r"(?<![A-Za-z\\])or(?![A-Za-z])")
_TEXT_JOINER = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*+\{\s*+(or|and)\s*+\}")


def is_word_answer(answer: str) -> bool:
    key = text_key(answer)
    return key is not None and len(key) > 1


def _agreement_key(answer: str) -> object:
    """Key under which two candidates count as the same final answer (see Hedging)."""
    value = assignment_value(answer)
    if value is not None and parse_number(value) is not None:
        answer = value
    number = parse_number(answer)
    if number is not None:
        return number
    key = text_key(answer)
    return ("text", key) if key is not None and len(key) > 1 else compact_latex(answer)


def distinct_answers(candidates: list[str]) -> list[str]:
    """The candidates that differ (by agreement key), in order of first appearance."""
    unique = list(dict.fromkeys(candidates))  # a completion may repeat one answer many times
    if len(unique) == 1:
        return unique
    seen: dict[object, str] = {}
    for candidate in unique:
        seen.setdefault(_agreement_key(candidate), candidate)
    return list(seen.values())


def is_disjunction(answer: str) -> bool:
    """Whether ``answer`` offers alternatives joined by "or" (e.g. ``3 or 4``)."""
    first = len(answer) - len(answer.lstrip())
    end = len(answer.rstrip())
    return any(first < m.start() and m.end() < end for m in _OR_WORD.finditer(answer))


def disjuncts(answer: str) -> list[str]:
    plain = _TEXT_JOINER.sub(r" \1 ", answer)
    parts = [p.strip().strip(",;").strip() for p in _OR_WORD.split(plain)]
    return [p for p in parts if p]


def as_union(answer: str) -> str:
    """``x < -1 \\text{ or } x > 3`` -> ``(-\\infty, -1) \\cup (3, \\infty)``; else ``answer``."""
    if not is_disjunction(answer):
        return answer
    intervals = [inequality_interval(side) for side in disjuncts(answer)]
    return " \\cup ".join(intervals) if len(intervals) > 1 and all(intervals) else answer


_SEPARATOR = re.compile(r",|;|\\text\s*\{\s*and\s*\}|(?<![A-Za-z\\])and(?![A-Za-z])")
_OPENING = re.compile(r"\\\{|\\left\s*[(\[{]|[(\[{]|\\lbrace")
_CLOSING = re.compile(r"\\\}|\\right\s*[)\]}]|[)\]}]|\\rbrace")


def _top_level_split(s: str) -> list[str]:
    """``s`` split at separators outside every bracket (``(``, ``[``, ``{`` and ``\\{``)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        opening = _OPENING.match(s, i)
        closing = _CLOSING.match(s, i) if opening is None else None
        separator = _SEPARATOR.match(s, i) if opening is None and closing is None else None
        if opening is not None:
            depth += 1
            i = opening.end()
        elif closing is not None:
            depth = max(0, depth - 1)
            i = closing.end()
        elif separator is not None and depth == 0:
            parts.append(s[start:i])
            i = start = separator.end()
        else:
            i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


def gold_parts(gold: str) -> tuple[list[str], str]:
    """The parts of a gold answer and how they combine: ``"list"``, ``"set"`` or ``"tuple"``.

    ``1, 2``, ``(1, 2), (4, 5)``, ``m = 3, n = 8`` and ``1 \\pm \\sqrt{2}`` are lists (two parts);
    ``\\{1, 2\\}`` is a set and ``(3, 8)`` a tuple (ordered pair) of two parts; a number
    (``1,234`` included), an interval with ``\\infty`` or a square bracket, and any other single
    expression have one.
    """
    s = compact_latex(gold_answer(gold)) if gold.strip() else ""
    if not s or parse_number(s) is not None:
        return [s], "list"
    parts = _top_level_split(s)
    if len(parts) > 1:
        return parts, "list"
    if s.count("\\pm") == 1 and "(" not in s:
        return [s.replace("\\pm", "+"), s.replace("\\pm", "-")], "list"  # `1 \pm \sqrt{2}`
    for opener, closer, kind in (("\\{", "\\}", "set"), ("(", ")", "tuple")):
        if s.startswith(opener) and s.endswith(closer) and "\\infty" not in s:
            return _top_level_split(s[len(opener) : -len(closer)]), kind
    return [s], "list"


def resolve_parts(found: Extraction, gold: str) -> str | None:
    """One answer from a hedged extraction's parts when the gold has as many parts, else ``None``.

    When every part is an assignment of the same variable (``x = 2``, ``x = 3``) and the gold has
    no ``=``, the values are used.
    """
    if not found.hedged or len(found.parts) < 2:
        return None
    parts, kind = gold_parts(gold)
    if len(parts) != len(found.parts):
        return None
    offered = list(found.parts)
    if not any("=" in p for p in parts):
        values = [assignment_value(p) for p in offered]
        names = {p.split("=")[0].strip() for p in offered}
        if all(v is not None for v in values) and len(names) == 1:
            offered = values
    joined = ", ".join(offered)
    if kind == "set":
        return f"\\{{{joined}\\}}"
    if kind == "tuple":
        return f"({joined})"
    return joined
