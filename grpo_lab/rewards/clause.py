"""Reading the answer written after a marker ("The answer is ...", ``#### ...``, "Answer: ...").

:func:`read_clause` reads the text after a marker up to the end of its sentence (a period before
whitespace, or a newline; math spans are skipped over whole, so ``\\[ ... \\]`` may span lines):

* math spans first: a leading ``$...$``/``\\(...\\)``/``\\[...\\]``/``$$...$$`` is the answer,
  with any spans joined to it by ",", "and" (giving the list ``a, b``) or "or" (kept: the answer
  then hedges, see :mod:`grpo_lab.rewards.hedging`);
* a sentence that is all math (no word of two letters or more outside braces, besides "and"/"or"
  between math) or a plain number with units (``1,234 dollars``) is the answer as written;
* otherwise the sentence is prose, e.g. ``Final Answer: The smallest $k$ is 17.``: the answer is
  the math after its last linking word (``is``, ``are``, ``was``, ``be``, ``equals``, ``=``, ``:``)
  that is followed by math (``17``); else the math the sentence starts with (``3`` in "3 since it
  is prime"); else its last math span or number; else the words after its last linking word, or
  the whole sentence, as a text answer (``The function is even.`` gives ``even``).

:func:`clause_tokens` and :func:`span_chain` are also used by the last-line rule of
:func:`grpo_lab.rewards.extract.extract_final`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grpo_lab.rewards.hedging import as_union
from grpo_lab.rewards.normalize import parse_number

__all__ = ["clause_tokens", "read_clause", "span_chain"]

# Tokens of a clause. Math spans are found separately (their closers are searched with `find`).
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[A-Za-z]+|[{}]|\.(?=\s|$)|\n|[^\\A-Za-z{}.\n$]+|.", re.DOTALL)
_SPAN_OPENERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_LINKING_WORDS = frozenset("is are was were be equals becomes gives".split())
_JOINERS = frozenset(("and", "or"))
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_MATH_START = re.compile(r"[-+]?\s*(?:\d|\.\d|\\[A-Za-z({\[]|[(\[])")


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


def clause_tokens(text: str) -> list[_Token]:
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


def span_chain(tokens: list[_Token], first: int) -> tuple[str, int] | None:
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


def read_clause(text: str, *, split_or: bool = True) -> str | None:
    """The answer written at the start of ``text`` (see "Reading the answer" in the module doc)."""
    rest = text.lstrip(" \t*_:")
    if rest.startswith("}"):
        # The cue sat in a command (`\text{Answer:} 7`), maybe in math (`$\textbf{Answer:}$ 7`).
        rest = rest.lstrip("} \t*_:")
        rest = rest[1:] if rest.startswith("$") and not rest.startswith("$$") else rest
        rest = rest.lstrip(" \t*_:")
    if rest[:1] in ("\n", "\r"):
        rest = rest.lstrip().lstrip("*_ \t")
    tokens = clause_tokens(rest)
    while tokens and not tokens[0].content.strip("*_ \t"):
        tokens = tokens[1:]
    if not tokens:
        return None
    splits = _or_splits(tokens) if split_or else []
    if splits:
        # "3 or maybe 4", "either $3$ or $4$": the alternatives are kept, so the answer hedges.
        bounds = [tokens[0].start] + [b for i in splits for b in (tokens[i].start, tokens[i].end)]
        bounds.append(tokens[-1].end)
        sides = [read_clause(rest[a:b], split_or=False) for a, b in zip(bounds[::2], bounds[1::2])]
        if all(sides):
            return " or ".join(as_union(side) for side in sides)
    chain = span_chain(tokens, 0)
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
            chain = span_chain(tokens, first)
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
