"""Is a predicted final answer equivalent to the gold answer?

Two stages:

1. **Fast path, in-process, no sympy** (:func:`fast_equiv`): decides whenever both sides are plain
   numbers (see ``normalize.py`` for the grammar) or the two strings are identical after layout
   normalisation. Every GSM8K item takes this path.
2. **Symbolic path, in a worker process** (``sandbox.py``): math-verify's LaTeX parser and
   ``verify`` (sympy) under a hard wall-clock and memory bound. Before anything is sent, the answer
   is screened in-process (:func:`prescreen`).

Decisions
---------
* **Integers are exact.** When the gold is an integer, the prediction must have exactly that value
  (``72``, ``72.0``, ``72.00``, ``144/2`` match; ``72.0000001`` does not).
* **Non-integer golds allow a relative error of 1e-6**: ``|pred - gold| <= 1e-6 * |gold|``. So
  ``0.333333`` matches ``\\frac{1}{3}`` but ``0.33`` does not.
* **Fractions compare by value**: ``2/4`` equals ``1/2``, ``\\frac{3}{4}`` equals ``0.75`` (the
  reward checks the answer, not its presentation).
* **Percent is a unit**: ``50%`` equals ``50`` and ``50\\%``, NOT ``0.5`` (GSM8K asks for "what
  percent" and records ``50``).
* **Units and currency are dropped** conservatively (``$18``, ``18 dollars``,
  ``5\\text{ cm}^2``, ``30^\\circ`` read as plain numbers); see ``normalize.py``.
* **Tuples are ordered, sets and lists are not**: ``(1, 2)`` differs from ``(2, 1)``;
  ``\\{1, 2\\}`` equals ``\\{2, 1\\}`` and the bare list ``1, 2`` equals ``2, 1``. A set or list
  compared with a tuple matches only element by element in the written order (math-verify's rule):
  ``\\{1, 2, 3\\}`` matches ``(1, 2, 3)``, ``\\{2, 1\\}`` does not match ``(1, 2)``.
* **Intervals keep their openness**: ``(1, 2]`` differs from ``(1, 2)`` and ``[1, 2]``. NOTE:
  ``(1, 2)`` is both an open interval and an ordered pair; math-verify parses it as an interval
  but lets it match the pair ``1, 2`` in that order.
* **Inequalities against intervals**: ``x > 2`` equals ``(2, \\infty)`` and ``-1 \\le x < 3``
  equals ``[-1, 3)`` (the inequality is rewritten as its interval, ``normalize.inequality_interval``;
  math-verify alone says they differ).
* **Plus-minus** stands for its two values: ``\\frac{-1 \\pm \\sqrt{5}}{2}`` equals
  ``\\frac{-1+\\sqrt{5}}{2}, \\frac{-1-\\sqrt{5}}{2}`` (in any order).
* **Equations**: a single-variable assignment matches its value (``x=3`` equals ``3``, either side)
  and equations match when they are the same relation (``y=2x+1`` equals ``y=1+2x``); lists of
  assignments match in any order (``a = 4, b = 7`` equals ``b=7,a=4``).
* **Text answers** (a gold that is a word, or is wrapped in ``\\text{}``) compare in-process after
  dropping ``\\text``/``\\mathrm``/``\\textbf``-like wrappers, spaces and case: ``$\\text{Even}$``
  equals ``even``, ``(C)`` and ``(C) 12`` equal ``\\text{(C)}``; anything else is wrong. Word
  answers never reach sympy, which would read ``east`` as the product ``e*a*s*t`` (so ``seat``).
* **Symbolic expressions** are equal when sympy proves it (``\\sqrt{8}`` equals ``2\\sqrt{2}``,
  ``(x+1)^2`` equals ``x^2+2x+1``); ``\\pi`` equals ``3.14159265`` within 6 decimals but not
  ``3.14``.

Pre-screen (status ``"parse_error"``, nothing is sent to a worker)
------------------------------------------------------------------
* an answer longer than ``max_chars`` (default 2,000);
* a double underscore (``__import__``, ``__class__``): no mathematics uses it;
* an integer power or power tower whose value would have more than 10,000 digits
  (``9^{9^{9^{9}}}``, ``10^{10^{10}}``, ``2^{100000}``), or a factorial of more than 1,000
  (``1000000!``).

Anything the screen misses is still bounded by the worker's timeout and memory limit.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from grpo_lab.rewards.normalize import (
    compact_latex,
    expand_plus_minus,
    inequality_interval,
    looks_like_interval,
    parse_number,
    text_key,
)
from grpo_lab.rewards.sandbox import VerifierPool, get_default_pool

__all__ = [
    "DEFAULT_MAX_CHARS",
    "RELATIVE_TOLERANCE",
    "compare",
    "fast_equiv",
    "is_equiv",
    "prescreen",
]

DEFAULT_MAX_CHARS = 2000
RELATIVE_TOLERANCE = Fraction(1, 10**6)
MAX_RESULT_DIGITS = 10_000
MAX_FACTORIAL = 1000

# A chain of integer powers: `9^{9^{9}}`, `10^10`, `2^{(3)}`, `10^{-10^{10}}`; braces,
# parentheses and a minus sign may open before each exponent (1/10^(10^10) is as costly as
# 10^(10^10)), and braces close anywhere after the chain.
# NOTE: `(?<!\d)` starts a match only at the first digit of a number; without it a long digit run
# costs quadratic time.
_POWER_CHAIN = re.compile(r"(?<!\d)\d+(?:\s*\^\s*[{(\s-]*\d+)+")
_FACTORIAL = re.compile(r"(?<!\d)(\d+)\s*[})]?\s*!")


def _tower_digits(numbers: list[int]) -> float:
    """Decimal digits (log10) of the right-associative tower ``numbers[0]^(numbers[1]^(...))``."""
    if numbers[-1] == 0:
        return 0.0
    log10_value = math.log10(numbers[-1])
    for base in reversed(numbers[:-1]):
        if base <= 1:
            return 0.0  # 0^x and 1^x are tiny, whatever x is
        if log10_value > 300:
            return math.inf
        # log10(base ** value) = value * log10(base)
        log10_value = 10**log10_value * math.log10(base)
    return log10_value


def prescreen(answer: str, *, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """Why ``answer`` must not reach the symbolic parser, or ``None`` if it may."""
    if len(answer) > max_chars:
        return f"longer than {max_chars} characters"
    if "__" in answer:
        return "contains a double underscore"
    for chain in _POWER_CHAIN.finditer(answer):
        numbers = [int(n) for n in re.findall(r"\d+", chain.group())]
        # Every upper part of the tower is evaluated too: `0^{10^{10^{10}}}` is 0 but costs 10^10^10.
        if any(_tower_digits(numbers[i:]) > MAX_RESULT_DIGITS for i in range(len(numbers) - 1)):
            return "power with too many digits"
    for match in _FACTORIAL.finditer(answer):
        if int(match.group(1)) > MAX_FACTORIAL:
            return "factorial too large"
    return None


def _numbers_equal(pred: Fraction, gold: Fraction) -> bool:
    if pred == gold:
        return True
    if gold.denominator == 1:
        return False
    return abs(pred - gold) <= RELATIVE_TOLERANCE * abs(gold)


# A multiple-choice letter at the start of an answer, followed by what the choice says.
_CHOICE = re.compile(r"\s*(?:\\text(?:bf)?\{)?\(([A-Ea-e])\)\}?\s")


def _gold_text_key(gold: str) -> str | None:
    """The text key of a gold that is a word answer: ``\\text{...}``-wrapped, or two letters or more."""
    key = text_key(gold)
    if key is None or (len(key) < 2 and "\\" not in gold):
        return None  # a lone letter is a variable unless the gold wrote it as text
    return key


def _as_intervals(pred: str, gold: str) -> tuple[str, str]:
    """An inequality compared with an interval is rewritten as the interval it describes."""
    if "," in gold and (interval := inequality_interval(pred)) and looks_like_interval(gold):
        return interval, gold
    if "," in pred and (interval := inequality_interval(gold)) and looks_like_interval(pred):
        return pred, interval
    return pred, gold


def fast_equiv(pred: str, gold: str) -> bool | None:
    """Decide in-process if possible: ``True``/``False``, or ``None`` when sympy is needed."""
    if pred == gold or compact_latex(pred) == compact_latex(gold):
        return True
    gold_key = _gold_text_key(gold)
    if gold_key is not None:
        if len(gold_key) == 1 and (choice := _CHOICE.match(pred)) is not None:
            pred = choice.group(1)  # a choice letter, then its content: "(B) 12"
        return text_key(pred) == gold_key
    gold_value = parse_number(gold)
    if gold_value is None:
        return None
    pred_value = parse_number(pred)
    if pred_value is None:
        return None
    return _numbers_equal(pred_value, gold_value)


def compare(
    pairs: list[tuple[str, str]],
    *,
    timeout_s: float = 2.0,
    max_chars: int = DEFAULT_MAX_CHARS,
    pool: VerifierPool | None = None,
) -> list[str]:
    """Status of each ``(pred, gold)``: ``correct``, ``wrong``, ``timeout`` or ``parse_error``.

    The fast path and the pre-screen run in-process; only the remaining distinct pairs are sent to
    the worker pool (``pool`` or the process-wide default), one hard ``timeout_s`` bound per pair.
    """
    statuses: list[str | None] = [None] * len(pairs)
    deferred: dict[tuple[str, str], list[int]] = {}
    for i, (pred, gold) in enumerate(pairs):
        if prescreen(pred, max_chars=max_chars) or prescreen(gold, max_chars=max_chars):
            statuses[i] = "parse_error"
            continue
        pred, gold = _as_intervals(expand_plus_minus(pred), expand_plus_minus(gold))
        decided = fast_equiv(pred, gold)
        if decided is not None:
            statuses[i] = "correct" if decided else "wrong"
        else:
            deferred.setdefault((pred, gold), []).append(i)
    if deferred:
        unique = list(deferred)
        verdicts = (pool or get_default_pool()).verify_many(unique, timeout_s=timeout_s)
        for pair, verdict in zip(unique, verdicts, strict=True):
            for i in deferred[pair]:
                statuses[i] = verdict
    return [s if s is not None else "parse_error" for s in statuses]


def is_equiv(
    pred: str,
    gold: str,
    *,
    timeout_s: float = 2.0,
    max_chars: int = DEFAULT_MAX_CHARS,
    pool: VerifierPool | None = None,
) -> bool:
    """Whether the answer ``pred`` equals ``gold`` under the decisions in the module docstring.

    Both arguments are final answers (already extracted), not whole completions. A timeout or a
    parse error counts as not equal.
    """
    status = compare([(pred, gold)], timeout_s=timeout_s, max_chars=max_chars, pool=pool)[0]
    return status == "correct"
