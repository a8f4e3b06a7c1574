"""Small random transformers models shared by the tests.

Two layers of width 32, 4 query / 2 key-value heads (grouped-query attention, as Qwen2.5), 64
positions, a 20-token vocabulary unless overridden; built in eval mode after
``torch.manual_seed(seed)``, so the same arguments give bitwise the same weights. ``"gpt2"`` has
learned absolute position embeddings: unlike RoPE, a constant position shift changes its logits.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

ROPE_CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}
ARCHS = (*ROPE_CONFIGS, "gpt2")


def tiny_config(arch: str = "qwen2", *, vocab_size: int = 20, **overrides) -> PretrainedConfig:
    """The tiny shape for ``arch`` ("qwen2", "llama" with tied embeddings, or "gpt2"), with
    ``overrides`` (config fields) applied last."""
    if arch == "gpt2":
        shape = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1)
        return GPT2Config(**{**shape, "vocab_size": vocab_size, **overrides})
    shape = dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return ROPE_CONFIGS[arch](**{**shape, "vocab_size": vocab_size, **overrides})


def tiny_lm(
    arch: str = "qwen2", *, seed: int = 0, attn: str | None = None, **overrides
) -> PreTrainedModel:
    """A random causal LM of :func:`tiny_config` (``attn``: attention implementation, default
    transformers' choice). A larger ``initializer_range`` (e.g. 0.5) gives peaked, varied greedy
    continuations; at the default a random tiny model mostly repeats one token."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def split_batch(
    prompts: list[list[int]],
    rows: list[int],
    completion_lens: list[int],
    completion_len: int,
    *,
    vocab_size: int,
    pad_id: int = 0,
    eos_id: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rollout-shaped batch: row i is ``prompts[rows[i]]`` left-padded to the longest prompt,
    then ``completion_lens[i]`` random tokens (ids >= 2), the last of them EOS when shorter than
    ``completion_len``, then pad with mask 0. Returns prompt_ids, prompt_mask [N, P] and
    completion_ids, completion_mask [N, C]."""
    n, p = len(rows), max(len(prompt) for prompt in prompts)
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.full((n, p), pad_id)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    completion_ids = torch.randint(2, vocab_size, (n, completion_len), generator=gen)
    completion_mask = torch.ones((n, completion_len), dtype=torch.long)
    for i, (row, length) in enumerate(zip(rows, completion_lens, strict=True)):
        prompt = prompts[row]
        prompt_ids[i, p - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[i, p - len(prompt) :] = 1
        if length < completion_len:
            completion_ids[i, length - 1] = eos_id
            completion_ids[i, length:] = pad_id
            completion_mask[i, length:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def assert_same_outputs(expected, actual) -> None:
    """Two ``CompletionOutputs``: the same fields present, each float32 and close."""
    for name in ("logp", "entropy", "values"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert (want is None) == (got is None), name
        if want is not None:
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, msg=name)
