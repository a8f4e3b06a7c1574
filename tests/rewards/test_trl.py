"""The TRL adapter, called exactly as TRL 1.16's GRPOTrainer._calculate_rewards calls it."""

import importlib.util
import pickle
import re
from pathlib import Path

import pytest

from grpo_lab.rewards import make_trl_reward, trl_math_reward, trl_reward_func
from grpo_lab.rewards.trl import completion_text


class _Recorder:
    """Stands in for the trainer's log_metric / log_extra hooks."""

    def __init__(self):
        self.metrics = {}
        self.extra = {}

    def log_metric(self, name, value):
        self.metrics[name] = value

    def log_extra(self, column, values):
        self.extra[column] = values


def _call_like_trl(reward_func, prompts, completions, columns, recorder):
    # Mirrors GRPOTrainer._calculate_rewards: dataset columns other than prompt/completion become
    # keyword lists, plus trainer_state, log_extra and log_metric.
    reward_kwargs = dict(columns)
    reward_kwargs["trainer_state"] = object()
    reward_kwargs["log_extra"] = recorder.log_extra
    reward_kwargs["log_metric"] = recorder.log_metric
    completion_ids = [[1, 2, 3] for _ in completions]
    return reward_func(
        prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs
    )


def test_plain_text_completions():
    recorder = _Recorder()
    rewards = _call_like_trl(
        trl_math_reward,
        prompts=["q1", "q1", "q2", "q2"],
        completions=["#### 72", "#### 71", "no idea", "#### 3\n#### 4"],
        columns={"answer": ["72", "72", "3", "3"], "question": ["q1", "q1", "q2", "q2"]},
        recorder=recorder,
    )
    assert rewards == [1.0, 0.0, 0.0, 0.0]
    assert recorder.metrics["reward/math_reward/correct_frac"] == 0.25
    assert recorder.metrics["reward/math_reward/hedged_frac"] == 0.25
    assert recorder.metrics["reward/math_reward/timeout_frac"] == 0.0
    assert recorder.extra["math_reward_status"] == ["correct", "wrong", "no_answer", "hedged"]
    assert recorder.extra["math_reward_extracted"] == ["72", "71", None, "4"]


def test_conversational_completions():
    prompts = [[{"role": "user", "content": "What is 6 * 7?"}]] * 3
    completions = [
        [{"role": "assistant", "content": "<think>6*7</think>The answer is \\boxed{42}."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "#### 42"}]}],
        [{"role": "assistant", "content": None, "tool_calls": []}],
    ]
    rewards = _call_like_trl(
        trl_math_reward, prompts, completions, {"answer": [42, 42, 42]}, _Recorder()
    )
    assert rewards == [1.0, 1.0, 0.0]


def test_custom_column_and_raw_solutions():
    reward = make_trl_reward("solution", name="gsm8k_reward")
    assert reward.__name__ == "gsm8k_reward"
    rewards = _call_like_trl(
        reward,
        prompts=["p", "p"],
        completions=["so #### 18", "so #### 17"],
        columns={"solution": ["9 + 9 = <<9+9=18>>18\n#### 18"] * 2},
        recorder=_Recorder(),
    )
    assert rewards == [1.0, 0.0]


def test_none_gold_skips_the_row():
    recorder = _Recorder()
    rewards = _call_like_trl(
        trl_math_reward, ["p", "p"], ["#### 1", "#### 1"], {"answer": [None, "1"]}, recorder
    )
    assert rewards == [None, 1.0]
    assert recorder.metrics["reward/math_reward/correct_frac"] == 1.0


def test_missing_column_names_the_column():
    with pytest.raises(KeyError, match="'answer'.*columns passed: \\['question'\\]"):
        _call_like_trl(trl_math_reward, ["p"], ["#### 1"], {"question": ["p"]}, _Recorder())


def test_column_length_mismatch():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        _call_like_trl(trl_math_reward, ["p", "p"], ["1", "2"], {"answer": ["1"]}, _Recorder())


def test_works_without_logging_hooks():
    assert trl_math_reward(prompts=["p"], completions=["#### 5"], answer=["5"]) == [1.0]


def test_picklable_and_alias():
    clone = pickle.loads(pickle.dumps(make_trl_reward("solution", timeout_s=3.0)))
    assert (clone.answer_column, clone.timeout_s, clone.__name__) == (
        "solution",
        3.0,
        "math_reward",
    )
    assert trl_reward_func is trl_math_reward


def test_completion_text():
    assert completion_text("plain") == "plain"
    chat = [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "last"}]
    assert completion_text(chat) == "last"
    assert completion_text([{"role": "tool", "content": "x"}]) == ""


def test_installed_trl_uses_this_calling_convention():
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("trl is not installed")
    source = (Path(spec.origin).parent / "trainer" / "grpo_trainer.py").read_text()
    call = re.compile(
        r"reward_func\(\s*prompts=prompts, completions=completions, "
        r"completion_ids=completion_ids_list, \*\*reward_kwargs\s*\)"
    )
    assert call.search(source), "GRPOTrainer no longer calls reward functions as expected"
    for hook in ("trainer_state", "log_extra", "log_metric"):
        assert f'reward_kwargs["{hook}"]' in source
    assert 'key not in ["prompt", "completion", "completion_ids"]' in source
