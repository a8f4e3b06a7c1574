"""Where a final answer is marked: thinking blocks, GSM8K ``####`` lines and ``\\boxed{}``.

:func:`strip_thinking` removes the thinking of a completion, :func:`find_boxed` returns the
brace-balanced arguments of every ``\\boxed{}`` / ``\\fbox{}``, and :func:`gold_answer`
reduces a dataset's gold (a worked solution or a bare answer) to its answer. The rules that choose
a completion's final answer are in :mod:`grpo_lab.rewards.extract`.
"""

from __future__ import annotations

import re

__all__ = ["GSM8K_LINE", "find_boxed", "gold_answer", "strip_thinking"]

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)

GSM8K_LINE = re.compile(r"####[ \t]*([^\n]*)")
# NOTE: possessive quantifiers (`\s*+`) never give back whitespace; with plain `\s*` a marker
# followed by a long run of spaces costs quadratic time.
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*+\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character, or a brace


def strip_thinking(text: str) -> str:
    """Return ``text`` without its thinking (the three cases: :mod:`grpo_lab.rewards.extract`)."""
    first_close = _THINK_CLOSE.search(text)
    first_open = _THINK_OPEN.search(text)
    if first_close is not None and (first_open is None or first_close.start() < first_open.start()):
        text = text[first_close.end() :]
    # One forward scan (a regex like `<think>.*?</think>` is quadratic on many unclosed tags).
    kept = []
    position = 0
    while True:
        opening = _THINK_OPEN.search(text, position)
        if opening is None:
            kept.append(text[position:])
            break
        kept.append(text[position : opening.start()])
        closing = _THINK_CLOSE.search(text, opening.end())
        if closing is None:
            break  # unclosed: the rest is thinking
        position = closing.end()
    return _THINK_CLOSE.sub(" ", " ".join(kept))


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each ``{`` -> position of its ``}``, in one pass; unclosed ones are absent.

    ``\\{`` and ``\\}`` are literal braces in LaTeX (set notation), so they are skipped.
    """
    matches = {}
    stack = []
    for token in _BRACE_TOKEN.finditer(text):
        brace = token.group()
        if brace == "{":
            stack.append(token.start())
        elif brace == "}" and stack:
            matches[stack.pop()] = token.start()
    return matches


def find_boxed(text: str) -> list[str]:
    """Arguments of every ``\\boxed{}`` / ``\\fbox{}`` in ``text`` (unbalanced ones are skipped)."""
    return [content for _, content in _boxed_with_positions(text)]


def _boxed_with_positions(text: str) -> list[tuple[int, str]]:
    occurrences = list(_BOXED.finditer(text))
    if not occurrences:
        return []
    closing = _matching_braces(text)
    found = []
    for match in occurrences:
        open_brace = match.end() - 1
        if open_brace in closing:
            content = text[open_brace + 1 : closing[open_brace]].strip()
            if content:
                found.append((match.start(), content))
    return found


def gold_answer(gold: str) -> str:
    """Reduce a gold string to its answer.

    A raw GSM8K solution (contains ``####``) becomes the text after the last ``####``; a MATH
    solution containing ``\\boxed{}`` becomes its last boxed argument; anything else is returned
    stripped. This lets a dataset's worked-solution column be used as the gold directly.
    """
    gsm8k = [m.group(1).strip().rstrip(".").strip() for m in GSM8K_LINE.finditer(gold)]
    gsm8k = [g for g in gsm8k if g]
    if gsm8k:
        return gsm8k[-1]
    boxed = find_boxed(gold)
    if boxed:
        return boxed[-1]
    return gold.strip()
