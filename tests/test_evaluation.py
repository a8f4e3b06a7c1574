"""Held-out accuracy: majority vote by hand, and evaluate() against a per-problem loop."""

import pytest
import torch

from grpo_lab.data import make_arith
from grpo_lab.evaluation import evaluate, majority_vote
from grpo_lab.rewards import math_reward
from grpo_lab.rollout import decode_completions, generate


@pytest.mark.parametrize(
    "extracted, scores, expected",
    [
        # "7" twice beats "8" once; the first "7" is right -> 1.0
        (["7", "8", "7"], [1.0, 0.0, 1.0], 1.0),
        # "1,000" and "1000" are one vote key; they outvote the right "999" -> 0.0
        (["1,000", "999", "1000"], [0.0, 1.0, 0.0], 0.0),
        # a tie goes to the answer seen first ("5", wrong)
        (["5", "6"], [0.0, 1.0], 0.0),
        # samples without an answer do not vote; "3" wins alone
        ([None, None, "3"], [0.0, 0.0, 1.0], 1.0),
        ([None, None], [0.0, 0.0], 0.0),
    ],
)
def test_majority_vote(extracted, scores, expected):
    assert majority_vote(extracted, scores) == expected


def test_greedy_accuracy_matches_a_per_problem_loop():
    """The embedded model (about a third right greedily) scored in batches of 5 with ragged
    prompts equals scoring each problem alone."""
    from grpo_lab.models import load_causal_lm, load_tokenizer
    from grpo_lab.tiny import ensure_tiny_model

    path = str(ensure_tiny_model())
    tok, model = load_tokenizer(path), load_causal_lm(path)
    problems = make_arith(24, seed=0, split="test", num_operands=2) + make_arith(
        6, seed=0, split="test", max_value=9
    )
    expected = []
    for p in problems:
        one = generate(model, tok, [p.question], group_size=1, max_new_tokens=6, temperature=0.0)
        expected.append(math_reward(decode_completions(tok, one)[0], p.answer))
    assert 0 < sum(expected) < len(problems)  # a mix of right and wrong answers
    torch.manual_seed(0)
    result = evaluate(model, tok, problems, max_new_tokens=6, k=4, batch_size=5)
    assert result["eval/greedy_acc"] == sum(expected) / len(problems)
    assert result["eval/n"] == len(problems)
    assert 0.0 < result["eval/pass@1"] <= result["eval/pass@4"] <= 1.0
    assert result["eval/maj@4"] <= result["eval/pass@4"]
