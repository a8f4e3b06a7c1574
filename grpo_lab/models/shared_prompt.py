"""The shared-prompt forward: each distinct prompt computed once, its completions against its cache.

In GRPO / PPO every prompt is sampled G times. :func:`shared_prompt_completion_forward` gives
the same outputs and gradients as :func:`grpo_lab.models.forward.completion_forward` on the
concatenated batch, from split inputs, in three steps: a prompt pass over the U distinct prompts
that records every layer's keys/values (:class:`_RecordingLayer`), a completion pass of all N
rows that reads them spread to N rows (:class:`_SharedPrefixLayer`), and token 0's outputs taken
from the prompt pass. This module also owns the checks that a model suits it
(``SHARED_PROMPT_ATTENTION``, :func:`attention_implementation`, non-reentrant checkpointing)
and the switch that lets checkpointed layers keep the cache.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

from grpo_lab.models.chunked_head import MAX_LOGIT_ELEMENTS
from grpo_lab.models.forward import (
    CompletionOutputs,
    _kept_positions_forward,
    position_ids_from_mask,
)
from grpo_lab.models.logprobs import token_logprobs
from grpo_lab.models.value import ValueModelOutput

SHARED_PROMPT_ATTENTION = ("eager", "sdpa")


def shared_prompt_completion_forward(
    model: nn.Module,
    prompt_ids: Tensor,  # [N, P] long, left-padded
    prompt_mask: Tensor,  # [N, P]
    completion_ids: Tensor,  # [N, C] long
    completion_mask: Tensor,  # [N, C]
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = 1024,
    max_logit_elements: int | None = MAX_LOGIT_ELEMENTS,
) -> CompletionOutputs:
    """:func:`completion_forward` with the prompt computed once per distinct prompt.

    In GRPO / PPO every prompt is sampled G times, so G rows of a batch carry the same prompt.
    Rows whose real prompt tokens (and padding) agree are found with ``torch.unique`` (rows need
    not be adjacent nor form complete groups); U = the number of distinct prompts.

    1. Prompt pass on [U, P] with a KV cache and ``logits_to_keep=1``: the last prompt position
       (P-1, the same for every row under left padding) predicts completion token 0, and every
       layer's keys/values [U, KVH, P, D] are recorded.
    2. Completion pass on the first C-1 completion tokens of all N rows: each layer attends to
       ``index_select(prefix, 0, inverse)`` [N, KVH, P, D] followed by its own keys/values, under
       the full [N, P+C-1] mask with positions ``position_ids_from_mask`` of that mask (so they
       continue the prompt's). Its C-1 positions P..P+C-2 predict tokens 1..C-1; the last
       completion token is never fed, as completion_forward drops its prediction anyway.
    3. Token 0's logits (and value) are ``index_select``-ed from U to N rows and put in front.

    Returns the same :class:`CompletionOutputs` (logp / entropy / values, each [N, C] float32)
    as ``completion_forward(model, cat(prompt_ids, completion_ids), cat(prompt_mask,
    completion_mask), C, ...)`` up to float rounding, and the same gradients: the only new
    operation between the shared prefix and the N rows is ``index_select``, whose backward sums
    the G rows' gradients into their prompt's row, exactly what the G identical prompt copies of
    the full forward contribute to the parameters. Log-probs reuse :func:`token_logprobs` on
    [N, 1, V] and [N, C-1, V] separately, so no [N, C, V] copy of the logits is made. Where
    N * (C-1) * V exceeds ``max_logit_elements``, the completion pass takes
    :func:`completion_forward`'s chunked LM head (same rule); the prompt pass always keeps its
    one position's logits.

    ``model`` is the outermost wrapper (DDP / accelerate / DeepSpeed / peft hooks run on both
    calls) around a transformers model that passes ``cache=`` down to its attention layers:
    a causal LM, a :class:`PolicyWithValueHead` or a :class:`Critic`. Checks, each a
    ValueError: the attention implementation is one of ``SHARED_PROMPT_ATTENTION`` (the ones
    checked against the full forward); no prompt-learning peft adapter (it
    owns the cache); gradient checkpointing, if active, is non-reentrant; and the model did
    write and read the cache on every layer.

    NOTE: gradient checkpointing replays a layer's forward in backward, and transformers drops
    ``cache`` under checkpointing unless the layer's ``_can_checkpoint_with_cache`` is set. It
    is set on the model's layers for the duration of the call only (restored on exit, also on
    error; other threads using the same model meanwhile would see it), which is sound because
    both caches used here are idempotent: the prompt cache keeps the first keys/values it is
    given and returns its input unchanged, and the prefix cache returns ``cat(prefix, new)``
    without storing anything, so a replay computes the same tensors and nothing is appended
    twice.
    """
    _check_shared_prompt_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    _check_shared_prompt_model(model)
    unique_ids, unique_mask, inverse = _distinct_prompts(prompt_ids, prompt_mask)
    reduce = dict(temperature=temperature, compute_entropy=compute_entropy, chunk_size=chunk_size)
    with _cache_survives_checkpointing(model):
        head, prefix = _prompt_pass(model, unique_ids, unique_mask, inverse)
        tail = None
        if completion_ids.shape[1] > 1:
            tail = _completion_pass(
                model,
                prefix,
                prompt_mask,
                completion_ids,
                completion_mask,
                max_logit_elements=max_logit_elements,
                **reduce,
            )
    return _prepend_first_token(head, tail, inverse, completion_ids[:, :1], **reduce)


def _distinct_prompts(
    prompt_ids: Tensor,  # [N, P] long, left-padded
    prompt_mask: Tensor,  # [N, P]
) -> tuple[Tensor, Tensor, Tensor]:
    """The U distinct prompts of the batch: (ids [U, P], mask [U, P], inverse [N] long), where
    row i's prompt is distinct prompt ``inverse[i]``."""
    # Padding ids never reach a real position (padded keys are masked out), so rows are keyed on
    # their real tokens only; -1 (never a token id) marks padding so masks are compared too.
    key = prompt_ids.masked_fill(prompt_mask == 0, -1)  # [N, P]
    unique_keys, inverse = torch.unique(key, dim=0, return_inverse=True)  # [U, P], [N]
    # The distinct prompts are the keys themselves; any id fills their (masked) padding.
    unique_mask = (unique_keys >= 0).to(prompt_mask.dtype)  # [U, P]
    unique_ids = unique_keys.clamp(min=0)  # [U, P]
    return unique_ids, unique_mask, inverse


def _prompt_pass(
    model: nn.Module,
    unique_ids: Tensor,  # [U, P]
    unique_mask: Tensor,  # [U, P]
    inverse: Tensor,  # [N]
) -> tuple[object, Cache]:
    """Step 1: the distinct prompts once, keeping their last position's logits (and value), and
    the read-only completion-pass cache built from the keys/values they wrote."""
    recorder = Cache(layer_class_to_replicate=_RecordingLayer)
    head = model(
        input_ids=unique_ids,
        attention_mask=unique_mask,
        position_ids=position_ids_from_mask(unique_mask),
        logits_to_keep=1,
        cache=recorder,
        use_cache=False,
    )
    prefix = _prefix_cache(model, recorder, inverse, unique_ids.shape[0], unique_ids.shape[1])
    return head, prefix


def _completion_pass(
    model: nn.Module,
    prefix: Cache,
    prompt_mask: Tensor,  # [N, P]
    completion_ids: Tensor,  # [N, C] long, C > 1
    completion_mask: Tensor,  # [N, C]
    *,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int,
    max_logit_elements: int | None,
) -> CompletionOutputs:
    """Step 2: the first C-1 completion tokens of all N rows against the prompt's cached
    keys/values; outputs for completion tokens 1..C-1 (each [N, C-1])."""
    prompt_len = prompt_mask.shape[1]
    completion_len = completion_ids.shape[1]
    mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)  # [N, P+C-1]
    tail_inputs = dict(
        input_ids=completion_ids[:, :-1],
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask)[:, prompt_len:],
        cache=prefix,
        use_cache=False,
    )
    tail = _kept_positions_forward(  # each [N, C-1]
        model,
        tail_inputs,
        completion_len - 1,
        completion_ids[:, 1:],
        temperature=temperature,
        compute_entropy=compute_entropy,
        chunk_size=chunk_size,
        max_logit_elements=max_logit_elements,
    )
    if not all(layer.reads for layer in prefix.layers):
        raise ValueError(
            f"{type(model).__name__}: the completion pass did not read the prompt's "
            "keys/values from `cache` in every layer"
        )
    return tail


def _prepend_first_token(
    head,  # the prompt pass's output: logits [U, 1, V] and/or values [U, 1]
    tail: CompletionOutputs | None,  # each [N, C-1]; None when C == 1
    inverse: Tensor,  # [N]
    first_ids: Tensor,  # [N, 1] long, completion token 0
    *,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int,
) -> CompletionOutputs:
    """Step 3: token 0's log-prob (entropy, value) from the prompt pass, spread from U to N rows,
    in front of the completion pass's; each [N, C] float32."""
    logp = entropy = values = None
    if head.logits is not None:
        logp, entropy = token_logprobs(
            head.logits[:, -1:].index_select(0, inverse),
            first_ids,
            temperature=temperature,
            compute_entropy=compute_entropy,
            chunk_size=chunk_size,
        )
        if tail is not None:
            logp = torch.cat([logp, tail.logp], dim=1)
            if compute_entropy:
                entropy = torch.cat([entropy, tail.entropy], dim=1)
    if isinstance(head, ValueModelOutput) and head.values is not None:
        values = head.values[:, -1:].float().index_select(0, inverse)  # [N, 1]
        if tail is not None:
            values = torch.cat([values, tail.values], dim=1)
    return CompletionOutputs(logp=logp, entropy=entropy, values=values)


class _RecordingLayer(CacheLayerMixin):
    """Prompt-pass cache layer: keeps the first keys/values [U, KVH, P, D] it is given and
    returns its input unchanged, so it looks empty to the mask builder and a checkpoint replay
    neither appends nor replaces anything."""

    is_sliding = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.keys, self.values = key_states, value_states
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class _SharedPrefixLayer(CacheLayerMixin):
    """Completion-pass cache layer, read-only: ``update`` returns the prompt's keys/values
    spread to the N rows (``index_select(0, inverse)``) followed by the new ones, and stores
    nothing. Spreading inside ``update`` keeps only the [U] prefix alive between the passes;
    the [N] copy is rebuilt when a checkpointed layer is replayed."""

    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, inverse: Tensor):  # [U, KVH, P, D] x2, [N]
        super().__init__()
        self.keys, self.values, self.inverse = keys, values, inverse
        self.is_initialized = True
        self.reads = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("a shared-prefix cache layer is created initialised")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.reads += 1
        keys = torch.cat([self.keys.index_select(0, self.inverse), key_states], dim=-2)
        values = torch.cat([self.values.index_select(0, self.inverse), value_states], dim=-2)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


def _prefix_cache(
    model: nn.Module, recorder: Cache, inverse: Tensor, num_unique: int, prompt_len: int
) -> Cache:
    """The read-only completion-pass cache built from what the prompt pass recorded."""
    layers = recorder.layers
    if not layers or not all(layer.is_initialized for layer in layers):
        raise ValueError(
            f"{type(model).__name__}: the prompt pass did not write keys/values into `cache` in "
            "every layer (the model does not take `cache=`, or drops it, e.g. under gradient "
            "checkpointing)"
        )
    expected = (num_unique, prompt_len)
    for layer in layers:
        if (layer.keys.shape[0], layer.keys.shape[-2]) != expected:
            raise ValueError(
                f"{type(model).__name__}: cached keys of shape {tuple(layer.keys.shape)} do not "
                f"hold {num_unique} prompts of {prompt_len} positions"
            )
    return Cache(layers=[_SharedPrefixLayer(lay.keys, lay.values, inverse) for lay in layers])


@contextlib.contextmanager
def _cache_survives_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep ``cache=`` for the duration (both caches are idempotent)."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    missing = object()
    saved = [layer.__dict__.get("_can_checkpoint_with_cache", missing) for layer in layers]
    try:
        for layer in layers:
            layer._can_checkpoint_with_cache = True
        yield
    finally:
        for layer, value in zip(layers, saved):
            if value is missing:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = value


def _check_shared_prompt_inputs(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> None:
    tensors = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    for name, tensor in tensors.items():
        if tensor.dim() != 2 or tensor.shape[1] == 0:
            raise ValueError(f"{name}: expected a [N, length>0] tensor, got {tuple(tensor.shape)}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask: shape {tuple(prompt_mask.shape)} != prompt_ids'")
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_mask: shape {tuple(completion_mask.shape)} != ids'")
    if completion_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(
            f"completion_ids: {completion_ids.shape[0]} rows != prompt_ids' {prompt_ids.shape[0]}"
        )


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation of the first transformers model inside ``model`` (under
    any wrappers); None when it holds none."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return None if inner is None else inner.config._attn_implementation


def _check_shared_prompt_model(model: nn.Module) -> None:
    """ValueError unless the model's cache, masks and checkpointing suit the shared prefix."""
    attn = attention_implementation(model)
    if attn is None:
        raise ValueError(f"{type(model).__name__}: holds no transformers PreTrainedModel")
    if attn not in SHARED_PROMPT_ATTENTION:
        raise ValueError(
            f"{type(model).__name__}: attention implementation {attn!r} is not supported by the "
            f"shared-prompt forward (one of {SHARED_PROMPT_ATTENTION}); use completion_forward"
        )
    for module in model.modules():
        peft_config = getattr(module, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(
                f"{type(model).__name__}: a prompt-learning peft adapter uses the KV cache itself; "
                "use completion_forward"
            )
        checkpointing = (
            isinstance(module, GradientCheckpointingLayer)
            and module.gradient_checkpointing
            and module.training
            and torch.is_grad_enabled()
        )
        if checkpointing and not _is_non_reentrant(module._gradient_checkpointing_func):
            raise ValueError(
                f"{type(model).__name__}: gradient checkpointing of {type(module).__name__} must be "
                "non-reentrant (use_reentrant=False): a reentrant checkpoint runs the layer without "
                "autograd, so the prompt's cached keys/values would carry no gradient"
            )


def _is_non_reentrant(checkpoint_fn) -> bool:
    # transformers wraps torch's checkpoint in functools.partial(..., use_reentrant=...); torch's
    # own default for a missing use_reentrant is the reentrant variant.
    return (
        isinstance(checkpoint_fn, functools.partial)
        and checkpoint_fn.keywords.get("use_reentrant", True) is False
    )
