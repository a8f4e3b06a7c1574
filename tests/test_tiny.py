"""Tests for grpo_lab.tiny: tokenizer, cached deterministic build, held-out accuracy."""

import json
import pathlib
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lab import tiny
from grpo_lab.data import Problem, make_arith
from grpo_lab.evaluation import evaluate
from grpo_lab.rewards.normalize import parse_number

# Enough supervised steps that greedy completions mostly end with eos, so the decoding
# comparison below exercises eos handling; one build shared by the tests that only read it.
SHARED_STEPS = 100


@pytest.fixture(scope="module")
def shared_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return root, tiny.ensure_tiny_model(root, seed=0, sft_steps=SHARED_STEPS)


def test_tokenizer_roundtrip_and_specials(tmp_path):
    tok = tiny.build_tokenizer()
    ids = tok("12+34=46")["input_ids"]
    assert len(ids) == len("12+34=46")
    assert tok.decode(ids) == "12+34=46"
    assert tok.decode(tok("(3 - 2)*1")["input_ids"]) == "(3 - 2)*1"
    assert tok("<eos>")["input_ids"] == [tok.eos_token_id]
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert len(tok) == 3 + len(tiny.VOCAB_CHARS)

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("12+34=46")["input_ids"] == ids
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert loaded.padding_side == "left"
    batch = loaded(["1+1=", "12+34="], padding=True)
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_model_size():
    model = tiny.build_model(tiny.build_tokenizer())
    assert 100_000 <= model.num_parameters() <= 600_000
    assert model.config.tie_word_embeddings


def test_sft_labels_cover_answer_and_eos_only():
    tok = tiny.build_tokenizer()
    ids, mask, labels = tiny._sft_tensors(
        tok, [Problem("1+2=", "3", "a"), Problem("10+5=", "15", "b")]
    )
    # "1+2=3<eos>" is 6 tokens, "10+5=15<eos>" is 8: the first row is right-padded by 2.
    assert mask.tolist() == [[1] * 6 + [0, 0], [1] * 8]
    eos = tok.eos_token_id
    three, one, five = (tok.convert_tokens_to_ids(c) for c in "315")
    assert labels.tolist() == [
        [-100] * 4 + [three, eos, -100, -100],
        [-100] * 5 + [one, five, eos],
    ]


def test_ensure_builds_loads_and_reuses(shared_build, monkeypatch):
    root, path = shared_build
    assert path == root / f"tiny-arith-{tiny.RECIPE_VERSION}-sft{SHARED_STEPS}-s0"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    info = json.loads((path / "build_info.json").read_text())
    assert info["seed"] == 0 and info["sft_steps"] == SHARED_STEPS
    for key in ("final_sft_loss", "test_greedy_accuracy", "test_sampled_accuracy_t1"):
        assert isinstance(info[key], float)
    # No leftover staging folders.
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [path.name]

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "_build", no_build)
    assert tiny.ensure_tiny_model(root, seed=0, sft_steps=SHARED_STEPS) == path
    with pytest.raises(AssertionError, match="rebuilt"):
        tiny.ensure_tiny_model(root, seed=0, sft_steps=SHARED_STEPS, force=True)
    # A failed forced rebuild leaves the previous build, and no staging folder.
    assert (path / "build_info.json").exists()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [path.name]


def test_force_rebuilds_and_leaves_the_callers_rng_alone(tmp_path):
    rng_before = torch.get_rng_state()
    path = tiny.ensure_tiny_model(tmp_path, seed=1, sft_steps=2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    before = (path / "build_info.json").stat().st_mtime_ns
    time.sleep(0.01)
    assert tiny.ensure_tiny_model(tmp_path, seed=1, sft_steps=2, force=True) == path
    assert (path / "build_info.json").stat().st_mtime_ns > before


def test_same_seed_same_weights(tmp_path):
    a = load_file(tiny.ensure_tiny_model(tmp_path / "a", seed=3, sft_steps=3) / "model.safetensors")
    b = load_file(tiny.ensure_tiny_model(tmp_path / "b", seed=3, sft_steps=3) / "model.safetensors")
    c = load_file(tiny.ensure_tiny_model(tmp_path / "c", seed=4, sft_steps=3) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []

    def fake_build(folder, *, seed, sft_steps):
        calls.append(seed)
        time.sleep(0.2)  # long enough that the other caller arrives while this one builds
        (folder / "build_info.json").write_text("{}")

    monkeypatch.setattr(tiny, "_build", fake_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.ensure_tiny_model(tmp_path, seed=7)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [7]
    assert len(set(results)) == 1 and (results[0] / "build_info.json").exists()


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_LAB_CACHE", str(tmp_path))
    assert tiny.default_cache_dir() == tmp_path
    monkeypatch.delenv("GRPO_LAB_CACHE")
    assert tiny.default_cache_dir() == pathlib.Path.home() / ".cache" / "grpo_lab"


def _greedy_one_by_one(model, tok, question: str, max_new_tokens: int) -> str:
    """Plain greedy decoding of one unpadded prompt: argmax of the full forward pass each step."""
    ids = tok(question, return_tensors="pt")["input_ids"]  # [1, T]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=ids).logits[0, -1].argmax())
            if next_id == tok.eos_token_id:
                break
            new.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return tok.decode(new, skip_special_tokens=True)


def test_evaluation_scores_left_padded_batches_like_unbatched_decoding(shared_build):
    """The build's held-out accuracy goes through grpo_lab.evaluation: its greedy completions in
    left-padded batches are those of plain one-prompt decoding."""
    _, path = shared_build
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # Mixed question lengths, so batches are left-padded.
    questions = [p.question for p in make_arith(24, seed=0, split="test", max_value=120)]
    assert len({len(q) for q in questions}) > 1
    golds = [_greedy_one_by_one(model, tok, q, tiny.MAX_NEW_TOKENS) for q in questions]
    # The reward scores answers that read as numbers; keep the problems whose decoding does.
    right = [
        Problem(q, g, str(i))
        for i, (q, g) in enumerate(zip(questions, golds))
        if parse_number(g, allow_units=False) is not None
    ]
    assert len(right) >= 12 and len({len(p.question) for p in right}) > 1

    def greedy(problems):
        return evaluate(model, tok, problems, max_new_tokens=tiny.MAX_NEW_TOKENS, batch_size=8)[
            "eval/greedy_acc"
        ]

    assert greedy(right) == 1.0
    # Corrupt the gold of a quarter of the problems: exactly those count as wrong.
    mixed = [
        Problem(p.question, p.answer + "0", p.id) if i % 4 == 0 else p for i, p in enumerate(right)
    ]
    assert greedy(mixed) == 1 - len(right[::4]) / len(right)


def test_heldout_accuracy_is_the_evaluation_of_the_first_test_problems(shared_build):
    _, path = shared_build
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    got = tiny.heldout_accuracy(model, tok, seed=0)
    assert got["eval_problems"] == tiny.EVAL_PROBLEMS
    test = make_arith(tiny.EVAL_PROBLEMS, seed=0, split="test")
    greedy = evaluate(model, tok, test, max_new_tokens=tiny.MAX_NEW_TOKENS)
    assert got["test_greedy_accuracy"] == greedy["eval/greedy_acc"]
    assert 0.0 <= got["test_sampled_accuracy_t1"] <= 1.0
    assert tiny.heldout_accuracy(model, tok, seed=0) == got  # seeded sampling


@pytest.mark.slow
def test_default_build_lands_in_the_rl_band(tmp_path):
    path = tiny.ensure_tiny_model(tmp_path)
    info = json.loads((path / "build_info.json").read_text())
    assert info["sft_steps"] == tiny.DEFAULT_SFT_STEPS
    assert 0.10 <= info["test_greedy_accuracy"] <= 0.50
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    # The saved model reproduces the recorded accuracy; one thread as in the build, so no argmax
    # can flip on a different float reduction order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = tiny.heldout_accuracy(model, tok, seed=info["seed"])
        assert got["test_greedy_accuracy"] == info["test_greedy_accuracy"]
        assert got["test_sampled_accuracy_t1"] == info["test_sampled_accuracy_t1"]
    finally:
        torch.set_num_threads(threads)
