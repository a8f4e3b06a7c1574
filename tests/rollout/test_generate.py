"""Tests for grpo_lab.rollout's entry points (generate, the registry, build_backend): every
engine (and the shared-prefix one with each sampler) meets one contract, checked against a mock
model with known logits and tiny Qwen2 / GPT-2 models (sampling log-probs = the training
forward's)."""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from grpo_lab.models import PolicyWithValueHead, completion_forward
from grpo_lab.rollout import (
    DEFAULT_BACKEND,
    ROLLOUT_BACKENDS,
    build_backend,
    decode_completions,
    gather_params_for_generation,
    generate,
)
from grpo_lab.rollout.shared_prefix import SharedPrefixBackend
from grpo_lab.rollout.static import StaticCacheBackend
from tests.rollout.mocks import (
    EOS,
    FORCE,
    IDS_TOKENIZER,
    PAD,
    MarkovConfig,
    MarkovLM,
    V,
    chain_model,
    char_tokenizer,
    cycle_model,
    fake_deepspeed,
    markov,
    tiny_gpt2,
    tiny_qwen,
    uniform_model,
)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_uniform_logits_give_minus_log_v(temperature, backend):
    torch.manual_seed(0)
    batch = generate(
        uniform_model(),
        IDS_TOKENIZER,
        [[1, 2], [3]],
        group_size=4,
        max_new_tokens=6,
        temperature=temperature,
        backend=backend,
    )
    mask = batch.completion_mask.bool()
    # softmax(0 / T) is uniform for every T: each sampled token has log-prob -log 8.
    expected = torch.where(mask, -math.log(V), 0.0)
    torch.testing.assert_close(batch.sampling_logp, expected)
    assert batch.sampling_logp.dtype == torch.float32


@pytest.mark.parametrize("truncation", [dict(top_k=2), dict(top_p=0.5)])
def test_logp_is_taken_before_truncation(truncation, backend):
    # Every row of the table is the same: logits 3, 2.5, 2, ... for tokens 0, 1, 2, ...; at
    # T=0.8 consecutive probabilities shrink by e^-0.625 = 0.535, so p0 = 0.47 < 0.5 and
    # p0 + p1 = 0.72: top-k=2 and top-p=0.5 both leave exactly {0, 1}.
    row = 3.0 - 0.5 * torch.arange(V, dtype=torch.float32)
    model = markov(row.expand(V, V))
    torch.manual_seed(0)
    batch = generate(
        model,
        IDS_TOKENIZER,
        [[1]],
        group_size=8,
        max_new_tokens=5,
        temperature=0.8,
        backend=backend,
        **truncation,
    )
    assert batch.completion_ids.unique().tolist() == [0, 1]
    untruncated = torch.log_softmax(row / 0.8, dim=-1)[batch.completion_ids]
    torch.testing.assert_close(batch.sampling_logp, untruncated)


def test_forced_eos_at_step_k(backend):
    prompts = [[1, 2], [4], [6]]  # last tokens 2, 4, 6 -> EOS at steps 5, 3, 1
    batch = generate(
        chain_model(), IDS_TOKENIZER, prompts, group_size=2, max_new_tokens=8, backend=backend
    )
    assert batch.completion_lengths.tolist() == [5, 5, 3, 3, 1, 1]
    assert not batch.truncated.any()
    assert batch.completion_len == 5  # the longest completion; generate stops when all are done
    assert batch.completion_ids[0].tolist() == [3, 4, 5, 6, EOS]
    assert batch.completion_ids[2].tolist() == [5, 6, EOS, PAD, PAD]
    assert batch.completion_mask[2].tolist() == [1, 1, 1, 0, 0]
    # Each token's log-prob is log_softmax(table[previous token]) at that token, read one by one.
    table = chain_model().table.weight
    expected = torch.zeros(6, 5)
    for row in range(6):
        previous = int(batch.prompt_ids[row, -1])
        for t in range(int(batch.completion_lengths[row])):
            token = int(batch.completion_ids[row, t])
            expected[row, t] = torch.log_softmax(table[previous], dim=-1)[token]
            previous = token
    torch.testing.assert_close(batch.sampling_logp, expected)


def test_never_eos_is_truncated_with_full_mask(backend):
    batch = generate(
        cycle_model(), IDS_TOKENIZER, [[1], [2, 3]], group_size=2, max_new_tokens=5, backend=backend
    )
    assert batch.truncated.all()
    assert batch.completion_len == 5
    assert batch.completion_mask.eq(1).all()
    assert batch.completion_ids[0].tolist() == [2, 3, 4, 5, 6]


def test_ignore_eos_generates_full_length(backend):
    torch.manual_seed(0)
    batch = generate(
        chain_model(),
        IDS_TOKENIZER,
        [[5]],
        group_size=3,
        max_new_tokens=6,
        ignore_eos=True,
        backend=backend,
    )
    assert batch.completion_ids.shape == (3, 6)
    assert batch.completion_mask.eq(1).all()
    assert batch.truncated.all()
    assert not (batch.completion_ids == EOS).any()
    # Step 0 follows 5 -> 6 (forced). Step 1 would be EOS, which is suppressed: row [0 x 7, -inf]
    # leaves a uniform choice among the 7 other tokens, log-prob -log 7.
    torch.testing.assert_close(batch.sampling_logp[:, 1], torch.full((3,), -math.log(V - 1)))


def test_left_padding_of_ragged_prompts(backend):
    prompts = [[1, 2, 3], [4], [5, 6]]
    batch = generate(
        chain_model(), IDS_TOKENIZER, prompts, group_size=1, max_new_tokens=2, backend=backend
    )
    assert batch.prompt_ids.tolist() == [[1, 2, 3], [PAD, PAD, 4], [PAD, 5, 6]]
    assert batch.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch.prompt_len == 3
    assert batch.input_ids.shape == (3, 3 + batch.completion_len)
    assert batch.attention_mask.tolist()[1] == [0, 0, 1, *batch.completion_mask[1].tolist()]


def test_group_layout_is_prompt_major(backend):
    torch.manual_seed(0)
    prompts = [[1, 2], [3], [4, 5]]
    g = 3
    batch = generate(
        uniform_model(), IDS_TOKENIZER, prompts, group_size=g, max_new_tokens=4, backend=backend
    )
    assert batch.num_sequences == len(prompts) * g and batch.group_size == g
    for index, prompt in enumerate(prompts):
        rows = batch.prompt_ids[index * g : (index + 1) * g]
        expected = [PAD] * (2 - len(prompt)) + prompt
        assert rows.tolist() == [expected] * g


def test_chunked_batching_matches_one_call(backend):
    prompts = [[1, 2], [4], [6], [3]]
    whole = generate(
        chain_model(), IDS_TOKENIZER, prompts, group_size=2, max_new_tokens=8, backend=backend
    )
    for batch_size in (1, 2, 5):
        chunked = generate(
            chain_model(),
            IDS_TOKENIZER,
            prompts,
            group_size=2,
            max_new_tokens=8,
            batch_size=batch_size,
            backend=backend,
        )
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
        torch.testing.assert_close(chunked.sampling_logp, whole.sampling_logp)
        assert torch.equal(chunked.truncated, whole.truncated)


def test_chunked_sampling_has_same_shapes(backend):
    prompts = [[1, 2, 3], [4], [5, 6]]
    torch.manual_seed(0)
    whole = generate(
        uniform_model(), IDS_TOKENIZER, prompts, group_size=2, max_new_tokens=6, backend=backend
    )
    torch.manual_seed(0)
    chunked = generate(
        uniform_model(),
        IDS_TOKENIZER,
        prompts,
        group_size=2,
        max_new_tokens=6,
        batch_size=2,
        backend=backend,
    )
    assert chunked.prompt_ids.shape == whole.prompt_ids.shape
    assert chunked.num_sequences == whole.num_sequences
    assert torch.equal(chunked.prompt_ids, whole.prompt_ids)


def test_same_seed_same_tokens(backend):
    model, prompts = tiny_qwen(), [[3, 4, 5], [6]]
    kwargs = dict(group_size=3, max_new_tokens=6, eos_token_id=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate(model, IDS_TOKENIZER, prompts, backend=backend, **kwargs))
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    torch.manual_seed(124)
    other = generate(model, IDS_TOKENIZER, prompts, backend=backend, **kwargs)
    assert not torch.equal(other.completion_ids, runs[0].completion_ids)


def test_generator_seeds_sampling_and_leaves_global_rng_alone(backend):
    model, prompts = tiny_qwen(), [[3, 4, 5], [6]]
    kwargs = dict(group_size=3, max_new_tokens=6, eos_token_id=1)
    global_state = torch.get_rng_state()
    first = generate(
        model, None, prompts, generator=torch.Generator().manual_seed(7), backend=backend, **kwargs
    )
    assert torch.equal(torch.get_rng_state(), global_state)
    torch.manual_seed(999)  # a different global state must not matter
    second = generate(
        model, None, prompts, generator=torch.Generator().manual_seed(7), backend=backend, **kwargs
    )
    assert torch.equal(first.completion_ids, second.completion_ids)


def test_greedy_is_deterministic_and_argmax(backend):
    model, prompts = tiny_qwen(), [[3, 4, 5], [6], [7, 8]]
    kwargs = dict(group_size=2, max_new_tokens=6, temperature=0.0, eos_token_id=1)
    torch.manual_seed(0)
    first = generate(model, IDS_TOKENIZER, prompts, backend=backend, **kwargs)
    torch.manual_seed(1)
    second = generate(model, IDS_TOKENIZER, prompts, backend=backend, **kwargs)
    assert torch.equal(first.completion_ids, second.completion_ids)
    # Every token is the argmax of a full forward at the position before it.
    with torch.no_grad():
        positions = (first.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(
            input_ids=first.input_ids, attention_mask=first.attention_mask, position_ids=positions
        ).logits
    p = first.prompt_len
    for row in range(first.num_sequences):
        for t in range(int(first.completion_lengths[row])):
            assert first.completion_ids[row, t] == logits[row, p - 1 + t].argmax()


@pytest.mark.parametrize(
    "sampling", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9, top_k=6)]
)
@pytest.mark.parametrize("make_model", [tiny_qwen, tiny_gpt2])
def test_sampling_logp_matches_completion_forward(make_model, sampling, backend):
    """Generation (KV cache, left padding) and the training forward (positions from the mask,
    logits_to_keep) must agree on every sampled token's log-prob. RoPE (Qwen2) is blind to a
    constant position shift, so GPT-2's absolute positions are what checks the position ids."""
    model = make_model().train()  # rollout switches to eval and back
    torch.manual_seed(0)
    batch = generate(
        model,
        IDS_TOKENIZER,
        [[3, 4, 5, 6, 7], [8], [9, 10, 11]],
        group_size=3,
        max_new_tokens=10,
        eos_token_id=[1, 2],
        batch_size=4,
        **sampling,
        backend=backend,
    )
    assert model.training
    assert batch.completion_mask.eq(0).any(), "want some sequences that stopped early"
    model.eval()
    with torch.no_grad():
        out = completion_forward(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.completion_len,
            temperature=sampling["temperature"],
        )
    torch.testing.assert_close(out.logp * batch.completion_mask, batch.sampling_logp)


def test_policy_with_value_head_generates_from_its_lm(backend):
    lm = tiny_qwen()
    policy = PolicyWithValueHead(lm)
    kwargs = dict(group_size=2, max_new_tokens=5, eos_token_id=1)
    torch.manual_seed(0)
    plain = generate(lm, IDS_TOKENIZER, [[3, 4]], backend=backend, **kwargs)
    torch.manual_seed(0)
    wrapped = generate(policy, IDS_TOKENIZER, [[3, 4]], backend=backend, **kwargs)
    assert torch.equal(plain.completion_ids, wrapped.completion_ids)


def test_model_generation_config_does_not_leak_in(backend):
    model = uniform_model()
    # transformers would otherwise fill unset knobs from here: top_k=1 makes sampling constant.
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0
    torch.manual_seed(0)
    batch = generate(model, IDS_TOKENIZER, [[1]], group_size=4, max_new_tokens=6, backend=backend)
    mask = batch.completion_mask.bool()
    assert len(batch.completion_ids[mask].unique()) > 1
    torch.testing.assert_close(batch.sampling_logp, torch.where(mask, -math.log(V), 0.0))


def test_string_prompts_and_decode_completions(backend):
    tokenizer = char_tokenizer()  # a..h -> 2..9; EOS = 1
    table = torch.zeros(10, 10)
    table[2, 3] = table[3, 4] = table[4, 1] = table[6, 1] = FORCE  # a->b->c->EOS, e->EOS
    model = MarkovLM(MarkovConfig(vocab_size=10))
    with torch.no_grad():
        model.table.weight.copy_(table)
    batch = generate(
        model, tokenizer, ["ga", "hhe"], group_size=1, max_new_tokens=4, backend=backend
    )
    assert batch.prompt_ids.tolist() == [[0, 8, 2], [9, 9, 6]]
    assert decode_completions(tokenizer, batch) == ["bc", ""]


def test_gather_params_is_a_noop_without_zero3(monkeypatch):
    with fake_deepspeed(monkeypatch) as calls:
        with gather_params_for_generation(chain_model()):
            pass
    assert calls == []


def test_zero3_params_are_gathered_once_per_rollout(monkeypatch, backend):
    model = chain_model()
    for param in model.parameters():
        param.ds_id, param.ds_status = 0, "NOT_AVAILABLE"
    with fake_deepspeed(monkeypatch) as calls:
        generate(
            model,
            IDS_TOKENIZER,
            [[1], [4], [6]],
            group_size=2,
            max_new_tokens=8,
            batch_size=2,
            backend=backend,
        )
    assert len(calls) == 1
    assert calls[0] == list(model.parameters())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(group_size=0), "group_size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(batch_size=0), "batch_size"),
        (dict(prompts=[[1], []]), "prompts"),
        (dict(prompts=["a", [1]]), "prompts"),
        (dict(prompts=["a"]), "tokenizer"),
        (dict(tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=None)), "eos_token_id"),
    ],
)
def test_bad_input_raises_naming_the_field(kwargs, field, backend):
    args = dict(prompts=[[1]], tokenizer=IDS_TOKENIZER, group_size=2, max_new_tokens=3)
    if field == "tokenizer":
        args["tokenizer"] = None
    args.update(kwargs)
    with pytest.raises(ValueError, match=field):
        generate(
            uniform_model(), args.pop("tokenizer"), args.pop("prompts"), backend=backend, **args
        )


def test_backend_object_and_unknown_name():
    fast = SharedPrefixBackend()
    args = (chain_model(), IDS_TOKENIZER, [[4]])
    batch = generate(*args, group_size=2, max_new_tokens=8, backend=fast)
    assert batch.completion_ids[0].tolist() == [5, 6, EOS]
    with pytest.raises(
        ValueError,
        match=r"backend: 'vllm' is not one of \['compiled', 'hf', 'shared_prefix', 'static'\]",
    ):
        generate(*args, group_size=2, max_new_tokens=8, backend="vllm")


def test_build_backend_keeps_the_kind_and_swaps_the_sampler():
    assert build_backend("shared_prefix") is ROLLOUT_BACKENDS["shared_prefix"]
    icdf = build_backend("shared_prefix", sampler="inverse_cdf")
    assert type(icdf) is SharedPrefixBackend and icdf.sampler == "inverse_cdf"
    compiled = build_backend("compiled", sampler="inverse_cdf")
    assert isinstance(compiled, StaticCacheBackend)
    assert compiled.compile and compiled.sampler == "inverse_cdf"
    with pytest.raises(ValueError, match="sampler: 'inverse_cdf' needs one of grpo_lab's own"):
        build_backend("hf", sampler="inverse_cdf")
    with pytest.raises(ValueError, match=r"sampler: 'gumbel' is not one of"):
        build_backend("static", sampler="gumbel")


def test_default_engine_is_the_configs():
    """generate() with no engine samples as a training run with the default config does, and
    every registered engine is a valid ``rollout.backend``."""
    from grpo_lab.config import load_config

    default = inspect.signature(generate).parameters["backend"].default
    assert default == DEFAULT_BACKEND == load_config(None, []).rollout.backend == "shared_prefix"
    for name in ROLLOUT_BACKENDS:
        assert load_config(None, [f"rollout.backend={name}"]).rollout.backend == name
