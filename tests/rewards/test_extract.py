"""Final-answer extraction: rule priority, thinking, balanced braces, hedging, multi-part."""

import pytest

from grpo_lab.rewards.extract import (
    extract_answer,
    extract_final,
    find_boxed,
    gold_answer,
    gold_parts,
    is_disjunction,
    resolve_parts,
    strip_thinking,
)


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        pytest.param("So 48 + 24 = 72.\n#### 72", "72", "gsm8k", id="gsm8k-marker"),
        pytest.param("#### 1,234 dollars.", "1,234 dollars", "gsm8k", id="gsm8k-trailing-text"),
        pytest.param("#### 5\n\\boxed{6}", "5", "gsm8k", id="gsm8k-beats-boxed"),
        pytest.param("Thus $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "boxed", id="boxed-frac"),
        pytest.param("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "boxed", id="boxed-escaped-braces"),
        pytest.param("\\boxed{a^{b^{c}}}", "a^{b^{c}}", "boxed", id="boxed-nested-braces"),
        pytest.param("\\fbox{7}", "7", "boxed", id="fbox"),
        pytest.param("\\boxed {7}", "7", "boxed", id="boxed-space-before-brace"),
        pytest.param("\\boxed{7} The final answer is 8", "7", "boxed", id="boxed-beats-phrase"),
        pytest.param("The final answer is $18$.", "18", "final_phrase", id="final-phrase-dollars"),
        pytest.param("The final answer is 3.5. Done", "3.5", "final_phrase", id="phrase-sentence"),
        pytest.param("the answer is **12**.", "12", "final_phrase", id="phrase-markdown-bold"),
        pytest.param("The answer is $18.", "$18", "final_phrase", id="phrase-currency-dollar"),
        pytest.param("Answer: 42", "42", "answer_colon", id="answer-colon"),
        pytest.param("**Answer:** \\(x = 2\\)", "x = 2", "answer_colon", id="answer-colon-bold"),
        pytest.param("Final Answer:\n\n  17\n", "17", "answer_colon", id="answer-next-line"),
        pytest.param("  -3.5 \n", "-3.5", "bare_number", id="bare-number"),
        pytest.param("1,234", "1,234", "bare_number", id="bare-thousands"),
        pytest.param("3/4", "3/4", "bare_number", id="bare-fraction"),
        pytest.param("<think>#### 9</think>42", "42", "bare_number", id="bare-after-think"),
    ],
)
def test_extraction_rules(text, answer, rule):
    found = extract_final(text)
    assert (found.answer, found.rule, found.hedged) == (answer, rule, False)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("I am not sure.", id="prose"),
        pytest.param("\\boxed{1 + {2}", id="unbalanced-boxed"),
        pytest.param("<think>\\boxed{5}</think>", id="answer-only-in-think"),
        pytest.param("<think>so #### 5 ...", id="unclosed-think"),
        pytest.param("x = 3", id="bare-equation-is-not-a-number"),
        pytest.param("42 apples", id="bare-number-with-words"),
        pytest.param("#### \n", id="empty-gsm8k-line"),
    ],
)
def test_no_answer(text):
    assert extract_final(text).answer is None
    assert extract_answer(text) is None


@pytest.mark.parametrize(
    "text, hedged",
    [
        pytest.param("#### 3\n#### 4", True, id="two-gsm8k-values"),
        pytest.param("#### 3\n#### 3", False, id="same-gsm8k-value-twice"),
        pytest.param("\\boxed{3} or maybe \\boxed{4}", True, id="two-boxed-values"),
        pytest.param("\\boxed{0.5}, i.e. \\boxed{\\frac{1}{2}}", False, id="boxed-same-number"),
        pytest.param(
            "\\boxed{\\frac{\\sqrt{2}}{2}} = \\boxed{\\dfrac{\\sqrt2}{2}}", True, id="latex-str"
        ),
        pytest.param("\\boxed{x+1} and \\boxed{ x + 1 }", False, id="boxed-same-up-to-spaces"),
        pytest.param("The answer is 3 or 4.", True, id="phrase-or"),
        pytest.param("\\boxed{3 \\text{ or } 4}", True, id="boxed-text-or"),
        pytest.param("\\boxed{\\lfloor x \\rfloor}", False, id="floor-is-not-or"),
        pytest.param("The answer is 5. So the answer is 6.", True, id="self-correction"),
        pytest.param("#### 3\n\\boxed{4}", False, id="lower-rule-not-consulted"),
        pytest.param("<think>\\boxed{4}</think>\\boxed{3}", False, id="think-not-counted"),
    ],
)
def test_hedging(text, hedged):
    found = extract_final(text)
    assert found.hedged is hedged
    assert (extract_answer(text) is None) is hedged


def test_hedged_answer_is_last_candidate():
    found = extract_final("\\boxed{3} hmm \\boxed{4}")
    assert found.answer == "4"
    assert found.candidates == ("3", "4")


@pytest.mark.parametrize(
    "text, kept",
    [
        pytest.param("<think>a</think>b", "b", id="closed-block"),
        pytest.param("a<think>b</think>c<think>d</think>e", "ace", id="two-blocks"),
        pytest.param("reasoning</think>answer", "answer", id="template-opened-think"),
        pytest.param("a<think>b", "a", id="unclosed-keeps-prefix"),
        pytest.param("<THINK>b</THINK>c", "c", id="case-insensitive"),
    ],
)
def test_strip_thinking(text, kept):
    assert strip_thinking(text).replace(" ", "") == kept


def test_find_boxed_skips_unbalanced_but_keeps_others():
    assert find_boxed("\\boxed{1} \\boxed{2") == ["1"]
    assert find_boxed("\\boxed{}") == []


def test_disjunction_needs_both_sides():
    assert is_disjunction("3 or 4")
    assert not is_disjunction("or 4")
    assert not is_disjunction("\\text{color}")


@pytest.mark.parametrize(
    "gold, answer",
    [
        pytest.param("He sold 48/2 = <<48/2=24>>24.\n#### 72", "72", id="gsm8k-solution"),
        pytest.param("So it is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", id="math-solution"),
        pytest.param("  \\sqrt{2} ", "\\sqrt{2}", id="plain-answer"),
    ],
)
def test_gold_answer(gold, answer):
    assert gold_answer(gold) == answer


def test_one_megabyte_completion_is_fast():
    import time

    # CPU time of this process, not wall time: the bound is on the extractor's work (linear in
    # the text, not quadratic), and another process on the machine must not fail it.
    text = "7 " * 500_000
    start = time.process_time()
    assert extract_final(text).answer is None
    assert extract_final("\\boxed{" * 200_000).answer is None
    assert extract_final("<think>" * 100_000).answer is None
    assert extract_final("Answer" + " " * 1_000_000 + "x").answer is None
    assert extract_final("final" + " " * 500_000 + "answer" + " " * 500_000).answer is None
    repeated = extract_final("#### 1\n" * 150_000)
    assert (repeated.answer, repeated.hedged) == ("1", False)
    assert time.process_time() - start < 2.0


@pytest.mark.parametrize(
    "text, answer, rule",
    [
        pytest.param("Work.\n$(2, \\infty)$", "(2, \\infty)", "last_line", id="last-line-dollar"),
        pytest.param(
            "Work.\n\\(2 - \\frac{1}{\\pi}\\)", "2 - \\frac{1}{\\pi}", "last_line", id="paren"
        ),
        pytest.param("So:\n\\[\na = 4, b = 7\n\\]", "a = 4, b = 7", "last_line", id="last-display"),
        pytest.param("Some text.\n$$12$$", "12", "last_line", id="last-double-dollar"),
        pytest.param("Some text.\n$12$<|im_end|>", "12", "last_line", id="last-line-end-token"),
        pytest.param("Some text.\n**$12$**.", "12", "last_line", id="last-line-bold-period"),
        pytest.param("Done.\nTherefore, $x = 3$.", "x = 3", "last_line", id="last-line-cue"),
        pytest.param("So\n$3$ and $4$", "3, 4", "last_line", id="last-line-two-spans"),
        pytest.param("Final Answer: The smallest $k$ is 17.", "17", "answer_colon", id="prose"),
        pytest.param("Final Answer: There are 17 ways.", "17", "answer_colon", id="prose-number"),
        pytest.param("Final Answer: 3 since 3 is prime.", "3", "answer_colon", id="leading-math"),
        pytest.param("Final Answer: The function is odd.", "odd", "answer_colon", id="prose-word"),
        pytest.param("The answer is therefore $5$.", "5", "final_phrase", id="adverb"),
        pytest.param("The answers are $2$ and $3$.", "2, 3", "final_phrase", id="answers-are"),
        pytest.param("My answer is 1, 2, and 3.", "1, 2, 3", "final_phrase", id="list-with-and"),
        pytest.param(
            "$\\frac{1}{2}$ is the final answer.", "\\frac{1}{2}", "final_phrase", id="rev"
        ),
        pytest.param("So 12 is our answer.", "12", "final_phrase", id="reverse-number"),
        pytest.param("Answer \\[ 42 \\]", "42", "answer_colon", id="display-after-cue"),
        pytest.param("**Final Answer**\n$$\n42\n$$", "42", "answer_colon", id="display-next-line"),
        pytest.param("\\[\\text{Answer: } 7\\]", "7", "answer_colon", id="cue-inside-text"),
        pytest.param("$\\textbf{Answer:}$ 7", "7", "answer_colon", id="cue-inside-math"),
        pytest.param("#### The answer is 72", "72", "gsm8k", id="gsm8k-prose"),
        pytest.param("Work.\n\n**Final Answer**\n17", "17", "answer_colon", id="heading"),
        pytest.param(
            "## Final Answer\n\n$\\frac{5}{9}$", "\\frac{5}{9}", "answer_colon", id="md-head"
        ),
        pytest.param("Check if the answer is an integer.\nAnswer: 5", "5", "answer_colon", id="q"),
    ],
)
def test_marked_answer_forms(text, answer, rule):
    found = extract_final(text)
    assert (found.answer, found.rule, found.hedged) == (answer, rule, False)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("So the total is $12$ and we are done.", id="math-mid-prose"),
        pytest.param("Work.\nThe total is $12$", id="last-line-with-prose"),
        pytest.param("Work.\n$12$ apples in all", id="last-line-math-then-words"),
        pytest.param("We get $x = 5$.\nI hope it is correct.", id="math-not-on-last-line"),
        pytest.param("To find the answer\nwe add 5 and 7.", id="answer-word-ending-a-line"),
    ],
)
def test_unmarked_math_is_no_answer(text):
    assert extract_final(text).answer is None


@pytest.mark.parametrize(
    "text, parts",
    [
        pytest.param("The answer is either 3 or 4.", ("3", "4"), id="either-or"),
        pytest.param("The answer is 3 or maybe 4.", ("3", "4"), id="or-maybe"),
        pytest.param("The answer is $3$, or maybe $4$.", ("3", "4"), id="spans-or-maybe"),
        pytest.param("Work.\n$3$ or $4$", ("3", "4"), id="last-line-or"),
        pytest.param("\\boxed{m = 3} and \\boxed{n = 8}", ("m = 3", "n = 8"), id="two-boxes"),
        pytest.param("\\boxed{3} \\boxed{3.0} \\boxed{4}", ("3", "4"), id="distinct-boxes"),
    ],
)
def test_hedges_keep_their_parts(text, parts):
    found = extract_final(text)
    assert found.hedged
    assert found.parts == parts


@pytest.mark.parametrize(
    "text, answer",
    [
        pytest.param("The answer is $\\frac12$, or $0.5$.", "\\frac12", id="same-value-or"),
        pytest.param("\\boxed{x = 3} so \\boxed{3}", "3", id="assignment-and-value-agree"),
        pytest.param("\\boxed{\\text{Even}} \\boxed{even}", "even", id="same-word"),
        pytest.param(
            "\\boxed{x < -1 \\text{ or } x > 3}",
            "(-\\infty, -1) \\cup (3, \\infty)",
            id="inequalities-or-is-a-union",
        ),
    ],
)
def test_not_hedges(text, answer):
    found = extract_final(text)
    assert (found.answer, found.hedged) == (answer, False)


@pytest.mark.parametrize(
    "gold, parts, kind",
    [
        pytest.param("m = 3, n = 8", ["m=3", "n=8"], "list", id="assignments"),
        pytest.param("(1, 2), (4, 5)", ["(1,2)", "(4,5)"], "list", id="pairs"),
        pytest.param("\\{1, 2\\}", ["1", "2"], "set", id="set"),
        pytest.param("(3, 8)", ["3", "8"], "tuple", id="tuple"),
        pytest.param("1 \\pm \\sqrt{2}", ["1+\\sqrt{2}", "1-\\sqrt{2}"], "list", id="plus-minus"),
        pytest.param("1,234", ["1,234"], "list", id="thousands-is-one-number"),
        pytest.param("(2, \\infty)", ["(2,\\infty)"], "list", id="interval"),
        pytest.param("[1, 2)", ["[1,2)"], "list", id="half-open"),
        pytest.param("\\frac{1}{2}", ["\\frac{1}{2}"], "list", id="single"),
    ],
)
def test_gold_parts(gold, parts, kind):
    assert gold_parts(gold) == (parts, kind)


@pytest.mark.parametrize(
    "text, gold, answer",
    [
        pytest.param("\\boxed{m = 3} and \\boxed{n = 8}", "m = 3, n = 8", "m = 3, n = 8", id="eqs"),
        pytest.param("\\boxed{2} \\boxed{1}", "\\{1, 2\\}", "\\{2, 1\\}", id="set"),
        pytest.param("\\boxed{8} \\boxed{3}", "(3, 8)", "(8, 3)", id="tuple-keeps-order"),
        pytest.param("$x = 2$ or $x = 3$", "2, 3", "2, 3", id="same-variable-values"),
        pytest.param("\\boxed{3} or \\boxed{4}", "3", None, id="single-gold-stays-hedged"),
        pytest.param("\\boxed{1} \\boxed{2} \\boxed{3}", "1, 2", None, id="count-differs"),
        pytest.param("\\boxed{1}", "1, 2", None, id="not-hedged"),
    ],
)
def test_resolve_parts(text, gold, answer):
    assert resolve_parts(extract_final(text), gold) == answer


def test_many_markers_stay_fast():
    import time

    start = time.process_time()  # CPU time, as in test_one_megabyte_completion_is_fast
    found = extract_final("the answer is 3 " * 60_000)
    assert (found.answer, found.hedged) == ("3", False)
    assert extract_final("The answer is " + "1 or " * 200_000).answer is not None
    assert extract_final("Answer: $" * 100_000).answer is None
    assert extract_final("$" * 1_000_000).answer is None
    assert extract_final("\\(" * 300_000 + "\\)").answer is None
    assert extract_final("x\n" + "$a$ and " * 100_000 + "$b$").answer is None
    assert extract_final("5 is the answer " * 60_000).answer == "5"
    assert time.process_time() - start < 3.0
