"""Models, tokenizers and helpers shared by the rollout tests: mock LMs with known logits
(a Markov table), tiny real Qwen2 / GPT-2 models, a stand-in ``deepspeed`` module, and the
comparison of two rollouts."""

import sys
import types
from contextlib import contextmanager
from types import SimpleNamespace

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

from grpo_lab.rollout import RolloutBatch, generate

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
