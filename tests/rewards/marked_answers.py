"""Seeded generator of (completion, gold, expected verdict) cases, written the way models write.

Each case takes a gold answer in the style of GSM8K (integers, money, units) or MATH (fractions,
roots, pi, intervals, sets, tuples, equations, several assignments, word answers, percent,
degrees, matrices), writes the answer in another form equal to it or in a wrong form, and wraps it
in one of the ways models mark a final answer: ``####``, ``\\boxed{}``/``\\fbox{}``, "The final
answer is", "the answer is", "Answer:", "Final Answer: The <noun> is ...", a last line that is only
math (``$...$``, ``\\(...\\)``, ``\\[...\\]``, ``$$...$$``), display math after "Answer", or "X is
the final answer", after a few lines of reasoning with other numbers and math in them.

It also writes the cases a reward must refuse: hedges (two different answers, "3 or 4",
self-corrections) for a single-valued gold and math that is only in the middle of prose (no marked
answer), whose expected verdict is ``False``; and multi-part answers in several boxes for golds
with as many parts (expected ``True`` in the gold's order or, for sets and lists, any order).

``expected`` is the verdict a careful grader gives; ``kind`` names the gold family and the answer
form (``"fraction/equal/last_dollar"``), the unit in which disagreements are documented
(``differential_disagreements.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    completion: str
    gold: str
    expected: bool
    kind: str


# ---------------------------------------------------------------------------------------------
# Golds: (family, gold, equal forms, wrong forms). Every form is LaTeX as a model writes it inside
# math delimiters; `plain` forms may also be written without delimiters.


@dataclass(frozen=True)
class Gold:
    family: str
    gold: str
    equal: tuple[str, ...]
    wrong: tuple[str, ...]
    plain: bool = False  # the forms read fine without math delimiters
    parts: tuple[str, ...] = ()  # for multi-part golds: the parts, in the gold's order
    ordered: bool = False  # whether the parts must come in order (a tuple)


def _integer(rng: random.Random) -> Gold:
    n = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 250_000)])
    gold = rng.choice([str(n), f"{n:,}"])
    equal = [str(n), f"{n:,}" if n >= 1000 else f"{n}.00", f"\\${n}", f"{n}\\text{{ dollars}}"]
    equal += [f"{n}\\text{{ apples}}", f"{n} \\text{{ cm}}"]
    wrong = [str(n + rng.choice([-2, -1, 1, 10])), f"{n * 10}", f"-{n}"]
    return Gold("integer", gold, tuple(equal), tuple(wrong), plain=True)


def _decimal(rng: random.Random) -> Gold:
    p = rng.randint(1, 99)
    q = rng.choice([2, 4, 5, 8])
    value = p / q
    if value == int(value):
        p += 1
        value = p / q
    gold = rng.choice([f"\\frac{{{p}}}{{{q}}}", f"{value:g}"])
    equal = (f"{value:g}", f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}", f"\\dfrac{{{2 * p}}}{{{2 * q}}}")
    wrong = (f"{value + 1:g}", f"\\frac{{{p + 1}}}{{{q}}}", f"{p}")
    return Gold("decimal", gold, equal, wrong, plain=True)


def _fraction(rng: random.Random) -> Gold:
    q = rng.choice([3, 7, 9, 11, 13])
    p = rng.choice([k for k in range(1, 3 * q) if k % q])
    sign = rng.choice(["", "-"])
    gold = f"{sign}\\frac{{{p}}}{{{q}}}"
    k = rng.randint(2, 4)
    equal = (
        f"{sign}\\dfrac{{{p}}}{{{q}}}",
        f"{sign}\\frac{{{k * p}}}{{{k * q}}}",
        f"{sign}{p}/{q}",
        f"\\frac{{{sign}{p}}}{{{q}}}",
    )
    wrong = (f"{sign}\\frac{{{p + 1}}}{{{q}}}", f"{sign}\\frac{{{q}}}{{{p}}}", f"{sign}{p / q:.2f}")
    return Gold("fraction", gold, equal, wrong)


def _root(rng: random.Random) -> Gold:
    a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10])
    gold = f"{a}\\sqrt{{{b}}}"
    # `\sqrt7` is \sqrt{7}, but `\sqrt10` is \sqrt{1}0 in LaTeX: the brace-less form needs one digit.
    short = f"{a}\\sqrt{b}" if b < 10 else f"{a}\\sqrt{{{b}}}"
    equal = (f"\\sqrt{{{a * a * b}}}", f"{a} \\sqrt{{{b}}}", short)
    wrong = (f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}", f"{a}\\sqrt{{{b + 1}}}")
    return Gold("root", gold, equal, wrong)


def _pi(rng: random.Random) -> Gold:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        gold = f"{a}\\pi"
        equal = (f"{a} \\pi", f"\\pi \\cdot {a}", f"{2 * a}\\pi/2")
        wrong = (f"{a + 1}\\pi", f"{a}", f"\\frac{{\\pi}}{{{a}}}")
    else:
        gold = f"{a} - \\frac{{{b}}}{{\\pi}}"
        equal = (
            f"{a}-\\frac{{{b}}}{{\\pi}}",
            f"-\\frac{{{b}}}{{\\pi}} + {a}",
            f"\\frac{{{a}\\pi - {b}}}{{\\pi}}",
        )
        wrong = (f"{a} + \\frac{{{b}}}{{\\pi}}", f"{a} - \\frac{{\\pi}}{{{b}}}")
    return Gold("pi", gold, equal, wrong)


def _interval(rng: random.Random) -> Gold:
    a, b = sorted(rng.sample(range(-15, 16), 2))
    shape = rng.randrange(4)
    if shape == 0:
        gold = f"({a}, \\infty)"
        equal = (f"({a},\\infty)", f"\\left({a}, \\infty\\right)", f"({a}, +\\infty)", f"x > {a}")
        wrong = (f"[{a}, \\infty)", f"({b}, \\infty)", f"(-\\infty, {a})")
    elif shape == 1:
        gold = f"[{a}, {b})"
        equal = (f"[{a},{b})", f"\\left[{a}, {b}\\right)", f"{a} \\le x < {b}")
        wrong = (f"[{a}, {b}]", f"({a}, {b})", f"[{a}, {b + 1})")
    elif shape == 2:
        gold = f"(-\\infty, {a}] \\cup [{b}, \\infty)"
        equal = (
            f"(-\\infty,{a}]\\cup[{b},\\infty)",
            f"[{b}, \\infty) \\cup (-\\infty, {a}]",
            f"x \\le {a} \\text{{ or }} x \\ge {b}",
        )
        wrong = (f"(-\\infty, {a}) \\cup ({b}, \\infty)", f"[{a}, {b}]")
    else:
        gold = f"[{a}, {b}]"
        equal = (f"[{a},{b}]", f"\\left[ {a}, {b} \\right]")
        wrong = (f"({a}, {b})", f"[{a}, {b + 2}]")
    return Gold("interval", gold, equal, wrong)


def _solution_set(rng: random.Random) -> Gold:
    a, b = rng.sample(range(-12, 13), 2)
    c = rng.choice([x for x in range(-12, 13) if x not in (a, b)])
    gold = rng.choice([f"{a}, {b}", f"\\{{{a}, {b}\\}}"])
    equal = (f"{b}, {a}", f"{a},{b}", f"\\{{{b}, {a}\\}}")
    wrong = (f"{a}, {c}", f"{a}", f"{a}, {b}, {c}")
    return Gold("set", gold, equal, wrong, parts=(str(a), str(b)))


def _plus_minus(rng: random.Random) -> Gold:
    a, b = rng.randint(1, 9), rng.choice([2, 3, 5, 7])
    gold = f"{a} \\pm \\sqrt{{{b}}}"
    equal = (
        f"{a} + \\sqrt{{{b}}}, {a} - \\sqrt{{{b}}}",
        f"{a} - \\sqrt{{{b}}}, {a} + \\sqrt{{{b}}}",
    )
    wrong = (f"{a} + \\sqrt{{{b}}}", f"{a + 1} \\pm \\sqrt{{{b}}}")
    return Gold(
        "plus_minus", gold, equal, wrong, parts=(f"{a} + \\sqrt{{{b}}}", f"{a} - \\sqrt{{{b}}}")
    )


def _tuple(rng: random.Random) -> Gold:
    a, b = rng.sample(range(-9, 10), 2)
    gold = f"({a}, {b})"
    equal = (f"({a},{b})", f"\\left( {a}, {b} \\right)")
    wrong = (f"({b}, {a})", f"({a}, {b + 1})")
    return Gold("tuple", gold, equal, wrong, parts=(str(a), str(b)), ordered=True)


def _equation(rng: random.Random) -> Gold:
    m, c = rng.sample(range(2, 10), 2)
    gold = f"y = {m}x + {c}"
    equal = (f"y={m}x+{c}", f"y = {c} + {m}x", f"y = {m} x + {c}")
    wrong = (f"y = {m}x - {c}", f"y = {c}x + {m}")
    return Gold("equation", gold, equal, wrong)


def _assignment(rng: random.Random) -> Gold:
    n = rng.randint(-40, 60)
    var = rng.choice("xnkt")
    gold = str(n)
    equal = (f"{var} = {n}", f"{var}={n}")
    wrong = (f"{var} = {n + 1}", f"{var} = {-n - 1}")
    return Gold("assignment", gold, equal, wrong)


def _assignments(rng: random.Random) -> Gold:
    (u, v), (a, b) = rng.choice([("a", "b"), ("m", "n"), ("x", "y")]), rng.sample(range(-9, 13), 2)
    gold = rng.choice([f"{u}={a},{v}={b}", f"{u} = {a}, {v} = {b}"])
    equal = (f"{u} = {a}, {v} = {b}", f"{v} = {b}, {u} = {a}", f"{u}={a}, {v}={b}")
    wrong = (f"{u} = {b}, {v} = {a}", f"{u} = {a}, {v} = {b + 1}")
    return Gold("assignments", gold, equal, wrong, parts=(f"{u} = {a}", f"{v} = {b}"))


def _points(rng: random.Random) -> Gold:
    a, b, c, d = rng.sample(range(-9, 10), 4)
    gold = f"({a}, {b}), ({c}, {d})"
    equal = (f"({c}, {d}), ({a}, {b})", f"({a},{b}),({c},{d})")
    wrong = (f"({a}, {b}), ({d}, {c})", f"({a}, {b})")
    return Gold("points", gold, equal, wrong, parts=(f"({a}, {b})", f"({c}, {d})"))


_WORDS = (
    ("even", "odd"),
    ("odd", "even"),
    ("prime", "composite"),
    ("Monday", "Tuesday"),
    ("neither", "both"),
    ("(C)", "(B)"),
    ("(A)", "(D)"),
    ("yes", "no"),
)


def _text(rng: random.Random) -> Gold:
    word, other = rng.choice(_WORDS)
    gold = rng.choice([f"\\text{{{word}}}", word])
    cased = word.upper() if len(word) > 3 else word
    equal = (
        f"\\text{{{word}}}",
        word,
        f"\\textbf{{{word}}}",
        f"\\mathrm{{{word}}}",
        f"\\text{{{cased}}}",
        f"\\text{{{word.capitalize()}}}",
    )
    wrong = (f"\\text{{{other}}}", other)
    return Gold("text", gold, equal, wrong, plain=True)


def _percent(rng: random.Random) -> Gold:
    n = rng.choice([k for k in range(5, 96) if k != 50])
    gold = rng.choice([f"{n}\\%", str(n)])
    equal = (f"{n}\\%", f"{n}", f"{n}%")
    wrong = (f"{n + 5}\\%", f"{100 - n}\\%")
    return Gold("percent", gold, equal, wrong, plain=True)


def _degrees(rng: random.Random) -> Gold:
    n = rng.choice([15, 30, 45, 60, 72, 75, 105, 120, 135, 150])
    gold = rng.choice([f"{n}^\\circ", str(n)])
    equal = (f"{n}^\\circ", f"{n}^{{\\circ}}", str(n), f"{n}°")
    wrong = (f"{n + 15}^\\circ", f"{180 - n + 5}")
    return Gold("degrees", gold, equal, wrong)


def _units(rng: random.Random) -> Gold:
    n = rng.randint(2, 500)
    unit = rng.choice(["cm", "meters", "inches", "square feet", "units"])
    gold = rng.choice([f"{n}\\text{{ {unit}}}", str(n)])
    equal = (f"{n}\\text{{ {unit}}}", f"{n}", f"{n} \\mbox{{ {unit}}}")
    wrong = (f"{n + 1}\\text{{ {unit}}}", f"{2 * n}")
    return Gold("units", gold, equal, wrong)


def _polynomial(rng: random.Random) -> Gold:
    a = rng.randint(1, 9)
    gold = f"x^2 + {2 * a}x + {a * a}"
    equal = (f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"{a * a} + {2 * a}x + x^2")
    wrong = (f"(x-{a})^2", f"x^2 + {a}x + {a * a}")
    return Gold("polynomial", gold, equal, wrong)


def _matrix(rng: random.Random) -> Gold:
    a, b = rng.sample(range(-9, 10), 2)
    gold = f"\\begin{{pmatrix}} {a} \\\\ {b} \\end{{pmatrix}}"
    equal = (f"\\begin{{pmatrix}}{a}\\\\{b}\\end{{pmatrix}}",)
    wrong = (f"\\begin{{pmatrix}} {b} \\\\ {a} \\end{{pmatrix}}",)
    return Gold("matrix", gold, equal, wrong)


GOLD_FAMILIES = (
    _integer,
    _decimal,
    _fraction,
    _root,
    _pi,
    _interval,
    _solution_set,
    _plus_minus,
    _tuple,
    _equation,
    _assignment,
    _assignments,
    _points,
    _text,
    _percent,
    _degrees,
    _units,
    _polynomial,
    _matrix,
)

# ---------------------------------------------------------------------------------------------
# Reasoning before the answer: it holds other numbers and math, never in a marked position.

_REASONING = (
    "We start by writing down what we know: the first quantity is $3$ and the second is 4.",
    "Let $u = 2$. Then $u^2 + 1 = 5$, which we use below.",
    "Multiplying both sides by $7$ gives $7y = 21$, so the intermediate value is 3.",
    "Consider the equation \\[ t^2 - 5t + 6 = 0. \\] Its roots are used only as a check.",
    "There are 12 cases to consider, and we handle each one in turn.",
    "Using the formula $A = \\frac{1}{2}bh$ with $b = 6$ and $h = 4$, the helper area is $12$.",
    "Step 1: simplify.\nStep 2: substitute $z = 9$ and compare.",
    "The total so far is $45$, and we still need to account for the remaining items.",
)
_NOUNS = ("value", "result", "smallest possible value", "number of ways", "total", "solution")


def _reasoning(rng: random.Random) -> str:
    return " ".join(rng.sample(_REASONING, rng.randint(1, 3)))


def _dollars(x: str) -> str:
    return f"${x}$"


# Each wrapper: (name, function(rng, answer, plain) -> text after the reasoning, or None if it
# does not fit the answer). `plain` says the answer may be written without math delimiters.
def _wrappers():
    return (
        ("boxed", lambda r, x, p: f"So the answer is $\\boxed{{{x}}}$."),
        ("boxed_display", lambda r, x, p: f"Therefore\n\\[\n\\boxed{{{x}}}\n\\]"),
        ("fbox", lambda r, x, p: f"Hence $\\fbox{{{x}}}$"),
        (
            "final_answer_hope",
            lambda r, x, p: f"Final Answer: The final answer is ${x}$. I hope it is correct.",
        ),
        ("final_answer_is", lambda r, x, p: f"The final answer is ${x}$."),
        ("answer_is_plain", lambda r, x, p: f"So the answer is {x}." if p else None),
        ("answer_colon", lambda r, x, p: f"Answer: ${x}$"),
        ("answer_colon_bold", lambda r, x, p: f"**Answer:** ${x}$"),
        ("answer_colon_plain", lambda r, x, p: f"Final Answer: {x}" if p else None),
        (
            "final_answer_prose",
            lambda r, x, p: f"Final Answer: The {r.choice(_NOUNS)} is ${x}$.",
        ),
        (
            "final_answer_prose_plain",
            lambda r, x, p: f"Final Answer: The {r.choice(_NOUNS)} is {x}." if p else None,
        ),
        ("answer_next_line", lambda r, x, p: f"**Final Answer**\n\n${x}$"),
        ("last_dollar", lambda r, x, p: f"Putting it together:\n${x}$"),
        ("last_paren", lambda r, x, p: f"Putting it together:\n\\({x}\\)"),
        ("last_bracket", lambda r, x, p: f"Putting it together:\n\\[{x}\\]"),
        ("last_display_dollar", lambda r, x, p: f"Putting it together:\n$$ {x} $$"),
        ("last_bracket_multiline", lambda r, x, p: f"Thus:\n\\[\n{x}\n\\]"),
        ("answer_display", lambda r, x, p: f"Answer \\[ {x} \\]"),
        ("answer_display_dollar", lambda r, x, p: f"Final answer:\n$$\n{x}\n$$"),
        ("reverse_phrase", lambda r, x, p: f"${x}$ is the final answer."),
        ("gsm8k", lambda r, x, p: f"#### {x}" if p else None),
    )


WRAPPERS = _wrappers()


def _marked(rng: random.Random, gold: Gold, form: str, verdict: str, expected: bool) -> Case:
    for _ in range(20):
        name, wrap = rng.choice(WRAPPERS)
        tail = wrap(rng, form, gold.plain and "\\" not in form and "$" not in form)
        if tail is not None:
            break
    text = f"{_reasoning(rng)}\n\n{tail}"
    return Case(text, gold.gold, expected, f"{gold.family}/{verdict}/{name}")


def _hedge(rng: random.Random, gold: Gold) -> Case | None:
    if gold.parts:
        return None  # a multi-part gold is where several values are right
    right, wrong = rng.choice(gold.equal), rng.choice(gold.wrong)
    first, second = (right, wrong) if rng.random() < 0.5 else (wrong, right)
    shape = rng.randrange(6)
    if shape == 5:
        # The same value in two forms joined by "or" commits to one answer.
        other = rng.choice([f for f in gold.equal if f != right] or [right])
        name, tail = "same_value_or", f"The answer is ${right}$, or equivalently ${other}$."
        return Case(f"{_reasoning(rng)}\n\n{tail}", gold.gold, True, f"{gold.family}/equal/{name}")
    if shape == 0:
        name, tail = "boxes_or", f"$\\boxed{{{first}}}$ or $\\boxed{{{second}}}$"
    elif shape == 1:
        name, tail = "phrase_or", f"The answer is ${first}$ or ${second}$."
    elif shape == 2:
        name, tail = "boxed_text_or", f"$\\boxed{{{first} \\text{{ or }} {second}}}$"
    elif shape == 3:
        # A self-correction whose last answer is the right one: two final answers all the same.
        name, tail = (
            "self_correction",
            f"$\\boxed{{{wrong}}}$. Wait, let me recheck. $\\boxed{{{right}}}$",
        )
    else:
        name, tail = "two_answers", f"The answer is ${wrong}$. So the answer is ${right}$."
    return Case(f"{_reasoning(rng)}\n\n{tail}", gold.gold, False, f"{gold.family}/hedge/{name}")


def _unmarked(rng: random.Random, gold: Gold) -> Case:
    form = rng.choice(gold.equal)
    tail = rng.choice(
        (
            f"so we get ${form}$ and then we check the remaining cases carefully.",
            f"The computation gives ${form}$, which we now double check against the constraints.",
        )
    )
    return Case(f"{_reasoning(rng)} {tail}", gold.gold, False, f"{gold.family}/unmarked/prose")


def _multipart(rng: random.Random, gold: Gold) -> Case | None:
    if not gold.parts:
        return None
    parts = list(gold.parts)
    swapped = False
    if rng.random() < 0.5:
        parts.reverse()
        swapped = True
    expected = not (gold.ordered and swapped)
    shape = rng.randrange(3)
    if shape == 0:
        name, tail = "boxes_and", " and ".join(f"$\\boxed{{{p}}}$" for p in parts)
    elif shape == 1:
        name, tail = (
            "boxes_text_and",
            "$" + " \\text{ and } ".join(f"\\boxed{{{p}}}" for p in parts) + "$",
        )
    else:
        name, tail = "boxes_lines", "\n".join(f"$\\boxed{{{p}}}$" for p in parts)
    verdict = "multipart" if expected else "multipart_wrong_order"
    return Case(
        f"{_reasoning(rng)}\n\n{tail}", gold.gold, expected, f"{gold.family}/{verdict}/{name}"
    )


def generate_cases(seed: int, n: int) -> list[Case]:
    """``n`` cases, the same for the same seed: about 45% equal forms, 30% wrong forms, and the
    rest hedges, unmarked answers and multi-part boxes."""
    rng = random.Random(seed)
    cases: list[Case] = []
    while len(cases) < n:
        gold = rng.choice(GOLD_FAMILIES)(rng)
        roll = rng.random()
        case = None
        if roll < 0.45:
            case = _marked(rng, gold, rng.choice(gold.equal), "equal", True)
        elif roll < 0.75:
            case = _marked(rng, gold, rng.choice(gold.wrong), "wrong", False)
        elif roll < 0.87:
            case = _hedge(rng, gold)
        elif roll < 0.92:
            case = _unmarked(rng, gold)
        else:
            case = _multipart(rng, gold)
        if case is not None:
            cases.append(case)
    return cases
