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

from grpo_lab.rewards.normalize import (
    assignment_value,
    compact_latex,
    inequality_interval,
    parse_number,
    text_key,
)

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

_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)

_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
# NOTE: possessive quantifiers (`\s*+`) never give back whitespace; with plain `\s*` a marker
# followed by a long run of spaces costs quadratic time.
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*+\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character, or a brace
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

_OR_WORD = re.compile(r"(?<![A-Za-z\\])or(?![A-Za-z])")
_TEXT_JOINER = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*+\{\s*+(or|and)\s*+\}")
_PHRASE_WINDOW = 10_000

# Tokens of a clause. Math spans are found separately (their closers are searched with `find`).
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[A-Za-z]+|[{}]|\.(?=\s|$)|\n|[^\\A-Za-z{}.\n$]+|.", re.DOTALL)
_SPAN_OPENERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_LINKING_WORDS = frozenset("is are was were be equals becomes gives".split())
_JOINERS = frozenset(("and", "or"))
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_MATH_START = re.compile(r"[-+]?\s*(?:\d|\.\d|\\[A-Za-z({\[]|[(\[])")


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


# ---------------------------------------------------------------------------------------------
# Reading a clause: math spans, words and the end of the sentence


class _Closers:
    """``str.find`` of span closers with the last answer remembered, so a scan stays linear.

    A text with many openers and no closer would otherwise search to its end once per opener.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.last: dict[str, tuple[int, int]] = {}

    def find(self, closer: str, start: int) -> int:
        searched_from, found = self.last.get(closer, (-1, -2))
        if searched_from != -1 and searched_from <= start and (found == -1 or found >= start):
            return found
        found = self.text.find(closer, start)
        self.last[closer] = (start, found)
        return found


def _span_at(text: str, i: int, closers: _Closers) -> tuple[int, int, int] | None:
    """A math span opening at ``text[i]``: (content start, content end, span end), or ``None``.

    An inline ``$`` must close on its own line; ``$5`` with no closing ``$`` is a currency sign.
    """
    for opener, closer in _SPAN_OPENERS:
        if not text.startswith(opener, i):
            continue
        start = i + len(opener)
        end = closers.find(closer, start)
        while opener == "$" and end > 0 and text[end - 1] == "\\":
            end = text.find("$", end + 1)  # an escaped \$ inside the span
        if end == -1 or end == start:
            return None
        if opener == "$" and text.find("\n", start, end) != -1:
            return None
        return start, end, end + len(closer)
    return None


@dataclass(frozen=True)
class _Token:
    kind: str  # "span", "word", "command", "open", "close", "other"
    start: int
    end: int
    content: str  # a span's math, a word, or the token's text


def _tokens(text: str) -> list[_Token]:
    """The tokens of ``text`` up to the end of its first sentence (outside math spans)."""
    closers = _Closers(text)
    tokens: list[_Token] = []
    i = 0
    while i < len(text):
        if text[i] == "$" or text.startswith(("\\[", "\\("), i):
            span = _span_at(text, i, closers)
            if span is not None:
                start, end, after = span
                tokens.append(_Token("span", i, after, text[start:end].strip()))
                i = after
                continue
        match = _TOKEN.match(text, i)
        token = match.group()
        if token == "\n" or (token == "." and _SENTENCE_END.match(text, i)):
            break
        kind = (
            "command"
            if token.startswith("\\")
            else "word"
            if token[0].isalpha()
            else {"{": "open", "}": "close"}.get(token, "other")
        )
        tokens.append(_Token(kind, i, match.end(), token))
        i = match.end()
    return tokens


def _is_prose(tokens: list[_Token], index: int, depth: int) -> bool:
    """Whether ``tokens[index]`` is a prose word: two letters or more, outside braces, and not a
    joiner ("and"/"or") with math after it."""
    token = tokens[index]
    if token.kind != "word" or depth > 0 or len(token.content) < 2:
        return False
    if token.content.lower() in _JOINERS:
        following = next((t for t in tokens[index + 1 :] if t.content.strip()), None)
        return following is None or (following.kind == "word" and len(following.content) > 1)
    return True


def _depths(tokens: list[_Token]) -> list[int]:
    depths, depth = [], 0
    for token in tokens:
        depth = max(0, depth - 1) if token.kind == "close" else depth
        depths.append(depth)
        depth += token.kind == "open"
    return depths


def _strip_answer(answer: str) -> str:
    answer = answer.strip().strip("*_").strip().rstrip(".,;:").strip()
    # The closer of a math span that held the cue: `\[\text{Answer: } 7\]` reads `7`.
    for opener, closer in (("\\[", "\\]"), ("\\(", "\\)")):
        if answer.endswith(closer) and opener not in answer:
            answer = answer[: -len(closer)].rstrip().rstrip(".,;:").rstrip()
    if answer.endswith("$") and answer.count("$") % 2 and not answer.endswith("\\$"):
        answer = answer.rstrip("$").rstrip().rstrip(".,;:").rstrip()
    return answer


def _span_chain(tokens: list[_Token], first: int) -> tuple[str, int] | None:
    """Spans from ``tokens[first]`` joined by ",", "and" or "or": the answer and the index after.

    One span gives its math; several give ``a, b`` (joined by "," / "and") or ``a or b``.
    """
    if tokens[first].kind != "span":
        return None
    parts, joiners = [tokens[first].content], []
    i = first + 1
    while True:
        j, joiner = i, ","
        while j < len(tokens) and tokens[j].kind in ("other", "word"):
            word = tokens[j].content.strip().lower()
            if tokens[j].kind == "word" and word in _JOINERS:
                joiner = word if word == "or" else joiner
            elif word not in ("", ","):
                break
            j += 1
        if j < len(tokens) and j > i and tokens[j].kind == "span":
            parts.append(tokens[j].content)
            joiners.append(joiner)
            i = j + 1
        else:
            break
    if any(not p for p in parts):
        return None
    answer = parts[0]
    for joiner, part in zip(joiners, parts[1:]):
        answer += f" or {part}" if joiner == "or" else f", {part}"
    return answer, i


def _math_run(text: str, tokens: list[_Token], first: int) -> str | None:
    """The math written from ``tokens[first]`` on, up to the first prose word."""
    depths = _depths(tokens)
    end = first
    while end < len(tokens) and not _is_prose(tokens, end, depths[end]):
        end += 1
    if end == first:
        return None
    pieces = []
    for token, depth in zip(tokens[first:end], depths[first:end]):
        if token.kind == "span":
            pieces.append(token.content)
        elif token.kind == "word" and depth == 0 and token.content.lower() == "and":
            pieces.append(",")  # "2 and 3" is the list 2, 3
        else:
            pieces.append(text[token.start : token.end])
    answer = _strip_answer("".join(pieces))
    answer = re.sub(r"\s*+,(?:\s*+,)++", ",", answer)
    return answer or None


def _starts_with_math(text: str, tokens: list[_Token], index: int) -> bool:
    while index < len(tokens) and not tokens[index].content.strip():
        index += 1
    if index >= len(tokens):
        return False
    token = tokens[index]
    if token.kind == "span":
        return True
    if token.kind == "word":
        return False
    if token.kind == "command":
        return not token.content.startswith(("\\text", "\\mbox"))
    return _MATH_START.match(text, token.start) is not None


def _is_math_token(token: _Token) -> bool:
    if token.kind == "span":
        return bool(token.content)
    if token.kind == "command":
        return not token.content.startswith(("\\text", "\\mbox"))
    return token.kind == "other" and any(c.isdigit() for c in token.content)


def _or_splits(tokens: list[_Token]) -> list[int]:
    """Indices of the "or" words outside braces that have math before and after them."""
    depths = _depths(tokens)
    is_math = [_is_math_token(t) for t in tokens]
    math_after = [False] * (len(tokens) + 1)
    for i in range(len(tokens) - 1, -1, -1):
        math_after[i] = math_after[i + 1] or is_math[i]
    splits, math_before = [], False
    for i, token in enumerate(tokens):
        if (
            token.kind == "word"
            and depths[i] == 0
            and token.content.lower() == "or"
            and math_before
            and math_after[i + 1]
        ):
            splits.append(i)
        math_before = math_before or is_math[i]
    return splits


def _read_clause(text: str, *, split_or: bool = True) -> str | None:
    """The answer written at the start of ``text`` (see "Reading the answer" in the module doc)."""
    rest = text.lstrip(" \t*_:")
    if rest.startswith("}"):
        # The cue sat in a command (`\text{Answer:} 7`), maybe in math (`$\textbf{Answer:}$ 7`).
        rest = rest.lstrip("} \t*_:")
        rest = rest[1:] if rest.startswith("$") and not rest.startswith("$$") else rest
        rest = rest.lstrip(" \t*_:")
    if rest[:1] in ("\n", "\r"):
        rest = rest.lstrip().lstrip("*_ \t")
    tokens = _tokens(rest)
    while tokens and not tokens[0].content.strip("*_ \t"):
        tokens = tokens[1:]
    if not tokens:
        return None
    splits = _or_splits(tokens) if split_or else []
    if splits:
        # "3 or maybe 4", "either $3$ or $4$": the alternatives are kept, so the answer hedges.
        bounds = [tokens[0].start] + [b for i in splits for b in (tokens[i].start, tokens[i].end)]
        bounds.append(tokens[-1].end)
        sides = [_read_clause(rest[a:b], split_or=False) for a, b in zip(bounds[::2], bounds[1::2])]
        if all(sides):
            return " or ".join(_as_union(side) for side in sides)
    chain = _span_chain(tokens, 0)
    if chain is not None:
        return chain[0]
    sentence = _strip_answer(rest[tokens[0].start : tokens[-1].end])
    if not sentence:
        return None
    depths = _depths(tokens)
    prose = [i for i in range(len(tokens)) if _is_prose(tokens, i, depths[i])]
    if parse_number(sentence) is not None:
        return sentence
    if not prose:
        return _joined_list(sentence)
    # Prose: the math after the last linking word that is followed by math.
    links = [
        i
        for i, token in enumerate(tokens)
        if depths[i] == 0
        and (
            (token.kind == "word" and token.content.lower() in _LINKING_WORDS)
            or (token.kind == "other" and token.content.strip() in ("=", ":"))
        )
    ]
    for i in reversed(links):
        if _starts_with_math(rest, tokens, i + 1):
            first = next(j for j in range(i + 1, len(tokens)) if tokens[j].content.strip())
            chain = _span_chain(tokens, first)
            return chain[0] if chain is not None else _math_run(rest, tokens, first)
    if _starts_with_math(rest, tokens, 0):
        return _math_run(rest, tokens, 0)
    spans = [t for t in tokens if t.kind == "span" and t.content]
    if spans:
        return spans[-1].content
    numbers = re.findall(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?", sentence)
    if numbers:
        return numbers[-1].rstrip(",")
    words = [i for i in links if tokens[i].kind == "word"]
    if words:
        tail = _strip_answer(rest[tokens[words[-1]].end : tokens[-1].end])
        return tail or None
    return sentence


def _joined_list(answer: str) -> str:
    """``2 and 3`` -> ``2, 3`` at the top level (a sentence that is all math)."""
    return re.sub(r"\s*+,?\s++and\s++", ", ", answer) if " and " in answer else answer


# ---------------------------------------------------------------------------------------------
# Rules


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
        answer = _read_clause(text[match.end() : stop])
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
    for match in _GSM8K.finditer(text):
        line = match.group(1).strip().rstrip(".").strip()
        if not line:
            continue
        if line not in read:
            # A plain number (possibly with units) is kept as written; prose is read like a phrase.
            read[line] = line if parse_number(line) is not None else _read_clause(line)
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
    tokens = _tokens(line)
    if not tokens:
        return None
    chain = _span_chain(tokens, 0)
    if chain is None:
        return None
    answer, after = chain
    if any(t.content.strip(" \t*_,;:") for t in tokens[after:]):
        return None  # more than math on the line
    if len(tokens) and tokens[-1].end < len(line.rstrip()):
        return None  # a sentence end inside the line: prose follows
    return answer


# ---------------------------------------------------------------------------------------------
# Hedging and multi-part answers


def _is_word_answer(answer: str) -> bool:
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


def _distinct(candidates: list[str]) -> list[str]:
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


def _disjuncts(answer: str) -> list[str]:
    plain = _TEXT_JOINER.sub(r" \1 ", answer)
    parts = [p.strip().strip(",;").strip() for p in _OR_WORD.split(plain)]
    return [p for p in parts if p]


def _as_union(answer: str) -> str:
    """``x < -1 \\text{ or } x > 3`` -> ``(-\\infty, -1) \\cup (3, \\infty)``; else ``answer``."""
    if not is_disjunction(answer):
        return answer
    intervals = [inequality_interval(side) for side in _disjuncts(answer)]
    return " \\cup ".join(intervals) if len(intervals) > 1 and all(intervals) else answer


def _extraction(candidates: list[str], rule: str) -> Extraction:
    answer = _as_union(candidates[-1])
    candidates = [*candidates[:-1], answer]
    distinct = _distinct(candidates)
    if len(distinct) > 1:
        return Extraction(answer, rule, tuple(candidates), True, tuple(distinct))
    if is_disjunction(answer):
        sides = _disjuncts(answer)
        distinct_sides = _distinct(sides)
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
        if not _is_word_answer(answers[-1]):
            # "... whether the answer is an integer ... Final Answer: 5": words before a final
            # math answer restate the question, they do not offer a second answer.
            answers = [a for a in answers[:-1] if not _is_word_answer(a)] + answers[-1:]
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


def gold_answer(gold: str) -> str:
    """Reduce a gold string to its answer.

    A raw GSM8K solution (contains ``####``) becomes the text after the last ``####``; a MATH
    solution containing ``\\boxed{}`` becomes its last boxed argument; anything else is returned
    stripped. This lets a dataset's worked-solution column be used as the gold directly.
    """
    gsm8k = [m.group(1).strip().rstrip(".").strip() for m in _GSM8K.finditer(gold)]
    gsm8k = [g for g in gsm8k if g]
    if gsm8k:
        return gsm8k[-1]
    boxed = find_boxed(gold)
    if boxed:
        return boxed[-1]
    return gold.strip()


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
