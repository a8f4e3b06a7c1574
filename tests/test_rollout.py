"""Tests for grpo_lab.rollout. Every backend (and the shared-prefix one with each sampler)
meets one contract, checked against a mock model with known logits and tiny Qwen2 / GPT-2
models (sampling log-probs = the training forward's); the shared-prefix backend is also
compared with transformers ``generate`` token for token."""

import math
import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_lm
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from torch import nn
from transformers import (
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import CausalLMOutput

from grpo_lab import rollout
from grpo_lab.models import PolicyWithValueHead, completion_forward
from grpo_lab.rollout import RolloutBatch, completion_masks, decode_completions, generate

V = 8  # mock vocabulary: 0 = pad, 7 = EOS
PAD, EOS = 0, 7
FORCE = 100.0  # a logit this far above the rest takes probability 1 - 7e^-100 == 1 in float32


class MarkovConfig(PretrainedConfig):
    model_type = "markov-test"

    def __init__(self, vocab_size: int = V, **kwargs):
        self.vocab_size = vocab_size
        self.num_hidden_layers = 1  # read by the KV cache that generate builds
        super().__init__(**kwargs)


class MarkovLM(PreTrainedModel, GenerationMixin):
    """Logits at each position are row ``table[token]`` of a fixed [V, V] table, so every
    distribution is known exactly. It depends only on the last token, so the (unused) KV cache
    and the left padding cannot change it."""

    config_class = MarkovConfig

    def __init__(self, config: MarkovConfig):
        super().__init__(config)
        self.table = nn.Embedding(config.vocab_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return CausalLMOutput(logits=self.table(input_ids))


def markov(table: torch.Tensor) -> MarkovLM:
    model = MarkovLM(MarkovConfig())
    with torch.no_grad():
        model.table.weight.copy_(table)
    return model


def uniform_model() -> MarkovLM:
    return markov(torch.zeros(V, V))


def chain_model() -> MarkovLM:
    """Token i is followed by i+1 with certainty, so a prompt ending in x emits x+1, ..., 7
    and stops at EOS after 7 - x tokens."""
    table = torch.zeros(V, V)
    for i in range(V - 1):
        table[i, i + 1] = FORCE
    return markov(table)


def cycle_model() -> MarkovLM:
    """Token i is followed by (i mod 6) + 1 in 1..6: never EOS, never pad."""
    table = torch.zeros(V, V)
    for i in range(V):
        table[i, i % 6 + 1] = FORCE
    return markov(table)


IDS_TOKENIZER = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)


@pytest.fixture(
    params=[
        "hf",
        "shared_prefix",
        pytest.param(
            rollout.SharedPrefixBackend(sampler="inverse_cdf"), id="shared_prefix-inverse_cdf"
        ),
        "static",
        pytest.param(rollout.StaticCacheBackend(capacity_multiple=1), id="static-exact"),
    ]
)
def backend(request):
    """Behavioural tests run against every backend: they all promise the same contract."""
    return request.param


def tiny_qwen(seed: int = 0, initializer_range: float = 0.02) -> PreTrainedModel:
    return tiny_lm("qwen2", seed=seed, initializer_range=initializer_range)


def tiny_gpt2(seed: int = 0, initializer_range: float = 0.02) -> PreTrainedModel:
    return tiny_lm("gpt2", seed=seed, initializer_range=initializer_range)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """pad=0, eos=1, then one id per character."""
    chars = "abcdefgh"
    vocab = {"<pad>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    raw = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>")


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


def test_decode_keeps_truncated_tail():
    tokenizer = char_tokenizer()
    batch = RolloutBatch(
        prompt_ids=torch.tensor([[2], [2]]),
        prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=torch.tensor([[3, 4, 5], [3, 1, 0]]),
        completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        sampling_logp=torch.zeros(2, 3),
        truncated=torch.tensor([True, False]),
        group_size=2,
    )
    assert decode_completions(tokenizer, batch) == ["bcd", "b"]


def test_completion_masks_match_a_loop():
    ids = torch.tensor([[3, 7, 4, 7], [7, 2, 2, 2], [1, 2, 3, 4], [5, 6, 5, 9]])
    eos = [7, 9]
    out_ids, mask, truncated = completion_masks(ids, eos, pad_id=0)
    for row in range(ids.shape[0]):
        seen = False
        for t in range(ids.shape[1]):
            assert mask[row, t] == int(not seen)
            assert out_ids[row, t] == (0 if seen else ids[row, t])
            seen = seen or int(ids[row, t]) in eos
        assert bool(truncated[row]) == (not seen)


def test_select_and_to():
    batch = generate(chain_model(), IDS_TOKENIZER, [[1], [4], [6]], group_size=2, max_new_tokens=8)
    sub = batch.select(slice(2, 4))
    assert sub.group_size == 2 and sub.num_sequences == 2
    assert torch.equal(sub.completion_ids, batch.completion_ids[2:4])
    picked = batch.select(torch.tensor([5, 0]))
    assert torch.equal(picked.prompt_ids, batch.prompt_ids[[5, 0]])
    assert torch.equal(picked.truncated, batch.truncated[[5, 0]])
    moved = batch.to("cpu")
    assert torch.equal(moved.sampling_logp, batch.sampling_logp)


@contextmanager
def fake_deepspeed(monkeypatch):
    """A stand-in ``deepspeed`` module recording each GatheredParameters call."""
    calls = []

    @contextmanager
    def gathered(params, *args, **kwargs):
        calls.append(list(params))
        yield

    module = types.ModuleType("deepspeed")
    module.zero = SimpleNamespace(GatheredParameters=gathered)
    status = types.ModuleType("deepspeed.runtime.zero.partition_parameters")
    status.ZeroParamStatus = SimpleNamespace(AVAILABLE="AVAILABLE")
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    for name in ("deepspeed.runtime", "deepspeed.runtime.zero"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, status.__name__, status)
    yield calls


def test_gather_params_is_a_noop_without_zero3(monkeypatch):
    with fake_deepspeed(monkeypatch) as calls:
        with rollout.gather_params_for_generation(chain_model()):
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


# ---------------------------------------------------------------------------------------------
# The shared-prefix backend against the generate backend
# ---------------------------------------------------------------------------------------------


def both_backends(
    model, prompts, fast="shared_prefix", **kwargs
) -> tuple[RolloutBatch, RolloutBatch]:
    """(hf, fast) rollouts of the same call, each from global seed 0."""
    out = []
    for name in ("hf", fast):
        torch.manual_seed(0)
        out.append(generate(model, IDS_TOKENIZER, prompts, backend=name, **kwargs))
    return out[0], out[1]


def assert_same_rollout(a: RolloutBatch, b: RolloutBatch) -> None:
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.group_size == b.group_size
    torch.testing.assert_close(a.sampling_logp, b.sampling_logp)


# Greedy continuations of RAGGED_PROMPTS under the lively (initializer_range=0.5) tiny models,
# read from an ignore_eos run: Qwen2 emits 2 at steps 3, 3 and 2 of prompts 1-3 and never for
# prompt 0; GPT-2 emits 17 at steps 2 and 3 of prompts 0 and 2 only. With these EOS ids some
# rows stop mid-way and others run to max_new_tokens.
RAGGED_PROMPTS = [[3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13]]
LIVELY = {"qwen2": (tiny_qwen, 2), "gpt2": (tiny_gpt2, 17)}


@pytest.mark.parametrize("fast", ["shared_prefix", "static"])
@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("batch_size", [None, 6])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_greedy_fast_engines_match_generate(arch, batch_size, ignore_eos, fast):
    make_model, eos = LIVELY[arch]
    hf, fast = both_backends(
        make_model(initializer_range=0.5),
        RAGGED_PROMPTS,
        fast,
        group_size=3,
        max_new_tokens=10,
        temperature=0.0,
        eos_token_id=eos,
        ignore_eos=ignore_eos,
        batch_size=batch_size,  # 6 sequences = 2 prompts per chunk: chunks of whole groups
    )
    assert_same_rollout(hf, fast)
    if ignore_eos:
        assert fast.completion_len == 10 and not (fast.completion_ids == eos).any()
    else:
        assert fast.truncated.any() and not fast.truncated.all()
        assert fast.completion_lengths.min() < 10


@pytest.mark.parametrize("fast", ["shared_prefix", "static"])
@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_backends_sample_identical_tokens_on_exact_logits(batch_size, ignore_eos, fast):
    """A Markov model's logits are a table lookup, bitwise equal in both backends, and both
    consume the RNG in the same order (one multinomial draw over all rows per step), so the
    same seed must give the same tokens: this pins the warper order temperature -> top-k ->
    top-p, the EOS ban of ignore_eos, pad feeding after EOS and the early stop."""
    torch.manual_seed(3)
    table = torch.randn(V, V)
    table[:, EOS] = 0.0  # with seed 3: 6 of 16 rows truncated, the others stop at steps 1-11
    hf, fast = both_backends(
        markov(table),
        [[1, 2, 3], [4], [5, 6], [2]],
        fast,
        group_size=4,
        max_new_tokens=12,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        ignore_eos=ignore_eos,
        batch_size=batch_size,
    )
    assert_same_rollout(hf, fast)
    if not ignore_eos:
        assert fast.truncated.any() and not fast.truncated.all()


@pytest.mark.parametrize("top_k", [None, 1, 3, 8, 20])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
def test_truncate_logits_matches_transformers_warpers(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(64, 12)
    scores[:8, :4] = 1.5  # ties, at and around the k-th score
    expected = scores
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = rollout.truncate_logits(scores, top_k=top_k, top_p=top_p)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).any(dim=1).all()  # at least one token always survives


# One fixed next-token distribution, whatever the previous token (every table row equal):
#   logits  = [1.0, 2.0, 0.5, 1.5, 0.0, -0.5, 0.8, -FORCE]  (EOS, token 7, never survives)
# At T=1, exp(logits) = [2.718, 7.389, 1.649, 4.482, 1.000, 0.607, 2.226, 0], sum 20.071:
#   p = [.1354, .3681, .0822, .2233, .0498, .0302, .1109, 0]
# - top_k=3 keeps the three largest: {1, 3, 0}.
# - top_p=0.8: ascending cumulative mass 5: .0302, 4: .0800, 2: .1622, 6: .2731, ...; tokens with
#   mass <= 0.2 go, so {1, 3, 0, 6} stays (margins .04 and .07 from the threshold).
# - top_k=3 then top_p=0.6: renormalised top-3 = [0: .1863, 3: .3072, 1: .5065]; mass
#   <= 0.4 goes: token 0 (.1863), leaving {1, 3}. (top-p first would keep token 0 as well.)
# At T=0.5 the weights are exp(2 * logits) = [7.389, 54.60, 2.718, 20.09, 1, .368, 4.953], sum
#   91.11: ascending mass 5: .0040, 4: .0150, 2: .0448, 6: .0992, 0: .1803; top_p=0.85 drops
#   mass <= 0.15, leaving {1, 3, 0}.
KNOWN_ROW = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.0, -0.5, 0.8, -FORCE])
TRUNCATION_CASES = [
    (dict(temperature=1.0, top_k=3), [0, 1, 3]),
    (dict(temperature=1.0, top_p=0.8), [0, 1, 3, 6]),
    (dict(temperature=1.0, top_k=3, top_p=0.6), [1, 3]),
    (dict(temperature=0.5, top_p=0.85), [0, 1, 3]),
]


@pytest.mark.parametrize("sampling, allowed", TRUNCATION_CASES)
def test_truncated_sampling_distribution(sampling, allowed, backend):
    """Every sampled token lies in the hand-derived allowed set, and the empirical frequencies
    match softmax(logits / T) renormalised over that set."""
    torch.manual_seed(0)
    batch = generate(
        markov(KNOWN_ROW.expand(V, V)),
        IDS_TOKENIZER,
        [[1]],
        group_size=2500,
        max_new_tokens=8,
        backend=backend,
        **sampling,
    )
    tokens = batch.completion_ids.flatten()  # all full length: EOS has probability 0
    assert tokens.numel() == 20_000
    assert set(tokens.unique().tolist()) == set(allowed)
    empirical = torch.bincount(tokens, minlength=V).float() / tokens.numel()
    expected = torch.zeros(V)
    expected[allowed] = torch.softmax(KNOWN_ROW[allowed] / sampling["temperature"], dim=0)
    # Tokens are i.i.d. here (every row of the table is the same), so each frequency has
    # standard deviation sqrt(p(1-p)/20000) <= 0.0036. 0.02 is more than 5.5 sigma (a false
    # failure below 1e-7 per token), yet smaller than any error of a wrong set or order above
    # (each moves some frequency by >= 0.08).
    assert (empirical - expected).abs().max() < 0.02


# Chain model, prompts [1, 2], [4], [6] x G=4 (rows 0-3, 4-7, 8-11): completions of 5, 3 and 1
# tokens. Alive after steps 0..4: 8, 8, 4, 4, 0 rows. With compact_below=0.75 the 4 finished
# rows go after step 0 (8 <= 0.75 * 12) and 4 more after step 2 (4 <= 0.75 * 8); with 0.5 only
# after step 2 (4 <= 0.5 * 12); with 0 never.
DECODE_SHAPES = {
    0.0: [(12, 1)] * 4,
    0.5: [(12, 1), (12, 1), (4, 1), (4, 1)],
    0.75: [(8, 1), (8, 1), (4, 1), (4, 1)],
}


@pytest.mark.parametrize("compact_below", sorted(DECODE_SHAPES))
def test_prompt_is_prefilled_once_and_finished_rows_leave(compact_below):
    """The shared-prefix backend's first forward holds the b distinct prompts, then one forward
    per step of the rows still decoding; it stops once every row has emitted EOS. Dropping
    finished rows does not change any token."""
    model = chain_model()
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    batch = generate(
        model,
        IDS_TOKENIZER,
        [[1, 2], [4], [6]],
        group_size=4,
        max_new_tokens=8,
        backend=rollout.SharedPrefixBackend(compact_below=compact_below),
    )
    assert calls == [(3, 2)] + DECODE_SHAPES[compact_below]
    assert batch.completion_ids.tolist() == (
        [[3, 4, 5, 6, EOS]] * 4 + [[5, 6, EOS, PAD, PAD]] * 4 + [[EOS, PAD, PAD, PAD, PAD]] * 4
    )


@pytest.mark.parametrize("compact_below", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_dropping_finished_rows_keeps_sampled_tokens(arch, compact_below):
    """Real attention over a cache whose rows are dropped mid-way: same seed, same tokens and
    log-probs as generate (which never drops rows)."""
    make_model, eos = LIVELY[arch]
    hf, fast = both_backends(
        make_model(initializer_range=0.5),
        RAGGED_PROMPTS * 2,
        rollout.SharedPrefixBackend(compact_below=compact_below),
        group_size=3,
        max_new_tokens=10,
        eos_token_id=eos,
    )
    assert_same_rollout(hf, fast)
    assert fast.truncated.any() and not fast.truncated.all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_static_cache_samples_what_generate_samples(arch, attn):
    """Real attention over a static buffer (masked empty slots, a 4D mask per implementation):
    the same seed gives the same sampled tokens as generate, log-probs to float tolerance."""
    make_model, eos = LIVELY[arch]
    model = make_model(initializer_range=0.5)
    model.config._attn_implementation = attn
    hf, fast = both_backends(
        model, RAGGED_PROMPTS, "static", group_size=3, max_new_tokens=10, eos_token_id=eos
    )
    assert_same_rollout(hf, fast)
    assert fast.truncated.any() and not fast.truncated.all()


def test_static_cache_decode_steps_have_one_shape():
    """After the prefill, every decode step sees the same input shapes: ids [n, 1], a 4D mask
    over the whole rounded-up buffer, and cache layers of that length."""
    model = tiny_qwen(initializer_range=0.5)
    shapes = []

    def record(module, args, kwargs):
        mask, cache = kwargs["attention_mask"], kwargs["cache"]
        keys = cache.layers[0].keys.shape if cache.layers[0].is_initialized else None
        shapes.append((tuple(kwargs["input_ids"].shape), tuple(mask.shape), mask.dtype, keys))

    model.register_forward_pre_hook(record, with_kwargs=True)
    generate(
        model,
        IDS_TOKENIZER,
        RAGGED_PROMPTS,
        group_size=3,
        max_new_tokens=10,
        eos_token_id=2,
        ignore_eos=True,
        backend=rollout.StaticCacheBackend(capacity_multiple=8),
    )
    # prefill: 4 prompts of P=5 with a 2D mask; then 9 steps over 16 = ceil((5+10)/8)*8 slots
    assert shapes[0][:2] == ((4, 5), (4, 5))
    step = ((12, 1), (12, 1, 1, 16), torch.bool, (12, 2, 16, 8))
    assert shapes[1:] == [step] * 9


def test_static_cache_rejects_other_attention_implementations():
    model = tiny_qwen()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"'sdpa' and 'eager'.*'flash_attention_2'"):
        generate(model, IDS_TOKENIZER, [[3, 4]], group_size=2, max_new_tokens=3, backend="static")


def test_static_slot_layer_writes_at_its_cursor():
    layer = rollout.StaticSlotLayer(2, 5, ((1, 3), (1, 3), torch.float32), "cpu")
    prefix = torch.arange(6.0).reshape(1, 1, 2, 3)  # b=1 row, 2 positions
    layer.load_prefix(prefix, -prefix, repeats=2)
    keys, values = layer.update(torch.full((2, 1, 1, 3), 9.0), torch.full((2, 1, 1, 3), -9.0))
    assert keys.shape == (2, 1, 5, 3) and int(layer.cursor) == 3
    expected = torch.zeros(2, 1, 5, 3)
    expected[:, :, :2] = prefix  # both rows got the prompt's keys
    expected[:, :, 2] = 9.0
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.get_mask_sizes(1) == (5, 0)


@pytest.mark.slow
def test_compiled_static_step_matches_generate_across_calls():
    """torch.compile (inductor on CPU; CUDA graphs on a GPU) must not change the rollout; the
    kept cache buffers are reused by a second call with other prompts without stale state."""
    model = tiny_qwen(initializer_range=0.5)
    compiled = rollout.StaticCacheBackend(compile=True, capacity_multiple=16)
    caches = []
    # Prompts of 5 and then 4 positions: both fit one 16-slot buffer (5 + 10, 4 + 10 <= 16).
    for prompts in (RAGGED_PROMPTS, [[5, 6, 7, 8], [9], [3, 3, 3], [4, 4]]):
        hf, fast = both_backends(
            model, prompts, compiled, group_size=3, max_new_tokens=10, eos_token_id=2
        )
        assert_same_rollout(hf, fast)
        caches.append(compiled._kept[1])
    assert caches[0] is caches[1]  # the same buffers, stale from the first call


def test_shared_prefix_with_peft_lora():
    from grpo_lab.models import apply_lora

    model = apply_lora(
        tiny_qwen(initializer_range=0.5),
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
    )
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it matter
            param.data.normal_(std=0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)

    hf, fast = both_backends(
        model, RAGGED_PROMPTS, group_size=2, max_new_tokens=8, temperature=0.0, eos_token_id=2
    )
    assert_same_rollout(hf, fast)
    torch.manual_seed(0)
    sampled = generate(
        model,
        IDS_TOKENIZER,
        RAGGED_PROMPTS,
        group_size=3,
        max_new_tokens=8,
        eos_token_id=2,
        backend="shared_prefix",
    )
    with torch.no_grad():
        out = completion_forward(
            model, sampled.input_ids, sampled.attention_mask, sampled.completion_len
        )
    torch.testing.assert_close(out.logp * sampled.completion_mask, sampled.sampling_logp)


def test_backend_object_and_unknown_name():
    fast = rollout.SharedPrefixBackend()
    args = (chain_model(), IDS_TOKENIZER, [[4]])
    batch = generate(*args, group_size=2, max_new_tokens=8, backend=fast)
    assert batch.completion_ids[0].tolist() == [5, 6, EOS]
    with pytest.raises(
        ValueError,
        match=r"backend: 'vllm' is not one of \['compiled', 'hf', 'shared_prefix', 'static'\]",
    ):
        generate(*args, group_size=2, max_new_tokens=8, backend="vllm")


def test_inverse_cdf_matches_a_loop():
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 10), dim=-1)
    probs[:, 4] = 0.0  # a zero-probability token in the middle is never drawn
    probs[:50, -3:] = 0.0  # nor a zero tail
    torch.manual_seed(1)
    tokens = rollout.sample_inverse_cdf(probs)
    torch.manual_seed(1)
    uniforms = torch.rand(200, 1).squeeze(1)
    for row in range(200):
        target = float(uniforms[row]) * float(probs[row].double().sum())
        running, expected = 0.0, None
        for token in range(10):
            running += float(probs[row, token])
            if running > target:
                expected = token
                break
        # float32 cumsum vs this float64 loop can disagree only within rounding of a boundary
        boundary = abs(running - target) < 1e-6 or expected is None
        assert boundary or int(tokens[row]) == expected, row
    assert not (tokens == 4).any() and not (tokens[:50] >= 7).any()


def test_inverse_cdf_draw_at_the_total_takes_last_positive_token(monkeypatch):
    # u = 1.0 * total: no cumulative value exceeds it (searchsorted would return V = 4), so the
    # draw is capped just below the total, where the last token of positive probability lies.
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.ones(*shape))
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert rollout.sample_inverse_cdf(probs).tolist() == [1, 3]


def test_unknown_sampler_lists_valid_ones():
    with pytest.raises(ValueError, match=r"sampler: 'gumbel' is not one of \['inverse_cdf'"):
        rollout.SharedPrefixBackend(sampler="gumbel")


def test_preallocated_layer_matches_dynamic_layer():
    """Prefill 2 rows of 3 positions, repeat each row 3 times, then 4 one-token steps: the
    preallocated layer must expose exactly the keys/values that concatenation builds."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    dynamic, preallocated = DynamicLayer(), rollout.PreallocatedLayer(capacity=7)
    updates = [torch.randn(2, 2, 3, 4)] + [torch.randn(6, 2, 1, 4) for _ in range(4)]
    for step, keys in enumerate(updates):
        expected = dynamic.update(keys, -keys)
        got = preallocated.update(keys, -keys)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        assert preallocated.get_seq_length() == dynamic.get_seq_length()
        if step == 0:
            dynamic.batch_repeat_interleave(3)
            preallocated.batch_repeat_interleave(3)
            assert torch.equal(preallocated.keys, dynamic.keys)
    assert preallocated.get_seq_length() == 7
    with pytest.raises(RuntimeError, match="7 positions cannot hold 8"):
        preallocated.update(updates[-1], updates[-1])


def test_build_backend_keeps_the_kind_and_swaps_the_sampler():
    assert rollout.build_backend("shared_prefix") is rollout.ROLLOUT_BACKENDS["shared_prefix"]
    icdf = rollout.build_backend("shared_prefix", sampler="inverse_cdf")
    assert type(icdf) is rollout.SharedPrefixBackend and icdf.sampler == "inverse_cdf"
    compiled = rollout.build_backend("compiled", sampler="inverse_cdf")
    assert isinstance(compiled, rollout.StaticCacheBackend)
    assert compiled.compile and compiled.sampler == "inverse_cdf"
    with pytest.raises(ValueError, match="sampler: 'inverse_cdf' needs one of grpo_lab's own"):
        rollout.build_backend("hf", sampler="inverse_cdf")
    with pytest.raises(ValueError, match=r"sampler: 'gumbel' is not one of"):
        rollout.build_backend("static", sampler="gumbel")


def test_pad_completions_adds_masked_pad_columns():
    torch.manual_seed(0)
    batch = generate(chain_model(), IDS_TOKENIZER, [[1, 2], [4]], group_size=2, max_new_tokens=8)
    padded = batch.pad_completions(batch.completion_len + 3, PAD)
    assert padded.completion_len == batch.completion_len + 3
    assert torch.equal(padded.completion_ids[:, : batch.completion_len], batch.completion_ids)
    assert (padded.completion_ids[:, batch.completion_len :] == PAD).all()
    assert torch.equal(padded.completion_lengths, batch.completion_lengths)
    assert torch.equal(padded.sampling_logp[:, : batch.completion_len], batch.sampling_logp)
    assert (padded.sampling_logp[:, batch.completion_len :] == 0).all()
    assert torch.equal(padded.truncated, batch.truncated)
    assert batch.pad_completions(batch.completion_len, PAD) is batch
    with pytest.raises(ValueError, match="shorter than the completions"):
        batch.pad_completions(batch.completion_len - 1, PAD)


# ---------------------------------------------------------------------------------------------
# Values read during the rollout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "engine",
    [
        "shared_prefix",
        pytest.param(rollout.SharedPrefixBackend(compact_below=1.0), id="shared_prefix-compact"),
        "static",
    ],
)
@pytest.mark.parametrize("batch_size", [None, 6])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_rollout_values_equal_a_full_forward(arch, batch_size, engine):
    """The value head read off the sampling forwards (prefill, then one cached forward per token,
    rows dropped mid-way) gives, at every completion token, what one full no-grad forward of
    the policy gives: fp32, tight tolerance. The tokens are those of a rollout without it."""
    make_model, eos = LIVELY[arch]
    policy = PolicyWithValueHead(make_model(initializer_range=0.5))
    kwargs = dict(group_size=3, max_new_tokens=10, eos_token_id=eos, batch_size=batch_size)
    torch.manual_seed(0)
    plain = generate(policy, IDS_TOKENIZER, RAGGED_PROMPTS, backend=engine, **kwargs)
    torch.manual_seed(0)
    batch = generate(
        policy, IDS_TOKENIZER, RAGGED_PROMPTS, backend=engine, value_head=policy.v_head, **kwargs
    )
    assert plain.values is None
    assert_same_rollout(plain, batch)
    assert batch.truncated.any() and not batch.truncated.all()
    with torch.no_grad():
        full = completion_forward(
            policy, batch.input_ids, batch.attention_mask, batch.completion_len
        ).values
    assert batch.values.dtype == torch.float32 and batch.values.shape == full.shape
    assert batch.values.abs().sum() > 0
    # torch's fp32 defaults (rtol 1.3e-6, atol 1e-5), as for the sampling log-probs above
    torch.testing.assert_close(batch.values, full * batch.completion_mask)
    # Padding the completions (several ranks) pads the values with zeros.
    padded = batch.pad_completions(batch.completion_len + 2, PAD)
    assert torch.equal(padded.values[:, : batch.completion_len], batch.values)
    assert not padded.values[:, batch.completion_len :].any()


@pytest.mark.parametrize("engine", ["hf", rollout.StaticCacheBackend(compile=True)])
def test_engines_without_a_value_readout_refuse_a_value_head(engine):
    policy = PolicyWithValueHead(tiny_qwen())
    assert not rollout.reads_values(engine)
    with pytest.raises(ValueError, match="value_head"):
        generate(
            policy, IDS_TOKENIZER, [[3]], group_size=2, max_new_tokens=2, eos_token_id=1,
            backend=engine, value_head=policy.v_head,
        )  # fmt: skip
    assert rollout.reads_values("shared_prefix") and rollout.reads_values("static")


def test_zero3_value_head_joins_the_one_rollout_gather(monkeypatch):
    """Under ZeRO-3 the head read during the rollout is gathered with the model, in the same
    single collective: nothing is gathered per decode step."""
    policy = PolicyWithValueHead(tiny_qwen())
    for param in policy.parameters():
        param.ds_id, param.ds_status = 0, "NOT_AVAILABLE"
    with fake_deepspeed(monkeypatch) as calls:
        generate(
            policy, IDS_TOKENIZER, [[3], [4], [5]], group_size=2, max_new_tokens=6,
            eos_token_id=1, batch_size=2, backend="shared_prefix", value_head=policy.v_head,
        )  # fmt: skip
    assert len(calls) == 1
    assert calls[0] == [*policy.lm.parameters(), *policy.v_head.parameters()]
