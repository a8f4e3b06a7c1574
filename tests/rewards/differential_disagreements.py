"""Where grpo_lab's reward and math-verify are meant to disagree on the generated marked answers.

``test_differential.py`` scores every case of ``marked_answers.generate_cases`` with both and fails
on any disagreement not listed here. An entry matches a case when the case's ``kind`` matches the
``kind`` glob, the two verdicts are ``(ours, theirs)``, and ``answer`` (a regular expression; empty:
anything) is found in the answer grpo_lab extracted. Every entry says why grpo_lab's verdict is the
intended one.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Disagreement:
    kind: str
    ours: bool
    theirs: bool
    reason: str
    answer: str = ""

    def matches(self, kind: str, ours: bool, theirs: bool, extracted: str | None) -> bool:
        return (
            (ours, theirs) == (self.ours, self.theirs)
            and fnmatch.fnmatchcase(kind, self.kind)
            and re.search(self.answer, extracted or "") is not None
        )


DISAGREEMENTS = (
    Disagreement(
        "*/hedge/*",
        ours=False,
        theirs=True,
        reason="Hedging. Two different final answers (a self-correction, 'the answer is A. So the "
        "answer is B', 'A or B' inside one box) score 0 whichever is right; math-verify takes the "
        "last (or any) of them, so a policy could be paid for offering several.",
    ),
    Disagreement(
        "*/unmarked/*",
        ours=False,
        theirs=True,
        reason="No marked answer. Math in the middle of prose is not a final answer; math-verify "
        "falls back to the last expression anywhere in the text, which rewards whatever comes last.",
    ),
    Disagreement(
        "*/multipart/boxes_lines",
        ours=True,
        theirs=False,
        reason="Several boxes, one per line, for a gold with as many parts are one multi-part "
        "answer; math-verify joins boxes only when ',', 'and' or 'or' stands between them.",
    ),
    Disagreement(
        "interval/equal/*",
        ours=True,
        theirs=False,
        answer=r"\\le|\\ge|<|>|\\cup",
        reason="An inequality equals the interval it describes (x > 2 is (2, \\infty)); "
        "math-verify compares a relation with a set and says no.",
    ),
    Disagreement(
        "degrees/equal/*",
        ours=True,
        theirs=False,
        answer="°",
        reason="The degree sign ° is a unit like ^\\circ; math-verify does not read it.",
    ),
    Disagreement(
        "*/equal/*",
        ours=True,
        theirs=False,
        answer=r"\d\s*\\(?:text|mbox)\{ ?[a-z ]+\}",
        reason="Units are dropped (12 \\text{ cm} is 12, also against a gold that carries the unit); "
        "math-verify keeps multi-word or \\mbox units and compares them as symbols.",
    ),
    Disagreement(
        "*/equal/same_value_or",
        ours=True,
        theirs=False,
        reason="One value written twice ('$(x+1)^2$, or equivalently $x^2+2x+1$') commits to one "
        "answer; math-verify joins the two into a set, which differs from the gold.",
    ),
    Disagreement(
        "text/equal/*",
        ours=True,
        theirs=False,
        answer=r"^\(?[A-Za-z]+\)?$",
        reason="A word answer written without LaTeX ('So the answer is odd.', 'Final Answer: (C)') "
        "is read as text; math-verify extracts only LaTeX and numbers.",
    ),
)


def documented(kind: str, ours: bool, theirs: bool, extracted: str | None) -> Disagreement | None:
    """The entry that documents this disagreement, or ``None``."""
    return next((d for d in DISAGREEMENTS if d.matches(kind, ours, theirs, extracted)), None)
