"""Rollout engines: prompts -> G sampled completions per prompt, with masks and sampling
log-probs, as a :class:`RolloutBatch`.

Call :func:`generate` with a model, a tokenizer, prompts and an engine name from
:data:`ROLLOUT_BACKENDS`:

- ``"shared_prefix"`` (:mod:`~grpo_lab.rollout.shared_prefix`, the default): each prompt is
  prefilled once and its KV cache shared by its G samples, then a lean decode loop that drops
  finished rows. Same tokens as ``"hf"`` for the same seed, 1.3-1.5x faster on CPU; use it
  unless you have a reason not to.
- ``"static"`` / ``"compiled"`` (:mod:`~grpo_lab.rollout.static`): the shared-prefix prefill,
  then fixed-shape decode steps over a static KV cache. ``"compiled"`` runs them under
  ``torch.compile`` and is meant for CUDA, where each step replays as one CUDA graph (on CPU it
  is slower than eager); not under ZeRO-3. ``"static"`` is its eager twin.
- ``"hf"`` (:mod:`~grpo_lab.rollout.hf`): transformers ``generate``; the reference the others
  match token for token, and the fallback for a model whose forward the others do not support
  (they pass ``cache=``, and ``static`` needs ``sdpa`` or ``eager`` attention).

Every engine follows one contract (same tokens for the same seed on exact logits, same masks,
``sampling_logp`` equal to the training forward's log-probs); any object with
:class:`RolloutBackend`'s ``generate`` (e.g. a vLLM adapter) can be passed instead of a name.
``shared_prefix`` and ``static`` can also read a value head during the rollout
(``generate(..., value_head=)``, :func:`reads_values`).

Module map: :mod:`~grpo_lab.rollout.batch` (the :class:`RolloutBatch` record, its shape legend
and layout, concatenation, masks), :mod:`~grpo_lab.rollout.sampling` (decoding settings,
top-k / top-p, token draws), :mod:`~grpo_lab.rollout.base` (the engine protocol, what every
engine shares, reproducibility, value readout), then one module per engine. This module holds
the registry, :func:`build_backend` and :func:`generate`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from grpo_lab.config import RolloutConfig
from grpo_lab.rollout.base import ChunkedBackend, Prompts, RolloutBackend, ValueReadout
from grpo_lab.rollout.batch import (
    RolloutBatch,
    completion_masks,
    concat_batches,
    decode_completions,
    left_pad,
)
from grpo_lab.rollout.hf import HFGenerateBackend
from grpo_lab.rollout.sampling import (
    SAMPLERS,
    Decoding,
    choose_tokens,
    sample_inverse_cdf,
    sample_multinomial,
    truncate_logits,
)
from grpo_lab.rollout.shared_prefix import Decoder, PreallocatedLayer, SharedPrefixBackend
from grpo_lab.rollout.static import StaticCacheBackend, StaticSlotLayer
from grpo_lab.zero3 import gather_params_for_generation

ROLLOUT_BACKENDS: dict[str, RolloutBackend] = {
    "hf": HFGenerateBackend(),
    "shared_prefix": SharedPrefixBackend(),
    "static": StaticCacheBackend(),
    "compiled": StaticCacheBackend(compile=True),
}


def resolve_backend(backend: str | RolloutBackend) -> RolloutBackend:
    """A backend object, or the one named in :data:`ROLLOUT_BACKENDS` (unknown names raise)."""
    if not isinstance(backend, str):
        return backend
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {sorted(ROLLOUT_BACKENDS)}")
    return ROLLOUT_BACKENDS[backend]


def build_backend(name: str, *, sampler: str = "multinomial") -> RolloutBackend:
    """The engine named ``name`` (see :data:`ROLLOUT_BACKENDS`) drawing tokens with ``sampler``
    (see :data:`SAMPLERS`): the registered instance for ``"multinomial"``, else a new engine of
    the same kind and settings. ``"hf"`` samples as ``generate`` does and takes no other sampler.
    """
    backend = resolve_backend(name)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: {sampler!r} is not one of {sorted(SAMPLERS)}")
    if sampler == "multinomial":
        return backend
    if isinstance(backend, StaticCacheBackend):
        return StaticCacheBackend(
            sampler, compile=backend.compile, capacity_multiple=backend.capacity_multiple
        )
    if isinstance(backend, SharedPrefixBackend):
        return SharedPrefixBackend(sampler, compact_below=backend.compact_below)
    raise ValueError(
        f"sampler: {sampler!r} needs one of grpo_lab's own engines (shared_prefix, static, "
        f"compiled), not backend {name!r}"
    )


# The engine of a training run's ``rollout.backend`` default, read from the config schema so
# that generate() samples as a run does when no engine is named.
DEFAULT_BACKEND: str = RolloutConfig().backend


def reads_values(backend: str | RolloutBackend) -> bool:
    """Whether ``backend`` can read a value head during the rollout (``generate``'s
    ``value_head``); a caller that needs values from another engine runs its own forward."""
    return bool(getattr(resolve_backend(backend), "reads_values", False))


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Prompts,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    ignore_eos: bool = False,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    backend: str | RolloutBackend = DEFAULT_BACKEND,
    value_head: nn.Module | None = None,
) -> RolloutBatch:
    """Sample ``group_size`` completions per prompt from the current policy (no grad).

    Args:
        model: a causal LM (plain, peft-wrapped or under DeepSpeed ZeRO-3), an object with a
            ``generation_model`` attribute (e.g. ``PolicyWithValueHead``), or a DDP/DeepSpeed
            wrapper (``.module``) around either. Its train/eval mode is restored afterwards.
            Under DeepSpeed ZeRO-3 it must be (or wrap) the engine: the parameters are gathered
            once and the engine's hooks paused for the rollout, so no decode step makes a
            collective call (see :mod:`grpo_lab.zero3`).
        tokenizer: tokenises string prompts with its defaults (``add_special_tokens=True``, so a
            BOS is added only by tokenizers that add one by default); supplies the pad id and,
            unless given, the EOS id. May be None when prompts are token ids and
            ``eos_token_id`` is given (the first EOS id then pads).
        prompts: B strings or B token-id sequences (each non-empty).
        temperature: 0 means greedy decoding; ``sampling_logp`` is then taken at temperature 1.
        top_p, top_k: nucleus / top-k truncation of the sampling distribution (``top_k=None``
            disables it); top-k is applied first (ties with the k-th logit are kept), top-p
            then keeps the most likely of the remaining tokens, renormalised, until their mass
            reaches ``top_p`` (see :func:`truncate_logits`). ``sampling_logp`` is taken before
            truncation.
        eos_token_id: stop token(s); default: the model's generation config, else the
            tokenizer's EOS.
        ignore_eos: generate exactly ``max_new_tokens`` tokens (EOS suppressed) for fixed-length
            benchmarking; the mask is all ones and ``truncated`` all True. NOTE: the tokens are
            then drawn with EOS removed, and ``sampling_logp`` is under that renormalised
            distribution, so it is slightly above the policy's log-prob.
        batch_size: sequences per chunk, in whole groups: each chunk takes
            ``max(1, batch_size // group_size)`` prompts; None means a single chunk.
        generator: see :mod:`grpo_lab.rollout.base` on reproducibility.
        backend: a name in :data:`ROLLOUT_BACKENDS` or any :class:`RolloutBackend`; default
            :data:`DEFAULT_BACKEND`, the config's ``rollout.backend`` default.
        value_head: a module [n, H] -> [n] (a :class:`grpo_lab.models.ValueHead` on this
            model's trunk) read during the rollout into ``RolloutBatch.values``, saving a value
            model's no-grad forward; only for engines where :func:`reads_values` is true
            (``shared_prefix``, ``static``), others raise ``ValueError``.

    Explicit values replace the model's ``generation_config`` for temperature, top-k/p,
    typical-p, repetition penalty, n-gram ban and minimum length (checkpoints often ship e.g.
    ``top_k=20``), so results do not depend on it; grpo_lab's own engines never read it.
    """
    extra = {} if value_head is None else {"value_head": value_head}
    return resolve_backend(backend).generate(
        model,
        tokenizer,
        prompts,
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_token_id=eos_token_id,
        ignore_eos=ignore_eos,
        batch_size=batch_size,
        generator=generator,
        **extra,
    )


__all__ = [
    "DEFAULT_BACKEND",
    "ROLLOUT_BACKENDS",
    "SAMPLERS",
    "ChunkedBackend",
    "Decoder",
    "Decoding",
    "HFGenerateBackend",
    "PreallocatedLayer",
    "Prompts",
    "RolloutBackend",
    "RolloutBatch",
    "SharedPrefixBackend",
    "StaticCacheBackend",
    "StaticSlotLayer",
    "ValueReadout",
    "build_backend",
    "choose_tokens",
    "completion_masks",
    "concat_batches",
    "decode_completions",
    "gather_params_for_generation",
    "generate",
    "left_pad",
    "reads_values",
    "resolve_backend",
    "sample_inverse_cdf",
    "sample_multinomial",
    "truncate_logits",
]
