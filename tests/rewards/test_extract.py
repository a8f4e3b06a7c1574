"""Final-answer extraction: rule priority, thinking, balanced braces, hedging."""

import pytest

from grpo_lab.rewards.extract import (
    extract_answer,
    extract_final,
    find_boxed,
    gold_answer,
    is_disjunction,
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

    text = "7 " * 500_000
    start = time.perf_counter()
    assert extract_final(text).answer is None
    assert extract_final("\\boxed{" * 200_000).answer is None
    assert extract_final("<think>" * 100_000).answer is None
    assert extract_final("Answer" + " " * 1_000_000 + "x").answer is None
    assert extract_final("final" + " " * 500_000 + "answer" + " " * 500_000).answer is None
    repeated = extract_final("#### 1\n" * 150_000)
    assert (repeated.answer, repeated.hedged) == ("1", False)
    assert time.perf_counter() - start < 2.0
