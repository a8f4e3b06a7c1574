"""Final-answer extraction from a model completion.

Conventions
-----------
Thinking is removed first:

* every closed ``<think> ... </think>`` block is dropped;
* a ``</think>`` with no ``<think>`` before it means the chat template opened the thinking block in
  the prompt (the R1/Qwen3 convention), so everything up to and including it is dropped;
* an unclosed ``<think>`` means the rest of the completion is thinking: only the text before it is
  kept (usually nothing, so such a completion has no answer).

Then the first tier below that finds at least one candidate decides; lower tiers are not
consulted, even to detect hedging:

1. ``####`` (GSM8K): the rest of the line after each ``####``.
2. ``\\boxed{...}`` / ``\\fbox{...}``: the brace-balanced argument of each occurrence; escaped
   braces ``\\{`` ``\\}`` do not count, nested braces are fine, and an occurrence whose braces never
   close yields nothing.
3. Answer phrases, in order of appearance (case-insensitive):

   * ``final_phrase``: "final answer is ...", "answer is ...", "answers are ...", "answer would
     be ...", and the reverse "``$x$``/``12`` is the (final) answer";
   * ``answer_colon``: "Answer: ...", "Final Answer: ..." (also "**Answer:**"; if the line is empty
     after the colon, the next non-empty line), "Answer" followed directly by display math
     ``\\[ ... \\]`` or ``$$ ... $$`` (no colon needed), and a heading line that is only "Answer"
     or "Final Answer" ("**Final Answer**", "## Final Answer"), read on the next non-empty line.

4. ``last_line``: the completion's last line is only math in ``$...$``, ``\\(...\\)``, ``\\[...\\]``
   or ``$$...$$`` (several spans joined by ",", "and" or "or" count; a trailing period and a lead-in
   "Therefore," / "Thus," / "So," / "Hence," / "Final answer" are allowed). Math in the middle of
   prose is NOT an answer: "... so the total is $12$ and we are done." has none.
5. ``bare_number``, the last resort: the whole stripped completion is a single plain number
   (``42``, ``-3.5``, ``1,234``, ``3/4``); this is what tiny synthetic tasks produce.

Reading the answer after a phrase (tiers 1 and 3)
-------------------------------------------------
The text after the marker is read up to the end of its sentence (a period before whitespace, or a
newline; math spans are skipped over whole, so ``\\[ ... \\]`` may span lines):

* math spans first: a leading ``$...$``/``\\(...\\)``/``\\[...\\]``/``$$...$$`` is the answer, with
  any spans joined to it by ",", "and" (giving the list ``a, b``) or "or" (kept, see Hedging);
* a sentence that is all math (no word of two letters or more outside braces, besides "and"/"or"
  between math) or a plain number with units (``1,234 dollars``) is the answer as written;
* otherwise the sentence is prose, e.g. ``Final Answer: The smallest $k$ is 17.``: the answer is
  the math after its last linking word (``is``, ``are``, ``was``, ``be``, ``equals``, ``=``, ``:``)
  that is followed by math (``17``); else the math the sentence starts with (``3`` in "3 since it
  is prime"); else its last math span or number; else the words after its last linking word, or
  the whole sentence, as a text answer (``The function is even.`` gives ``even``).

Markdown bold is unwrapped and trailing punctuation dropped. The chosen answer is the LAST
candidate of the deciding tier (``rule`` names the rule that found it). When that answer is math,
earlier candidates that are only words ("... whether the answer is an integer ...") are dropped:
they restate the question. NOTE: only the last 256 markers of each phrase kind are read, so a
completion repeating a phrase thousands of times stays linear to scan.

Hedging
-------
A completion is *hedged* (it scores 0) when

* the candidates of the deciding tier do not all agree: candidates agree when they parse to the
  same plain number (``1/2`` and ``0.5`` agree; ``x = 3`` and ``3`` agree), are the same word
  answer (``\\text{Even}`` and ``even``) or, otherwise, are the same string after light
  normalisation (spaces, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``). NOTE: this is
  deliberately string-level for non-numbers, so ``\\boxed{\\sqrt{2}/2}`` followed by
  ``\\boxed{\\frac{\\sqrt{2}}{2}}`` counts as hedging; repeating the same answer is fine; or
* the chosen answer is a disjunction: it contains the word ``or`` (plain or inside ``\\text{}``)
  with something on both sides, e.g. "3 or 4", and its sides do not all agree ("$\\frac{1}{2}$
  or $0.5$" is the answer ``\\frac{1}{2}``). Inequalities joined by "or" are one answer, their
  union: ``x < -1 \\text{ or } x > 3`` is ``(-\\infty, -1) \\cup (3, \\infty)``.

Multi-part answers
------------------
A hedged extraction keeps the distinct values it offered in ``parts`` (the distinct candidates in
order of first appearance, or the sides of the "or"). :func:`resolve_parts` turns them into one
answer when the gold has exactly as many parts (:func:`gold_parts`): ``\\boxed{m = 3}`` and
``\\boxed{n = 8}`` against ``m = 3, n = 8``; ``\\boxed{(1, 2)} \\text{ and } \\boxed{(4, 5)}``
against ``(1, 2), (4, 5)``; ``x = 2 or x = 3`` against ``2, 3``. The parts are joined in the
gold's shape: a list ``a, b`` (compared as a set), a set ``\\{a, b\\}``, or a tuple ``(a, b)``
(compared in order). Against a single-valued gold nothing is resolved: the completion stays hedged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grpo_lab.rewards.clause import clause_tokens, read_clause, span_chain
from grpo_lab.rewards.hedging import (
    as_union,
    disjuncts,
    distinct_answers,
    gold_parts,
    is_disjunction,
    is_word_answer,
    resolve_parts,
)
from grpo_lab.rewards.markers import GSM8K_LINE, find_boxed, gold_answer, strip_thinking
from grpo_lab.rewards.normalize import parse_number

# find_boxed, gold_answer, gold_parts, is_disjunction, resolve_parts and strip_thinking live in
# markers.py and hedging.py and are part of this module's interface.
__all__ = [
    "Extraction",
    "extract_answer",
    "extract_final",
    "find_boxed",
    "gold_answer",
    "gold_parts",
    "is_disjunction",
    "resolve_parts",
    "strip_thinking",
]

# Phrase markers are matched where the word "answer" starts: a literal search finds those fast,
# and the patterns below are then tried at each (`.match`), never scanned over the whole text.
_ANSWER_WORD = re.compile("answer", re.IGNORECASE)
_FINAL_PHRASE = re.compile(
    r"answers?\s++(?:is|are|(?:would|will|should)\s++be)\b\s*+:?", re.IGNORECASE
)
# "... is the (final) answer", ending where the word "answer" starts.
_REVERSE_PHRASE = re.compile(
    r"\b(?:is|would\s++be)\s++(?:the|my|our)\s++(?:final\s++)?\Z", re.IGNORECASE
)
# What stands right before the reverse phrase (searched in a bounded window before it).
_REVERSE_ANSWER = re.compile(
    r"(?:\$(?P<dollar>[^$\n]{1,300})\$|\\\((?P<paren>[^\n]{1,300}?)\\\)"
    r"|(?<![\d.,])(?P<number>[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?))\s*+(?:\*\*)?\s*+\Z"
)
_REVERSE_WINDOW = 320
# Only the last markers of each kind are read: a completion repeating a phrase thousands of times
# would otherwise cost a clause reading per repetition.
_MAX_MARKERS = 256
_LAST_LINE_CHARS = 4_000
_ANSWER_COLON = re.compile(
    r"answer(?:\s*+(?:\*\*|__)?\s*+:|[\s*_.:]*+(?=\\\[|\$\$))", re.IGNORECASE
)
# "Final Answer" as a heading on its own line ("**Final Answer**", "## Final Answer"): the answer
# is on the next non-empty line.
_ANSWER_HEADING = re.compile(r"answer[ \t]*+(?:\*\*|__)?[ \t]*+(?=\r?\n)", re.IGNORECASE)
_HEADING_START = re.compile(r"[ \t#*_>]*+(?:final[ \t]++)?", re.IGNORECASE)
# End-of-text tokens a decoded completion may still carry ("$12$<|im_end|>").
_END_TOKENS = re.compile(r"(?:\s*+(?:<\|[a-z_]{1,20}\|>|</s>))+\s*+\Z")
_LAST_LINE_CUE = re.compile(
    r"(?:(?:therefore|thus|hence|so|finally)\b\s*+,?|(?:the\s++)?(?:final\s++)?answer\b\s*+:?)\s*+",
    re.IGNORECASE,
)
_PHRASE_WINDOW = 10_000


@dataclass(frozen=True)
class Extraction:
    """What :func:`extract_final` found in a completion.

    Attributes:
        answer: the chosen final answer (last candidate of the deciding tier), or ``None``.
        rule: which rule found it: ``"gsm8k"``, ``"boxed"``, ``"final_phrase"``,
            ``"answer_colon"``, ``"last_line"``, ``"bare_number"``, or ``None`` when nothing was
            found.
        candidates: every candidate of the deciding tier, in order of appearance.
        hedged: whether the completion commits to more than one final answer (see module doc).
        parts: when hedged, the distinct values offered, in order (see Multi-part answers).
    """

    answer: str | None
    rule: str | None
    candidates: tuple[str, ...]
    hedged: bool
    parts: tuple[str, ...] = ()


def _answer_words(text: str) -> list[int]:
    """Where the word "answer" (any case, also "answers") starts in ``text``."""
    return [
        m.start()
        for m in _ANSWER_WORD.finditer(text)
        if m.start() == 0 or not (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_")
    ]


def _phrase_candidates(
    text: str, words: list[int], pattern: re.Pattern[str], rule: str
) -> list[tuple[int, str, str]]:
    """(position, answer, rule) for each marker; a marker's clause ends at the next marker."""
    matches = [m for m in (pattern.match(text, w) for w in words) if m is not None]
    matches = matches[-_MAX_MARKERS:]
    found = []
    for k, match in enumerate(matches):
        # A bounded window keeps many markers in a huge text linear; a longer answer would be
        # refused by the pre-screen anyway.
        stop = match.end() + _PHRASE_WINDOW
        if k + 1 < len(matches):
            stop = min(stop, matches[k + 1].start())
        answer = read_clause(text[match.end() : stop])
        if answer:
            found.append((match.start(), answer, rule))
    return found


def _reverse_candidates(text: str, words: list[int]) -> list[tuple[int, str, str]]:
    found = []
    for word in words[-_MAX_MARKERS:]:
        end = word + len("answer")
        if end < len(text) and (text[end].isalnum() or text[end] == "_"):
            continue  # "answers", "answered"
        cue = _REVERSE_PHRASE.search(text, max(0, word - 40), word)
        if cue is None:
            continue
        before = text[max(0, cue.start() - _REVERSE_WINDOW) : cue.start()]
        match = _REVERSE_ANSWER.search(before)
        if match is None:
            continue
        answer = next(g for g in match.group("dollar", "paren", "number") if g is not None)
        if answer.strip():
            found.append((cue.start(), answer.strip(), "final_phrase"))
    return found


def _gsm8k_candidates(text: str) -> list[str]:
    found = []
    read: dict[str, str | None] = {}  # a completion may repeat one line many times
    for match in GSM8K_LINE.finditer(text):
        line = match.group(1).strip().rstrip(".").strip()
        if not line:
            continue
        if line not in read:
            # A plain number (possibly with units) is kept as written; prose is read like a phrase.
            read[line] = line if parse_number(line) is not None else read_clause(line)
        if read[line]:
            found.append(read[line])
    return found


def _phrases(text: str) -> list[tuple[int, str, str]]:
    words = _answer_words(text)
    if not words:
        return []
    headings = [
        w
        for w in words
        if _HEADING_START.fullmatch(text, text.rfind("\n", max(0, w - 80), w) + 1, w)
    ]
    found = (
        _phrase_candidates(text, words, _FINAL_PHRASE, "final_phrase")
        + _reverse_candidates(text, words)
        + _phrase_candidates(text, words, _ANSWER_COLON, "answer_colon")
        + _phrase_candidates(text, headings, _ANSWER_HEADING, "answer_colon")
    )
    return sorted(found, key=lambda item: item[0])


def _last_line(text: str) -> str | None:
    """The math on the last line, when that line is only math (see rule 4)."""
    text = text.rstrip()
    s = _END_TOKENS.sub("", text[-_LAST_LINE_CHARS:])
    s = s.rstrip().rstrip("*_").rstrip().rstrip(".").rstrip().rstrip("*_")
    s = s.rstrip()
    if not s.endswith(("$", "\\]", "\\)")) or "\n" not in s and len(text) > _LAST_LINE_CHARS:
        return None  # longer than any answer the pre-screen lets through
    line_start = s.rfind("\n") + 1
    for opener, closer in (("$$", "$$"), ("\\[", "\\]")):
        if s.endswith(closer) and len(s) >= 2 * len(closer):
            opening = s.rfind(opener, 0, len(s) - len(closer))
            if opening != -1:
                line_start = min(line_start, s.rfind("\n", 0, opening) + 1)
            break
    line = s[line_start:].lstrip(" \t*_#>-")
    cue = _LAST_LINE_CUE.match(line)
    if cue is not None:
        line = line[cue.end() :]
    tokens = clause_tokens(line)
    if not tokens:
        return None
    chain = span_chain(tokens, 0)
    if chain is None:
        return None
    answer, after = chain
    if any(t.content.strip(" \t*_,;:") for t in tokens[after:]):
        return None  # more than math on the line
    if len(tokens) and tokens[-1].end < len(line.rstrip()):
        return None  # a sentence end inside the line: prose follows
    return answer


def _extraction(candidates: list[str], rule: str) -> Extraction:
    answer = as_union(candidates[-1])
    candidates = [*candidates[:-1], answer]
    distinct = distinct_answers(candidates)
    if len(distinct) > 1:
        return Extraction(answer, rule, tuple(candidates), True, tuple(distinct))
    if is_disjunction(answer):
        sides = disjuncts(answer)
        distinct_sides = distinct_answers(sides)
        if len(distinct_sides) > 1:
            return Extraction(answer, rule, tuple(candidates), True, tuple(distinct_sides))
        # "$\frac{1}{2}$ or $0.5$": one value written twice is not a hedge
        return Extraction(sides[0], rule, tuple(candidates), False)
    return Extraction(answer, rule, tuple(candidates), False)


def extract_final(text: str) -> Extraction:
    """Find the final answer of ``text`` and whether it hedges; see the module docstring."""
    body = strip_thinking(text)
    gsm8k = _gsm8k_candidates(body)
    if gsm8k:
        return _extraction(gsm8k, "gsm8k")
    boxed = find_boxed(body)
    if boxed:
        return _extraction(boxed, "boxed")
    phrases = _phrases(body)
    if phrases:
        answers = [answer for _, answer, _ in phrases]
        if not is_word_answer(answers[-1]):
            # "... whether the answer is an integer ... Final Answer: 5": words before a final
            # math answer restate the question, they do not offer a second answer.
            answers = [a for a in answers[:-1] if not is_word_answer(a)] + answers[-1:]
        return _extraction(answers, phrases[-1][2])
    last = _last_line(body)
    if last:
        return _extraction([last], "last_line")
    bare = body.strip().rstrip(".").strip()
    if parse_number(bare, allow_units=False) is not None:
        return Extraction(bare, "bare_number", (bare,), False)
    return Extraction(None, None, (), False)


def extract_answer(text: str) -> str | None:
    """The final answer of ``text``, or ``None`` if there is none or the completion hedges."""
    found = extract_final(text)
    return None if found.hedged else found.answer
