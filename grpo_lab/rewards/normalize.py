"""In-process answer normalisation: plain numbers and compact LaTeX strings.

Nothing here evaluates text: numbers are read with regular expressions into exact
``fractions.Fraction`` values, so this module is safe to run on model output in the trainer process.

Plain-number grammar (:func:`parse_number`)
--------------------------------------------
After stripping whitespace, math delimiters (``$...$``, ``\\(...\\)``, ``\\[...\\]``), a whole-string
``\\boxed{}``/``\\text{}``/``\\textbf{}``/``\\mathrm{}`` wrapper, LaTeX spacing (``\\,`` ``\\!``
``\\;`` ``\\ `` ``\\quad``), ``{,}`` and a trailing period, the text must be exactly one of:

* an integer or decimal, with an optional sign, optional thousands separators in groups of three
  (``1,234,567.5``; ``1,23`` is NOT a number, it reads as a list) and an optional leading ``.``
  (``.5``);
* a fraction ``a/b``, ``\\frac{a}{b}``, ``\\dfrac{a}{b}``, ``\\tfrac{a}{b}`` or ``\\frac12``
  (single-digit shorthand), ``a`` and ``b`` being numbers as above; a zero denominator is not a
  number.

It may carry a currency sign (``$5``, ``\\$5``, ``-$5``, ``$-5``), a percent sign (``50%``,
``50\\%``, ``50 percent``), a degree sign (``30^\\circ``, ``30°``), and, when ``allow_units`` is
true, trailing unit text: ``\\text{...}``/``\\mbox{...}``/``\\mathrm{...}`` holding only letters (an
optional ``^2``/``^3`` after it), or one to three plain words of two or more letters
(``18 dollars``, ``5 cm``). Unit stripping is conservative: single letters (``3i``, ``4 x``) and
words that change the value or the meaning (``pi``, ``or``, ``million``, ``squared``, ...) are never
stripped, so such answers are not plain numbers and go to the symbolic checker.

NOTE: the percent sign is a unit and is dropped: ``50%`` reads as 50, not 0.5.

Text answers (:func:`text_key`)
-------------------------------
Answers that are words (``even``, ``\\text{Monday}``, ``\\textbf{(C)}``) compare as text: the
key drops math delimiters, the wrappers ``\\text``/``\\textbf``/``\\textit``/``\\textrm``/
``\\mathrm``/``\\mathbf``/``\\mbox``/``\\emph``, whitespace, a trailing period and the
parentheses around a single choice letter, and is lower-cased; it is ``None`` unless what is left
is letters only (with ``'`` and ``-`` inside words). So ``$\\text{Even}$`` and ``even`` share the
key ``even``, while ``x^2`` or ``3`` have none.

Assignments (:func:`assignment_value`)
--------------------------------------
``x = 3``, ``k=17``, ``a_1 = \\frac{1}{2}``: one variable (a letter, optionally subscripted)
set to a value; the value string is returned so that it can be compared on its own.

Inequalities (:func:`inequality_interval`)
------------------------------------------
``x > 2``, ``x \\le -1``, ``-3 < x \\leq 5``, ``5 \\ge x > 1`` (one variable, one or two bounds)
are rewritten as the interval they describe (``(2, \\infty)``, ``(-\\infty, -1]``, ``(-3, 5]``,
``(1, 5]``), as strings, so that an inequality answer can be compared with an interval gold;
``x \\neq 0`` is ``(-\\infty, 0) \\cup (0, \\infty)``.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "assignment_value",
    "compact_latex",
    "expand_plus_minus",
    "inequality_interval",
    "looks_like_interval",
    "parse_number",
    "text_key",
]

# Longer strings are not plain numbers: keeps int() far from its 4300-digit conversion limit.
MAX_NUMBER_CHARS = 400

_SIMPLE_INTEGER = re.compile(r"-?\d{1,30}")
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_PLAIN = re.compile(rf"(?P<sign>[+-]?)\s*(?P<num>{_UNSIGNED})")
_SLASH = re.compile(rf"(?P<sign>[+-]?)\s*(?P<num>{_UNSIGNED})\s*/\s*(?P<den>{_UNSIGNED})")
_FRAC = re.compile(
    r"(?P<sign>[+-]?)\s*\\[dt]?frac\s*"
    rf"(?:\{{\s*(?P<num>[+-]?(?:{_UNSIGNED}))\s*\}}|(?P<num1>\d))\s*"
    rf"(?:\{{\s*(?P<den>{_UNSIGNED})\s*\}}|(?P<den1>\d))"
)

_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_WRAPPER = re.compile(r"\\(?:boxed|fbox|text|textbf|mathbf|mathrm)\s*\{")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|\\displaystyle(?![A-Za-z])")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_CURRENCY = re.compile(r"^([+-]?)\\?\$")
_PERCENT = re.compile(r"(?:\\%|%|\s*\bper\s*cent\b|\s*\bpercent\b)$", re.IGNORECASE)
_DEGREES = re.compile(r"(?:\^\s*\{?\\circ\}?|°)$")
_TEXT_UNIT = re.compile(
    r"\\(?:text|textrm|mbox|mathrm)\s*\{\s*(?P<words>[A-Za-z][A-Za-z .]*)\}(?:\^\{?[23]\}?)?$"
)
_WORD_UNITS = re.compile(r"(?<=[\d}%])\s+(?P<words>[A-Za-z]{2,}(?:\s+[A-Za-z]{2,}){0,2})$")

# Words that change the value or the meaning of the number before them; `i`, `j` and `e` because
# `3\mathrm{i}` is a complex number, not 3 of a unit.
_NOT_UNITS = frozenset(
    "pi or and to times plus minus over divided by squared cubed sqrt root roots hundred hundreds "
    "thousand thousands million millions billion billions trillion trillions dozen dozens half "
    "halves third thirds quarter quarters tenths hundredths thousandths infinity inf more less "
    "than not no i e j".split()
)


def _unwrap_once(s: str) -> str:
    for opener, closer in _DELIMITERS:
        if s.startswith(opener) and s.endswith(closer) and len(s) >= len(opener) + len(closer):
            return s[len(opener) : len(s) - len(closer)].strip()
    match = _WRAPPER.match(s)
    if match is not None and s.endswith("}"):
        inner = s[match.end() : -1]
        if _braces_balanced(inner):
            return inner.strip()
    return s


def _unwrap(s: str) -> str:
    """Strip delimiters, whole-string wrappers and trailing periods until nothing changes."""
    previous = None
    while previous != s:
        previous = s
        s = _unwrap_once(s.strip().rstrip(".").rstrip())
    return s


def _braces_balanced(s: str) -> bool:
    depth = 0
    i = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0


def _strip_units(s: str) -> str:
    while True:
        match = _TEXT_UNIT.search(s) or _WORD_UNITS.search(s)
        if match is None:
            return s
        words = match.group("words").lower().replace(".", " ").split()
        if not words or any(w in _NOT_UNITS for w in words):
            return s
        s = s[: match.start()].rstrip()


def _number(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def parse_number(text: str, *, allow_units: bool = True) -> Fraction | None:
    """Exact value of ``text`` if it is a plain number (grammar in the module doc), else ``None``."""
    s = text.strip().replace("\u2212", "-")
    if len(s) > MAX_NUMBER_CHARS:
        return None
    if _SIMPLE_INTEGER.fullmatch(s):
        return Fraction(int(s))  # the common GSM8K case, without the general machinery
    s = _unwrap(s)
    s = _SPACING.sub("", s).replace("{,}", ",").strip().rstrip(".").strip()
    if allow_units:
        s = _strip_units(s)
    s = _DEGREES.sub("", _PERCENT.sub("", s)).strip()
    s = _CURRENCY.sub(r"\1", s).strip()
    if not s:
        return None
    match = _PLAIN.fullmatch(s)
    if match is not None:
        value = _number(match["num"])
    elif (match := _SLASH.fullmatch(s) or _FRAC.fullmatch(s)) is not None:
        groups = match.groupdict()
        numerator = _number(groups.get("num") or groups.get("num1"))
        denominator = _number(groups.get("den") or groups.get("den1"))
        if denominator == 0:
            return None
        value = numerator / denominator
    else:
        return None
    return -value if match["sign"] == "-" else value


def compact_latex(text: str) -> str:
    """``text`` with layout-only differences removed, for exact string comparison.

    Drops math delimiters and whole-string wrappers (as :func:`parse_number`), LaTeX spacing,
    ``\\left``/``\\right``, all whitespace and a trailing period; ``\\dfrac``/``\\tfrac`` become
    ``\\frac``. Two answers with the same compact form are the same answer.
    """
    s = _unwrap(text)
    s = _LEFT_RIGHT.sub("", _SPACING.sub("", s))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return "".join(s.split()).rstrip(".")


_TEXT_COMMAND = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mathit|mathsf|mbox|emph)\s*\{"
)
_TEXT_WORDS = re.compile(r"[a-z]+(?:['-][a-z]+)*")
_CHOICE = re.compile(r"\(([a-z])\)")
_ASSIGNMENT = re.compile(
    r"\s*[A-Za-z](?:_\{?[A-Za-z0-9]{1,3}\}?)?\s*=(?![=<>])\s*(?P<value>[^=<>]+)"
)


def _drop_text_commands(s: str) -> str:
    """``s`` with every ``\\text{...}``-like wrapper replaced by its (brace-balanced) content."""
    while (match := _TEXT_COMMAND.search(s)) is not None:
        depth, i = 1, match.end()
        while i < len(s) and depth:
            if s[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(s[i], 0)
            i += 1
        if depth:
            return s  # unbalanced: leave it to the symbolic path
        s = s[: match.start()] + s[match.end() : i - 1] + s[i:]
    return s


def text_key(text: str) -> str | None:
    """Comparison key of a word answer (see the module doc), or ``None`` if it is not one."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    s = _drop_text_commands(_unwrap(text))
    s = "".join(_SPACING.sub(" ", s).split()).rstrip(".").lower()
    s = _CHOICE.sub(r"\1", s)
    return s if _TEXT_WORDS.fullmatch(s) else None


def assignment_value(text: str) -> str | None:
    """The value of a one-variable assignment (``x = 3`` -> ``3``), else ``None``.

    Only one ``=`` is allowed and no list: ``a = 4, b = 7`` and ``y = 2x = 4`` are not assignments.
    """
    s = _unwrap(text)
    match = _ASSIGNMENT.fullmatch(s)
    if match is None or "," in match["value"]:
        return None
    return match["value"].strip()


_RELATION = {
    "<": ("<", False),
    ">": (">", False),
    "<=": ("<", True),
    ">=": (">", True),
    "\\le": ("<", True),
    "\\leq": ("<", True),
    "\\leqslant": ("<", True),
    "\\ge": (">", True),
    "\\geq": (">", True),
    "\\geqslant": (">", True),
    "\u2264": ("<", True),
    "\u2265": (">", True),
}
_NOT_EQUAL = frozenset(("!=", "\\neq", "\\ne", "\u2260"))
_RELATION_RE = re.compile(
    r"<=|>=|!=|\\(?:leqslant|geqslant|leq|geq|neq|le|ge|ne)(?![A-Za-z])|[<>\u2264\u2265\u2260]"
)
_VARIABLE = re.compile(r"[A-Za-z]")


def inequality_interval(text: str) -> str | None:
    """The interval an inequality in one variable describes (see the module doc), or ``None``."""
    s = _LEFT_RIGHT.sub("", _SPACING.sub(" ", _unwrap(text))).strip()
    if len(s) > MAX_NUMBER_CHARS:
        return None
    relations = list(_RELATION_RE.finditer(s))
    if not 1 <= len(relations) <= 2:
        return None
    pieces = [s[: relations[0].start()]]
    pieces += [s[a.end() : b.start()] for a, b in zip(relations, relations[1:])]
    pieces.append(s[relations[-1].end() :])
    pieces = [p.strip() for p in pieces]
    if len(relations) == 1 and relations[0].group() in _NOT_EQUAL:
        name, value = pieces
        if not (_VARIABLE.fullmatch(name) and value and "=" not in value):
            return None
        return f"(-\\infty, {value}) \\cup ({value}, \\infty)"  # x \neq a
    if any(m.group() in _NOT_EQUAL for m in relations):
        return None
    ops = [_RELATION[m.group()] for m in relations]
    variables = [i for i, p in enumerate(pieces) if _VARIABLE.fullmatch(p)]
    if len(variables) != 1 or any(not p or "=" in p for p in pieces):
        return None
    where = variables[0]
    lower, upper = ("-\\infty", False), ("\\infty", False)
    for k, (op, closed) in enumerate(ops):
        left, right = pieces[k], pieces[k + 1]
        if where == k:  # x op bound
            bound = (right, closed)
            lower, upper = (bound, upper) if op == ">" else (lower, bound)
        elif where == k + 1:  # bound op x
            bound = (left, closed)
            lower, upper = (bound, upper) if op == "<" else (lower, bound)
        else:
            return None
    if len(ops) == 2 and (lower[0] == "-\\infty" or upper[0] == "\\infty"):
        return None  # "1 < x > 2": not an interval
    return f"{'[' if lower[1] else '('}{lower[0]}, {upper[0]}{']' if upper[1] else ')'}"


def looks_like_interval(text: str) -> bool:
    """Whether ``text`` is written as an interval or a union of them (``(1, 2]``, ``[0, \\infty)``)."""
    s = compact_latex(text)
    return bool(re.fullmatch(r"[(\[][^,]+,[^,]+[)\]](?:\\cup[(\[][^,]+,[^,]+[)\]])*", s))


def expand_plus_minus(text: str) -> str:
    """``a \\pm b`` -> ``a + b, a - b`` when ``text`` holds exactly one ``\\pm``; else ``text``.

    The two values are then compared as a set (math-verify reads ``\\pm`` alone, but not inside a
    fraction: ``\\frac{-1 \\pm \\sqrt{5}}{2}``).
    """
    if text.count("\\pm") != 1 or "," in text:
        return text
    plus, minus = text.replace("\\pm", "+"), text.replace("\\pm", "-")
    return f"{plus}, {minus}"
