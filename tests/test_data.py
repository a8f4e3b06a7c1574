"""Tests for grpo_lab.data: arithmetic generation and splits, file loaders, prompts, sampler."""

import json
import os
import pathlib

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from grpo_lab.data import (
    DATASETS,
    PROMPT_TEMPLATES,
    Problem,
    PromptSampler,
    arith_split_of,
    last_boxed,
    load_gsm8k,
    load_math_jsonl,
    load_problems,
    make_arith,
    render_prompt,
)

SHARED_DATA = pathlib.Path(
    os.environ.get(
        "GRPO_LAB_SHARED_DATA",
        pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data",
    )
)
GSM8K_TRAIN = SHARED_DATA / "gsm8k_train.jsonl"


def _write_jsonl(path: pathlib.Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# --- arithmetic -------------------------------------------------------------------------------


def test_arith_is_deterministic_per_seed():
    a = make_arith(300, seed=3)
    assert a == make_arith(300, seed=3)
    assert a != make_arith(300, seed=4)


def test_arith_default_format():
    problems = make_arith(50, seed=0)
    for p in problems:
        left, right = p.question[:-1].split("+")
        assert p.question.endswith("=") and p.question == f"{int(left)}+{int(right)}="
        assert 0 <= int(left) <= 99 and 0 <= int(right) <= 99
        assert p.answer == str(int(left) + int(right))
        assert p.id == f"arith:{p.question}"


def test_arith_splits_are_disjoint_whatever_the_seed():
    # The default space has 100*100 = 10000 problems; the test split is about 1/16 of it (~625),
    # so 512 test problems per seed over several seeds covers most of it.
    test = {p.question for s in range(4) for p in make_arith(512, seed=s, split="test")}
    train = {p.question for s in range(4) for p in make_arith(20_000, seed=s, split="train")}
    assert not test & train
    assert len(train) + len(test) <= 10_000
    assert all(arith_split_of(q) == "test" for q in test)


def test_arith_test_split_is_five_to_ten_percent():
    counts = {"train": 0, "test": 0}
    for a in range(100):
        for b in range(100):
            counts[arith_split_of(f"{a}+{b}=")] += 1
    assert 500 <= counts["test"] <= 1000


def test_arith_distinct_until_the_split_is_exhausted():
    # 0..9 with "+" has 100 problems; the test split is a handful of them, and 1000 draws cycle
    # through it many times.
    size = len({p.question for p in make_arith(1000, seed=0, split="test", max_value=9)})
    first = make_arith(size, seed=1, split="test", max_value=9)
    assert len({p.question for p in first}) == size
    twice = make_arith(2 * size, seed=1, split="test", max_value=9)
    assert sorted(p.question for p in twice[:size]) == sorted(p.question for p in twice[size:])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_value": 9},
        {"max_value": 999, "num_operands": 3, "ops": ("+", "-", "*")},
        {"max_value": 20, "num_operands": 4, "ops": ("-", "*")},
        {"max_value": 50, "ops": ("*",)},
    ],
)
def test_arith_knobs_and_answers(kwargs):
    ops = kwargs.get("ops", ("+",))
    n_ops = kwargs.get("num_operands", 2)
    problems = make_arith(200, seed=0, **kwargs)
    assert len(problems) == 200
    for p in problems:
        expr = p.question[:-1]
        operands = [int(x) for x in expr.replace("-", "+").replace("*", "+").split("+")]
        assert len(operands) == n_ops
        assert all(0 <= x <= kwargs["max_value"] for x in operands)
        assert {c for c in expr if not c.isdigit()} <= set(ops)
        # Independent check: Python's own evaluation of the same expression.
        assert p.answer == str(eval(expr))
        if "-" not in ops:
            assert int(p.answer) >= 0
    if "-" in ops:
        assert any(p.answer.startswith("-") for p in problems)


def test_arith_rejects_bad_knobs():
    with pytest.raises(ValueError, match="ops"):
        make_arith(5, seed=0, ops=("/",))
    with pytest.raises(ValueError, match="num_operands"):
        make_arith(5, seed=0, num_operands=1)
    with pytest.raises(ValueError, match="split"):
        make_arith(5, seed=0, split="validation")


# --- GSM8K ------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not GSM8K_TRAIN.exists(),
    reason=f"no local GSM8K file at {GSM8K_TRAIN} (set GRPO_LAB_SHARED_DATA)",
)
def test_gsm8k_local_file():
    problems = load_gsm8k(str(GSM8K_TRAIN))
    assert len(problems) == sum(1 for line in GSM8K_TRAIN.open() if line.strip())
    first = json.loads(GSM8K_TRAIN.open().readline())
    assert problems[0].question == first["question"]
    assert problems[0].answer == first["answer"].split("####")[-1].strip()
    assert problems[0].id == "gsm8k/train/0"
    assert all(p.answer.lstrip("-").replace(".", "").isdigit() for p in problems)
    assert len(load_problems("gsm8k", split="train", path=str(GSM8K_TRAIN), limit=7)) == 7


def test_gsm8k_gold_drops_thousands_separators(tmp_path):
    path = _write_jsonl(
        tmp_path / "g.jsonl",
        [
            {"question": "q1", "answer": "12*90=<<12*90=1080>>1080\n#### 1,080"},
            "",
            {"question": "q2", "answer": "so #### -3"},
        ],
    )
    assert [(p.question, p.answer) for p in load_gsm8k(path)] == [("q1", "1080"), ("q2", "-3")]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"question": "q"}, "answer"),
        ({"answer": "#### 1"}, "question"),
        ({"question": "q", "answer": "no final line"}, "####"),
    ],
)
def test_gsm8k_bad_row_names_file_row_and_field(tmp_path, bad, field):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, "", bad])
    with pytest.raises(ValueError) as err:
        load_gsm8k(path)
    message = str(err.value)
    assert path in message and "row 3" in message and field in message


def test_gsm8k_invalid_json_names_row(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ['{"question": "q", "answer": "#### 1"}', "{oops"])
    with pytest.raises(ValueError, match="row 2"):
        load_gsm8k(path)


# --- MATH -------------------------------------------------------------------------------------


def test_last_boxed_matches_braces():
    assert last_boxed(r"so \boxed{1} and finally \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{x^{2}+1} done") == "x^{2}+1"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{\frac{1}{2}") is None


def test_math_jsonl_answer_and_boxed_fallback(tmp_path):
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"problem": "p1", "answer": "7", "unique_id": "algebra/1"},
            {"problem": "p2", "solution": r"We get \boxed{3} then \boxed{\dfrac{3}{4}}."},
            {"problem": "p3", "answer": 12},
        ],
    )
    problems = load_math_jsonl(path)
    assert problems == [
        Problem("p1", "7", "algebra/1"),
        Problem("p2", r"\dfrac{3}{4}", "math/1"),
        Problem("p3", "12", "math/2"),
    ]
    assert load_problems("math", split="test", path=path, limit=2) == problems[:2]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"answer": "1"}, "problem"),
        ({"problem": "p"}, "answer"),
        ({"problem": "p", "solution": "no box here"}, "boxed"),
    ],
)
def test_math_bad_row_names_file_row_and_field(tmp_path, bad, field):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "1"}, bad])
    with pytest.raises(ValueError) as err:
        load_math_jsonl(path)
    message = str(err.value)
    assert path in message and "row 2" in message and field in message


# --- registry ---------------------------------------------------------------------------------


def test_registry_names_and_unknown_name():
    assert {"arith", "gsm8k", "math"} <= set(DATASETS)
    with pytest.raises(ValueError, match="arith.*gsm8k.*math"):
        load_problems("mnist", split="train")


def test_load_problems_arith_defaults_and_kwargs():
    assert len(load_problems("arith", split="test")) == 512
    problems = load_problems("arith", split="train", limit=10, seed=2, max_value=9)
    assert problems == make_arith(10, seed=2, split="train", max_value=9)


def test_math_without_path_is_a_clear_error():
    with pytest.raises(ValueError, match="path"):
        load_problems("math", split="test")


# --- prompts ----------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def test_templates_put_the_question_in():
    assert {"plain", "gsm8k", "boxed"} <= set(PROMPT_TEMPLATES)
    assert render_prompt("12+34=", template="plain") == "12+34="
    gsm = render_prompt("How many {apples}?", template="gsm8k")
    assert gsm.startswith("How many {apples}?\n") and "####" in gsm
    assert "\\boxed{}" in render_prompt("q", template="boxed")


def test_unknown_template_lists_valid_ones():
    with pytest.raises(ValueError, match="boxed.*gsm8k.*plain"):
        render_prompt("q", template="fancy")


def test_chat_template_wraps_user_message():
    tok = _tokenizer(CHAT_TEMPLATE)
    plain = render_prompt("1+1=", template="plain", tokenizer=tok, use_chat_template=True)
    assert plain == "<user>1+1=</user><assistant>"
    with_system = render_prompt(
        "1+1=", template="plain", tokenizer=tok, use_chat_template=True, system_prompt="Be brief."
    )
    assert with_system == "<system>Be brief.</system><user>1+1=</user><assistant>"
    # Without use_chat_template the tokenizer's template is not applied.
    assert render_prompt("1+1=", template="plain", tokenizer=tok) == "1+1="


def test_chat_template_missing_is_a_clear_error():
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("q", template="plain", tokenizer=_tokenizer(None), use_chat_template=True)
    with pytest.raises(ValueError, match="system_prompt"):
        render_prompt("q", template="plain", system_prompt="x")


# --- sampler ----------------------------------------------------------------------------------


def _problems(n: int) -> list[Problem]:
    return [Problem(f"{i}+0=", str(i), f"p{i}") for i in range(n)]


def test_sampler_epochs_are_permutations():
    problems = _problems(12)
    sampler = PromptSampler(problems, batch_size=4, seed=0)
    epoch0 = [p for _ in range(3) for p in sampler.next_batch()]
    epoch1 = [p for _ in range(3) for p in sampler.next_batch()]
    assert sorted(epoch0, key=lambda p: p.id) == sorted(problems, key=lambda p: p.id)
    assert sorted(epoch1, key=lambda p: p.id) == sorted(problems, key=lambda p: p.id)
    assert epoch0 != epoch1


def test_sampler_is_deterministic_and_seeded():
    problems = _problems(10)

    def draws(seed):
        sampler = PromptSampler(problems, batch_size=3, seed=seed)
        return [sampler.next_batch() for _ in range(8)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_sampler_batch_crossing_an_epoch_keeps_every_problem():
    # 10 problems in batches of 4: the third batch takes 2 from epoch 0 and 2 from epoch 1.
    sampler = PromptSampler(_problems(10), batch_size=4, seed=0)
    drawn = [p for _ in range(5) for p in sampler.next_batch()]
    assert len(drawn) == 20
    assert sorted(p.id for p in drawn[:10]) == sorted(p.id for p in _problems(10))
    assert sorted(p.id for p in drawn[10:]) == sorted(p.id for p in _problems(10))


@pytest.mark.parametrize("k", [0, 2, 3, 7])
def test_sampler_resume_matches_uninterrupted_run(k):
    problems = _problems(10)
    straight = PromptSampler(problems, batch_size=3, seed=5)
    expected = [straight.next_batch() for _ in range(k + 6)]

    first = PromptSampler(problems, batch_size=3, seed=5)
    for _ in range(k):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = PromptSampler(problems, batch_size=3, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(6)] == expected[k:]


def test_sampler_errors():
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], batch_size=2, seed=0)
    sampler = PromptSampler(_problems(4), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="num_problems"):
        sampler.load_state_dict(PromptSampler(_problems(5), batch_size=2, seed=0).state_dict())


# --- validation at load -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "gold, numeric, reason",
    [
        ("72", True, None),
        ("1,080", True, None),
        ("\\frac{", True, "not a number"),
        ("x+1", True, "not a number"),
        ("\\frac{1}{2}", False, None),
        ("\\sqrt{8}", False, None),
        ("\\frac{", False, "unbalanced braces"),
        ("}{", False, "unbalanced braces"),
        ("", False, "empty"),
        ("   ", False, "empty"),
        ("9^{9^{9^{9}}}", False, "power with too many digits"),
    ],
)
def test_unscorable_gold_uses_the_reward_readers(gold, numeric, reason):
    from grpo_lab.data import unscorable_gold

    why = unscorable_gold(gold, numeric=numeric)
    assert (why is None) if reason is None else (reason in why)


def test_fit_prompts_refuses_or_drops_long_prompts(tmp_path):
    from grpo_lab.config import ConfigError, DataConfig
    from grpo_lab.data import fit_prompts
    from grpo_lab.errors import DataError
    from grpo_lab.tiny import build_tokenizer

    tok = build_tokenizer()  # one token per character, no special tokens added
    problems = [
        Problem("1+1=", "2", "a", where="f.jsonl: row 1"),
        Problem("1" * 30 + "=", "1", "b"),
    ]
    fit = dict(tokenizer=tok, context=20, max_new_tokens=6, what="training")
    # budget 20 - 6 = 14 tokens: "1+1=" fits, the 31-character question does not
    with pytest.raises(DataError, match=r"1 training prompt\(s\) do not fit .* b: 31 tokens"):
        fit_prompts(problems, data=DataConfig(), **fit)
    kept = fit_prompts(problems, data=DataConfig(max_prompt_tokens=10), **fit)
    assert [p.id for p in kept] == ["a"]
    with pytest.raises(ConfigError, match="data.max_prompt_tokens=15"):
        fit_prompts(problems, data=DataConfig(max_prompt_tokens=15), **fit)
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=20"):
        fit_prompts(problems, data=DataConfig(), **{**fit, "max_new_tokens": 20})
