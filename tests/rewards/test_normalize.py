"""Plain numbers, compact LaTeX, word answers, assignments, inequalities (no evaluation)."""

import random
from fractions import Fraction

import pytest

from grpo_lab.rewards.normalize import (
    assignment_value,
    compact_latex,
    expand_plus_minus,
    inequality_interval,
    looks_like_interval,
    parse_number,
    text_key,
)


@pytest.mark.parametrize(
    "text, value",
    [
        pytest.param("42", Fraction(42), id="integer"),
        pytest.param("-7", Fraction(-7), id="negative"),
        pytest.param("+7", Fraction(7), id="explicit-plus"),
        pytest.param("\u22127", Fraction(-7), id="unicode-minus"),
        pytest.param("1,234,567", Fraction(1234567), id="thousands"),
        pytest.param("1,234.5", Fraction(2469, 2), id="thousands-decimal"),
        pytest.param("1{,}234", Fraction(1234), id="latex-braced-comma"),
        pytest.param("1\\,234", Fraction(1234), id="latex-thin-space"),
        pytest.param("0.25", Fraction(1, 4), id="decimal"),
        pytest.param(".5", Fraction(1, 2), id="leading-point"),
        pytest.param("72.", Fraction(72), id="trailing-period"),
        pytest.param("3/4", Fraction(3, 4), id="slash"),
        pytest.param("-3 / 4", Fraction(-3, 4), id="slash-spaces"),
        pytest.param("\\frac{3}{4}", Fraction(3, 4), id="frac"),
        pytest.param("\\dfrac{3}{4}", Fraction(3, 4), id="dfrac"),
        pytest.param("\\tfrac{3}{4}", Fraction(3, 4), id="tfrac"),
        pytest.param("\\frac12", Fraction(1, 2), id="frac-shorthand"),
        pytest.param("-\\frac{1}{2}", Fraction(-1, 2), id="frac-minus-outside"),
        pytest.param("\\frac{-1}{2}", Fraction(-1, 2), id="frac-minus-inside"),
        pytest.param("50%", Fraction(50), id="percent-is-a-unit"),
        pytest.param("50\\%", Fraction(50), id="latex-percent"),
        pytest.param("50 percent", Fraction(50), id="word-percent"),
        pytest.param("$18", Fraction(18), id="currency"),
        pytest.param("\\$18.50", Fraction(37, 2), id="latex-currency"),
        pytest.param("-$18", Fraction(-18), id="sign-before-currency"),
        pytest.param("$-18", Fraction(-18), id="sign-after-currency"),
        pytest.param("$18$", Fraction(18), id="math-delimiters"),
        pytest.param("\\(18\\)", Fraction(18), id="paren-delimiters"),
        pytest.param("\\boxed{18}", Fraction(18), id="boxed-wrapper"),
        pytest.param("\\text{18}", Fraction(18), id="text-wrapper"),
        pytest.param("18 dollars", Fraction(18), id="word-unit"),
        pytest.param("5 square feet", Fraction(5), id="two-word-unit"),
        pytest.param("18\\text{ dollars}", Fraction(18), id="text-unit"),
        pytest.param("5\\text{ cm}^2", Fraction(5), id="squared-text-unit"),
        pytest.param("30^\\circ", Fraction(30), id="degrees"),
        pytest.param("30^{\\circ}", Fraction(30), id="degrees-braced"),
        pytest.param("007", Fraction(7), id="leading-zeros"),
    ],
)
def test_plain_numbers(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("1,23", id="bad-thousands-is-a-list"),
        pytest.param("1, 234", id="spaced-comma-is-a-list"),
        pytest.param("1 2", id="two-numbers"),
        pytest.param("3i", id="imaginary-letter"),
        pytest.param("3\\mathrm{i}", id="imaginary-unit-in-mathrm"),
        pytest.param("4 x", id="single-letter-kept"),
        pytest.param("2 pi", id="pi-changes-value"),
        pytest.param("3 million", id="scale-word"),
        pytest.param("5 squared", id="operation-word"),
        pytest.param("3 or 4", id="disjunction"),
        pytest.param("1/0", id="zero-denominator"),
        pytest.param("\\frac{1}{0}", id="frac-zero-denominator"),
        pytest.param("\\sqrt{2}", id="root"),
        pytest.param("1e5", id="scientific-goes-symbolic"),
        pytest.param("x = 3", id="equation"),
        pytest.param("9" * 500, id="too-long"),
    ],
)
def test_not_plain_numbers(text):
    assert parse_number(text) is None


def test_bare_number_rule_takes_no_units():
    assert parse_number("18 dollars", allow_units=False) is None
    assert parse_number("18", allow_units=False) == 18


def test_thousands_formatting_round_trips():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(-(10**12), 10**12)
        assert parse_number(f"{n:,}") == n
        assert parse_number(f"${n:,}") == n


def test_fractions_agree_with_fraction_class():
    rng = random.Random(1)
    for _ in range(500):
        p, q = rng.randint(-999, 999), rng.randint(1, 999)
        expected = Fraction(p, q)
        assert parse_number(f"{p}/{q}") == expected
        assert parse_number(f"\\frac{{{p}}}{{{q}}}") == expected
        assert parse_number(f"{p / q:.17g}") == Fraction(f"{p / q:.17g}")


@pytest.mark.parametrize(
    "a, b",
    [
        pytest.param("\\left( 1, 2 \\right]", "(1,2]", id="left-right-spaces"),
        pytest.param("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", id="dfrac"),
        pytest.param("$x^2 + 1$.", "x^2+1", id="delimiters-period"),
        pytest.param("\\boxed{\\,\\pi\\,}", "\\pi", id="boxed-spacing"),
    ],
)
def test_compact_latex_equal(a, b):
    assert compact_latex(a) == compact_latex(b)


def test_compact_latex_keeps_meaning():
    assert compact_latex("(1,2]") != compact_latex("(1,2)")
    assert compact_latex("x^2") != compact_latex("x^3")


@pytest.mark.parametrize(
    "text, key",
    [
        pytest.param("even", "even", id="word"),
        pytest.param("$\\text{Even}$", "even", id="text-in-math-case"),
        pytest.param("\\textbf{(C)}", "c", id="bold-choice"),
        pytest.param("\\mathrm{Monday}.", "monday", id="mathrm-period"),
        pytest.param("\\text{no solution}", "nosolution", id="spaces-dropped"),
        pytest.param("\\text{\\textbf{odd}}", "odd", id="nested"),
        pytest.param("x^2", None, id="math"),
        pytest.param("3", None, id="number"),
        pytest.param("5\\text{ cm}", None, id="number-with-unit"),
        pytest.param("\\text{odd", None, id="unbalanced"),
    ],
)
def test_text_key(text, key):
    assert text_key(text) == key


@pytest.mark.parametrize(
    "text, value",
    [
        pytest.param("x = 3", "3", id="simple"),
        pytest.param("$k=17$", "17", id="delimiters"),
        pytest.param("a_1 = \\frac{1}{2}", "\\frac{1}{2}", id="subscript"),
        pytest.param("a = 4, b = 7", None, id="list"),
        pytest.param("y = 2x = 4", None, id="chain"),
        pytest.param("x \\le 3", None, id="inequality"),
        pytest.param("f(x) = 2x", None, id="function"),
    ],
)
def test_assignment_value(text, value):
    assert assignment_value(text) == value


@pytest.mark.parametrize(
    "text, interval",
    [
        pytest.param("x > 2", "(2, \\infty)", id="greater"),
        pytest.param("x \\le -1", "(-\\infty, -1]", id="le"),
        pytest.param("$x \\geq \\frac{1}{2}$", "[\\frac{1}{2}, \\infty)", id="geq-frac"),
        pytest.param("-3 < x \\leq 5", "(-3, 5]", id="two-bounds"),
        pytest.param("5 \\ge x > 1", "(1, 5]", id="reversed-two-bounds"),
        pytest.param("2 < x", "(2, \\infty)", id="bound-first"),
        pytest.param("1 < x > 2", None, id="not-an-interval"),
        pytest.param("x^2 > 4", None, id="not-one-variable"),
        pytest.param("2 < 3", None, id="no-variable"),
        pytest.param("x = 3", None, id="equation"),
        pytest.param("x \\neq 0", "(-\\infty, 0) \\cup (0, \\infty)", id="not-equal"),
        pytest.param("x \\neq 1 < 2", None, id="not-equal-chain"),
    ],
)
def test_inequality_interval(text, interval):
    assert inequality_interval(text) == interval


@pytest.mark.parametrize(
    "text, interval",
    [
        pytest.param("(2, \\infty)", True, id="open"),
        pytest.param("\\left[1, 2\\right)", True, id="half-open-left-right"),
        pytest.param("(-\\infty, -1] \\cup [3, \\infty)", True, id="union"),
        pytest.param("1, 2", False, id="list"),
        pytest.param("\\{1, 2\\}", False, id="set"),
        pytest.param("(1, 2, 3)", False, id="triple"),
    ],
)
def test_looks_like_interval(text, interval):
    assert looks_like_interval(text) is interval


@pytest.mark.parametrize(
    "text, expanded",
    [
        pytest.param("\\pm 3", "+ 3, - 3", id="alone"),
        pytest.param("1 \\pm \\sqrt{2}", "1 + \\sqrt{2}, 1 - \\sqrt{2}", id="sum"),
        pytest.param(
            "\\frac{-1\\pm\\sqrt5}{2}", "\\frac{-1+\\sqrt5}{2}, \\frac{-1-\\sqrt5}{2}", id="frac"
        ),
        pytest.param("\\pm 1 \\pm 2", "\\pm 1 \\pm 2", id="two-signs-kept"),
        pytest.param("3", "3", id="none"),
    ],
)
def test_expand_plus_minus(text, expanded):
    assert expand_plus_minus(text) == expanded
