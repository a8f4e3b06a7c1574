"""Plain-number grammar and compact LaTeX (in-process, no evaluation)."""

import random
from fractions import Fraction

import pytest

from grpo_lab.rewards.normalize import compact_latex, parse_number


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
