"""score_batch / math_reward end to end: a table of completions with the reason for each verdict."""

import dataclasses
import threading

import pytest

from grpo_lab.rewards import STATUSES, ScoreResult, math_reward, score_batch

C, W, N, H = "correct", "wrong", "no_answer", "hedged"

# (completion, gold, expected status); the id says why.
CASES = [
    # GSM8K-style integers (fast path)
    pytest.param("48 + 24 = 72\n#### 72", "72", C, id="gsm8k-int"),
    pytest.param("#### 73", "72", W, id="gsm8k-off-by-one"),
    pytest.param("#### 1,234", "1234", C, id="commas-in-pred"),
    pytest.param("#### 1234", "1,234", C, id="commas-in-gold"),
    pytest.param("#### $18.", "18", C, id="currency-and-period"),
    pytest.param("#### 18 dollars", "18", C, id="word-unit"),
    pytest.param("#### -3", "-3", C, id="negative"),
    pytest.param("#### 3", "-3", W, id="sign-matters"),
    pytest.param("#### 72.0", "72", C, id="integer-written-as-decimal"),
    pytest.param("#### 72.0000001", "72", W, id="integer-gold-is-exact"),
    pytest.param("He sold 48/2 = <<48/2=24>>24\n#### 72", "Some work\n#### 72", C, id="raw-gold"),
    # decimals, fractions, percents
    pytest.param("\\boxed{0.75}", "\\frac{3}{4}", C, id="decimal-vs-frac"),
    pytest.param("\\boxed{\\dfrac{3}{4}}", "0.75", C, id="dfrac-vs-decimal"),
    pytest.param("\\boxed{3/4}", "\\frac34", C, id="slash-vs-frac-shorthand"),
    pytest.param("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", C, id="unreduced-fraction-by-value"),
    pytest.param("\\boxed{0.3333333}", "\\frac{1}{3}", C, id="rel-error-below-1e-6"),
    pytest.param("\\boxed{0.333}", "\\frac{1}{3}", W, id="rel-error-above-1e-6"),
    pytest.param("\\boxed{50\\%}", "50", C, id="percent-equals-number"),
    pytest.param("\\boxed{50}", "50\\%", C, id="number-equals-percent"),
    pytest.param("\\boxed{0.5}", "50\\%", W, id="percent-is-not-a-ratio"),
    # symbolic (worker)
    pytest.param("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", C, id="sqrt-simplifies"),
    pytest.param("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", C, id="rationalised"),
    pytest.param("\\boxed{\\sqrt{3}}", "\\sqrt{2}", W, id="different-sqrt"),
    pytest.param("\\boxed{\\frac{\\sqrt{2}}{2}}", "0.7071068", C, id="sqrt-vs-decimal"),
    pytest.param("\\boxed{(x+1)^2}", "x^2+2x+1", C, id="expanded-polynomial"),
    pytest.param("\\boxed{x^2+1}", "x^2-1", W, id="different-polynomial"),
    pytest.param("\\boxed{\\pi}", "3.14159265", C, id="pi-within-6-decimals"),
    pytest.param("\\boxed{3.14}", "\\pi", W, id="pi-rounded-too-far"),
    pytest.param("\\boxed{(1,2]}", "(1,2]", C, id="half-open-interval"),
    pytest.param("\\boxed{(1,2)}", "(1,2]", W, id="interval-openness-matters"),
    pytest.param("\\boxed{[1,2]}", "(1,2)", W, id="closed-vs-open"),
    pytest.param("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", C, id="infinite-interval"),
    pytest.param("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}", C, id="set-order-irrelevant"),
    pytest.param("\\boxed{2, 1}", "1, 2", C, id="solution-list-order-irrelevant"),
    pytest.param("\\boxed{(1, 2)}", "(2, 1)", W, id="tuple-order-matters"),
    pytest.param("\\boxed{(2, 1)}", "(2, 1)", C, id="same-tuple"),
    pytest.param("\\boxed{x = 3}", "3", C, id="assignment-vs-value"),
    pytest.param("\\boxed{3}", "x = 3", C, id="value-vs-assignment"),
    pytest.param("\\boxed{y = 1 + 2x}", "y = 2x + 1", C, id="same-equation"),
    pytest.param("\\boxed{y = 2x - 1}", "y = 2x + 1", W, id="different-equation"),
    pytest.param("\\boxed{\\text{(C)}}", "\\text{(C)}", C, id="same-text-choice"),
    pytest.param("The final answer is $\\frac{1}{2}$.", "0.5", C, id="final-phrase-latex"),
    pytest.param("Answer: 12", "12", C, id="answer-colon"),
    pytest.param("  -3.5 ", "-\\frac{7}{2}", C, id="bare-number-completion"),
    # thinking, hedging, no answer
    pytest.param("<think>\\boxed{4}</think>\\boxed{5}", "5", C, id="think-ignored"),
    pytest.param("<think>\\boxed{5}</think>\\boxed{4}", "5", W, id="think-answer-not-used"),
    pytest.param("<think>\\boxed{5}</think>", "5", N, id="answer-only-in-think"),
    pytest.param("<think>I guess \\boxed{5}", "5", N, id="unclosed-think"),
    pytest.param("thinking... \\boxed{4}</think>\\boxed{5}", "5", C, id="think-opened-in-prompt"),
    pytest.param("#### 3\n#### 4", "3", H, id="two-gsm8k-answers"),
    pytest.param("#### 3\nso\n#### 3", "3", C, id="same-answer-repeated"),
    pytest.param("\\boxed{3} or \\boxed{4}", "3", H, id="two-boxed-answers"),
    pytest.param("The answer is 3 or 4.", "3", H, id="or-disjunction"),
    pytest.param("I don't know.", "3", N, id="no-marker"),
    pytest.param("\\boxed{3", "3", N, id="unbalanced-boxed"),
    pytest.param("", "3", N, id="empty-completion"),
]


# Final answers as models write them (the forms of issue "read final answers the way models
# actually write them"), with the hedges that must still score 0.
MARKED = [
    pytest.param("Work.\n$(2, \\infty)$", "(2,\\infty)", C, id="last-line-interval"),
    pytest.param("Work.\n$2 - \\frac{1}{\\pi}$", "2-\\frac{1}{\\pi}", C, id="last-line-expression"),
    pytest.param("Work.\n$a = 4, b = 7$", "a=4,b=7", C, id="last-line-equations"),
    pytest.param("Work.\n$b = 7, a = 4$", "a=4,b=7", C, id="equations-any-order"),
    pytest.param("Some text.\n$12$", "12", C, id="last-line-number"),
    pytest.param("Final Answer: The smallest $k$ is 17.", "17", C, id="final-answer-prose"),
    pytest.param("Final Answer: The smallest $k$ is 18.", "17", W, id="final-answer-prose-wrong"),
    pytest.param("\\boxed{(1, 2)} \\text{ and } \\boxed{(4, 5)}", "(1, 2), (4, 5)", C, id="pairs"),
    pytest.param(
        "\\boxed{(4, 5)} \\text{ and } \\boxed{(1, 2)}", "(1, 2), (4, 5)", C, id="pairs-set"
    ),
    pytest.param("$\\boxed{m = 3}$ and $\\boxed{n = 8}$", "m = 3, n = 8", C, id="boxed-equations"),
    pytest.param("\\boxed{3} \\boxed{8}", "(3, 8)", C, id="boxes-tuple-in-order"),
    pytest.param("\\boxed{8} \\boxed{3}", "(3, 8)", W, id="boxes-tuple-wrong-order"),
    pytest.param("\\boxed{3} \\boxed{4}", "3", H, id="boxes-single-gold-hedged"),
    pytest.param("$x = 3$ or $x = -3$", "\\pm 3", C, id="roots-or-plus-minus"),
    pytest.param("$\\text{even}$", "even", C, id="text-wrapped-pred"),
    pytest.param("Work.\n$prime$", "\\text{prime}", C, id="text-wrapped-gold"),
    pytest.param("The answer is $\\textbf{Odd}$.", "\\text{odd}", C, id="text-case"),
    pytest.param("The answer is $\\text{east}$.", "\\text{seat}", W, id="text-not-anagram"),
    pytest.param("Answer: (B) 12", "\\text{(B)}", C, id="choice-with-content"),
    pytest.param("Answer \\[ 42 \\]", "42", C, id="display-after-cue"),
    pytest.param("The answer is $\\boxed{x > 2}$", "(2,\\infty)", C, id="inequality-interval"),
    pytest.param("$\\boxed{-1 \\le x < 3}$", "[-1, 3)", C, id="double-inequality"),
    pytest.param("$\\boxed{-1 < x < 3}$", "[-1, 3)", W, id="inequality-openness"),
    pytest.param(
        "\\boxed{2\\pi}, or equivalently \\boxed{\\pi \\cdot 2}", "2\\pi", C, id="one-value"
    ),
    pytest.param("The answer is either 3 or 4.", "3", H, id="either-or-hedged"),
    pytest.param("The answer is 3 or maybe 4.", "4", H, id="or-maybe-hedged"),
    pytest.param("So the total is $12$ and we are done.", "12", N, id="unmarked-math"),
    pytest.param(
        "Answer: $x=\\frac{-1\\pm\\sqrt{5}}{2}$", "\\frac{-1 \\pm \\sqrt5}{2}", C, id="pm"
    ),
    pytest.param("The answer is $x \\neq 0$", "(-\\infty,0)\\cup(0,\\infty)", C, id="not-equal"),
]


@pytest.mark.parametrize("completion, gold, status", CASES + MARKED)
def test_table(pool, completion, gold, status):
    result = score_batch([completion], [gold], pool=pool)[0]
    assert result.status == status
    assert result.score == (1.0 if status == "correct" else 0.0)


def test_batch_matches_items_scored_one_by_one(pool):
    completions = [p.values[0] for p in CASES + MARKED]
    golds = [p.values[1] for p in CASES + MARKED]
    batch = score_batch(completions, golds, pool=pool)
    single = [score_batch([c], [g], pool=pool)[0] for c, g in zip(completions, golds)]
    assert batch == single


def test_result_fields():
    result = score_batch(["#### 72"], ["72"])[0]
    assert result == ScoreResult(1.0, "correct", "72")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.score = 0.0
    assert score_batch(["nothing"], ["72"])[0] == ScoreResult(0.0, "no_answer", None)
    assert score_batch(["#### 1\n#### 2"], ["2"])[0] == ScoreResult(0.0, "hedged", "2")
    assert set(STATUSES) == {"correct", "wrong", "no_answer", "hedged", "timeout", "parse_error"}


def test_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="2 completions and 1 golds"):
        score_batch(["#### 1", "#### 2"], ["1"])


@pytest.mark.parametrize("gold", ["", "  ", None, 3])
def test_bad_gold_is_a_clear_error(gold):
    with pytest.raises(ValueError, match=r"golds\[1\] must be a non-empty string"):
        score_batch(["#### 1", "#### 2"], ["1", gold])


def test_a_single_string_is_refused():
    with pytest.raises(TypeError, match="sequences of strings"):
        score_batch("#### 1", "1")


def test_empty_batch():
    assert score_batch([], []) == []


def test_math_reward():
    assert math_reward("so #### 72", "72") == 1.0
    assert math_reward("so #### 73", "72") == 0.0
    assert math_reward("\\boxed{\\sqrt{8}}", "2\\sqrt{2}") == 1.0


def test_score_batch_from_threads(pool):
    outcomes = {}

    def work(name, completion, gold):
        outcomes[name] = score_batch([completion], [gold], pool=pool)[0].status

    threads = [
        threading.Thread(target=work, args=(f"t{i}", f"\\boxed{{\\sqrt{{{i * i}}}}}", str(i)))
        for i in range(2, 6)
    ] + [threading.Thread(target=work, args=("fast", "#### 7", "7"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == {"t2": C, "t3": C, "t4": C, "t5": C, "fast": C}
