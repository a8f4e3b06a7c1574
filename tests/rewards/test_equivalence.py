"""is_equiv decisions, the in-process fast path and the pre-screen."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_lab.rewards import VerifierPool, is_equiv, score_batch
from grpo_lab.rewards.equivalence import compare, fast_equiv, prescreen

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        pytest.param("72", "72", True, id="same-int"),
        pytest.param("72.00", "72", True, id="int-exact-with-zeros"),
        pytest.param("72.0000001", "72", False, id="int-gold-exact"),
        pytest.param("0.1", "1/10", True, id="decimal-exact-fraction"),
        # 2.000001 vs 2.0000005: |diff| = 5e-7 <= 1e-6 * 2.0000005 -> equal
        pytest.param("2.000001", "2.0000005", True, id="rel-tol-inside"),
        # 2.00001 vs 2.0000005: |diff| = 9.5e-6 > 2.0000005e-6 -> not equal
        pytest.param("2.00001", "2.0000005", False, id="rel-tol-outside"),
        pytest.param("\\frac{6}{8}", "\\frac{3}{4}", True, id="unreduced-equal-by-value"),
        pytest.param("50\\%", "50", True, id="percent-unit"),
        pytest.param("50\\%", "0.5", False, id="percent-not-ratio"),
        pytest.param("\\$1,000", "1000", True, id="currency-commas"),
        pytest.param("\\left(1,2\\right]", "(1, 2]", True, id="layout-only-difference"),
    ],
)
def test_fast_path_decisions(pred, gold, equal):
    assert fast_equiv(pred, gold) is equal


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        pytest.param("\\text{Even}", "even", True, id="text-case"),
        pytest.param("$prime$", "\\text{prime}", True, id="bare-word-vs-text"),
        pytest.param("\\textbf{(C)}", "\\text{(C)}", True, id="choice"),
        pytest.param("C", "\\text{(C)}", True, id="choice-letter"),
        pytest.param("(B) 12", "\\text{(B)}", True, id="choice-with-content"),
        pytest.param("\\text{odd}", "\\text{even}", False, id="other-word"),
        pytest.param("\\text{seat}", "\\text{east}", False, id="anagram"),
        pytest.param("5", "\\text{five}", False, id="number-vs-word"),
    ],
)
def test_text_answers_decided_in_process(pred, gold, equal):
    assert fast_equiv(pred, gold) is equal


def test_lone_letter_gold_is_not_text():
    assert fast_equiv("X", "x") is None  # a variable: case matters, sympy decides


@pytest.mark.parametrize(
    "pred, gold",
    [
        pytest.param("\\sqrt{8}", "2\\sqrt{2}", id="roots"),
        pytest.param("x = 3", "3", id="equation"),
        pytest.param("72", "\\sqrt{5184}", id="gold-not-plain"),
        pytest.param("8 \\cdot 9", "72", id="pred-not-plain"),
    ],
)
def test_fast_path_defers_to_sympy(pred, gold):
    assert fast_equiv(pred, gold) is None


@pytest.mark.parametrize(
    "pred, gold, equal",
    [
        pytest.param("8 \\cdot 9", "72", True, id="arithmetic-expression"),
        pytest.param("\\sqrt{5184}", "72", True, id="root-of-square"),
        pytest.param("\\{1,2,3\\}", "(1,2,3)", True, id="set-vs-tuple-in-written-order"),
        pytest.param("\\{2,1\\}", "(1,2)", False, id="set-vs-tuple-other-order"),
        pytest.param("1, 2", "(1,2)", True, id="list-matches-ambiguous-pair"),
        pytest.param("[0, 1)", "[0, 1)", True, id="same-interval"),
        pytest.param("[0, 1)", "[0, 1]", False, id="interval-openness"),
        pytest.param("x > 2", "(2, \\infty)", True, id="inequality-vs-interval"),
        pytest.param("(2, \\infty)", "x > 2", True, id="interval-vs-inequality-gold"),
        pytest.param("x \\ge 2", "(2, \\infty)", False, id="inequality-closedness"),
        pytest.param("b = 7, a = 4", "a=4,b=7", True, id="assignments-any-order"),
        pytest.param("x = 2, x = 3", "2, 3", True, id="assignment-list-vs-values"),
    ],
)
def test_is_equiv_symbolic(pool, pred, gold, equal):
    assert is_equiv(pred, gold, pool=pool) is equal


def test_fast_path_never_starts_a_worker():
    unstarted = VerifierPool(num_workers=1)
    golds = [str(n) for n in range(200)]
    completions = [f"Work.\n#### {n:,}" for n in range(200)]
    results = score_batch(completions, golds, pool=unstarted)
    assert all(r.status == "correct" for r in results)
    assert unstarted.worker_pids() == []
    assert unstarted.stats().items == 0
    unstarted.close()


def test_identical_pairs_in_a_batch_are_verified_once(pool):
    before = pool.stats().items
    statuses = compare([("\\sqrt{8}", "2\\sqrt{2}")] * 6 + [("\\sqrt{3}", "2")], pool=pool)
    assert statuses == ["correct"] * 6 + ["wrong"]
    assert pool.stats().items - before == 2


@pytest.mark.parametrize(
    "answer, refused",
    [
        pytest.param("9^{9^{9^{9}}}", True, id="power-tower"),
        pytest.param("10^{10^{10}}", True, id="three-level-tower"),
        pytest.param("0^{10^{10^{10}}}", True, id="cheap-base-costly-exponent"),
        pytest.param("2^{100000}", True, id="30103-digit-power"),
        pytest.param("10^{-10^{10}}", True, id="tiny-power-is-as-costly"),
        pytest.param("1000000!", True, id="huge-factorial"),
        pytest.param("(1001)!", True, id="factorial-just-over"),
        pytest.param("__import__('os')", True, id="dunder"),
        pytest.param("1" * 2001, True, id="too-long"),
        pytest.param("2^{2019}", False, id="608-digit-power-allowed"),
        pytest.param("2^{3^{2}}", False, id="small-tower-allowed"),
        pytest.param("1000!", False, id="factorial-limit-allowed"),
        pytest.param("e^{x^{2}}", False, id="symbolic-exponent-allowed"),
        pytest.param("1" * 2000, False, id="length-limit-allowed"),
    ],
)
def test_prescreen(answer, refused):
    assert (prescreen(answer) is not None) is refused


def test_prescreened_answers_never_reach_a_worker():
    unstarted = VerifierPool(num_workers=1)
    start = time.process_time()  # no worker: all in this process, so its CPU time
    results = score_batch(
        ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{1000000!}", "#### " + "9" * 5000],
        ["1", "1", "1"],
        pool=unstarted,
    )
    assert [r.status for r in results] == ["parse_error"] * 3
    assert time.process_time() - start < 0.5
    assert unstarted.worker_pids() == []
    unstarted.close()


def test_max_chars_is_configurable():
    unstarted = VerifierPool(num_workers=1)
    result = score_batch(["#### 123456"], ["123456"], max_chars=5, pool=unstarted)[0]
    assert result.status == "parse_error"
    unstarted.close()


def test_trainer_process_never_imports_sympy():
    script = (
        "import sys, json\n"
        "from grpo_lab.rewards import score_batch, VerifierPool\n"
        "with VerifierPool(1) as pool:\n"
        "    r = score_batch(['\\\\boxed{\\\\sqrt{8}}', '#### 3'], ['2\\\\sqrt{2}', '3'], pool=pool)\n"
        "print(json.dumps([[x.status for x in r], 'sympy' in sys.modules,"
        " 'math_verify' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [["correct", "correct"], False, False]
