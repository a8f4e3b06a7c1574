"""Final-answer extraction from a model completion.

Conventions
-----------
Thinking is removed first:

* every closed ``<think> ... </think>`` block is dropped;
* a ``</think>`` with no ``<think>`` before it means the chat template opened the thinking block in
  the prompt (the R1/Qwen3 convention), so everything up to and including it is dropped;
* an unclosed ``<think>`` means the rest of the completion is thinking: only the text before it is
  kept (usually nothing, so such a completion has no answer).

Then the first rule below that finds at least one candidate decides; lower rules are not
consulted, even to detect hedging:

1. ``####`` (GSM8K): the rest of the line after each ``####``.
2. ``\\boxed{...}`` / ``\\fbox{...}``: the brace-balanced argument of each occurrence; escaped
   braces ``\\{`` ``\\}`` do not count, nested braces are fine, and an occurrence whose braces never
   close yields nothing.
3. "final answer is ..." / "the answer is ..." (case-insensitive).
4. "Answer: ..." (case-insensitive; also "**Answer:**"; if the line is empty after the colon, the
   next non-empty line).
5. Last resort: the whole stripped completion is a single plain number (``42``, ``-3.5``,
   ``1,234``, ``3/4``); this is what tiny synthetic tasks produce.

For rules 3 and 4 a candidate is cut at the end of its sentence; a leading ``$...$``, ``\\(...\\)``
or ``\\[...\\]`` span is taken whole, markdown bold is unwrapped and a trailing period is dropped.

The chosen answer is the LAST candidate of the deciding rule.

Hedging
-------
A completion is *hedged* (it scores 0) when

* the candidates of the deciding rule do not all agree: candidates agree when they parse to the same
  plain number (``1/2`` and ``0.5`` agree) or, otherwise, are the same string after light
  normalisation (spaces, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``). NOTE: this is
  deliberately string-level for non-numbers, so ``\\boxed{\\sqrt{2}/2}`` followed by
  ``\\boxed{\\frac{\\sqrt{2}}{2}}`` counts as hedging; repeating the same answer is fine; or
* the chosen answer is a disjunction: it contains the word ``or`` (plain or inside ``\\text{}``)
  with something on both sides, e.g. "3 or 4". Several solutions must be written as a list or set
  (``3, 4`` or ``\\{3, 4\\}``), which is how MATH writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grpo_lab.rewards.normalize import compact_latex, parse_number

__all__ = [
    "Extraction",
    "extract_answer",
    "extract_final",
    "find_boxed",
    "gold_answer",
    "is_disjunction",
    "strip_thinking",
]

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)

_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
# NOTE: possessive quantifiers (`\s*+`) never give back whitespace; with plain `\s*` a marker
# followed by a long run of spaces costs quadratic time.
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*+\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character, or a brace
_FINAL_PHRASE = re.compile(r"\b(?:final\s++answer|the\s++answer)\s++is\b\s*+:?", re.IGNORECASE)
_ANSWER_COLON = re.compile(r"\banswer\s*+(?:\*\*|__)?\s*+:", re.IGNORECASE)

_OR_WORD = re.compile(r"(?<![A-Za-z\\])or(?![A-Za-z])")
_PHRASE_WINDOW = 10_000
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_final` found in a completion.

    Attributes:
        answer: the chosen final answer (last candidate of the deciding rule), or ``None``.
        rule: which rule decided: ``"gsm8k"``, ``"boxed"``, ``"final_phrase"``, ``"answer_colon"``,
            ``"bare_number"``, or ``None`` when nothing was found.
        candidates: every candidate of the deciding rule, in order of appearance.
        hedged: whether the completion commits to more than one final answer (see module doc).
    """

    answer: str | None
    rule: str | None
    candidates: tuple[str, ...]
    hedged: bool


def strip_thinking(text: str) -> str:
    """Return ``text`` without its thinking (see the module docstring for the three cases)."""
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
                found.append(content)
    return found


def _clean_phrase_answer(rest: str) -> str:
    """Cut the answer that follows "the answer is" / "Answer:" out of the rest of the text."""
    rest = rest.lstrip(" \t*_")
    if rest.startswith("\n"):
        lines = [line for line in rest.split("\n") if line.strip()]
        rest = lines[0].lstrip(" \t*_") if lines else ""
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            if end != -1:
                return rest[len(opener) : end].strip()
            break
    end = _SENTENCE_END.search(rest)
    answer = rest[: end.start()] if end is not None else rest
    return answer.strip().rstrip("*_ \t").rstrip(".,;:").strip()


def _phrase_candidates(text: str, pattern: re.Pattern[str]) -> list[str]:
    found = []
    for match in pattern.finditer(text):
        # A bounded window keeps many markers in a huge text linear; a longer answer would be
        # refused by the pre-screen anyway.
        answer = _clean_phrase_answer(text[match.end() : match.end() + _PHRASE_WINDOW])
        if answer:
            found.append(answer)
    return found


def _gsm8k_candidates(text: str) -> list[str]:
    found = []
    for match in _GSM8K.finditer(text):
        answer = match.group(1).strip().rstrip(".").strip()
        if answer:
            found.append(answer)
    return found


def _agreement_key(answer: str) -> object:
    """Key under which two candidates count as the same final answer (see Hedging)."""
    number = parse_number(answer)
    return number if number is not None else compact_latex(answer)


def _all_agree(candidates: list[str]) -> bool:
    distinct = iter(set(candidates))  # a completion may repeat one answer thousands of times
    first = _agreement_key(next(distinct))
    return all(_agreement_key(c) == first for c in distinct)


def is_disjunction(answer: str) -> bool:
    """Whether ``answer`` offers alternatives joined by "or" (e.g. ``3 or 4``)."""
    first = len(answer) - len(answer.lstrip())
    end = len(answer.rstrip())
    return any(first < m.start() and m.end() < end for m in _OR_WORD.finditer(answer))


def extract_final(text: str) -> Extraction:
    """Find the final answer of ``text`` and whether it hedges; see the module docstring."""
    body = strip_thinking(text)
    rules = (
        ("gsm8k", _gsm8k_candidates),
        ("boxed", find_boxed),
        ("final_phrase", lambda t: _phrase_candidates(t, _FINAL_PHRASE)),
        ("answer_colon", lambda t: _phrase_candidates(t, _ANSWER_COLON)),
    )
    for name, rule in rules:
        candidates = rule(body)
        if candidates:
            answer = candidates[-1]
            hedged = not _all_agree(candidates) or is_disjunction(answer)
            return Extraction(answer, name, tuple(candidates), hedged)
    bare = body.strip().rstrip(".").strip()
    if parse_number(bare, allow_units=False) is not None:
        return Extraction(bare, "bare_number", (bare,), False)
    return Extraction(None, None, (), False)


def extract_answer(text: str) -> str | None:
    """The final answer of ``text``, or ``None`` if there is none or the completion hedges."""
    found = extract_final(text)
    return None if found.hedged else found.answer


def gold_answer(gold: str) -> str:
    """Reduce a gold string to its answer.

    A raw GSM8K solution (contains ``####``) becomes the text after the last ``####``; a MATH
    solution containing ``\\boxed{}`` becomes its last boxed argument; anything else is returned
    stripped. This lets a dataset's worked-solution column be used as the gold directly.
    """
    gsm8k = _gsm8k_candidates(gold)
    if gsm8k:
        return gsm8k[-1]
    boxed = find_boxed(gold)
    if boxed:
        return boxed[-1]
    return gold.strip()
