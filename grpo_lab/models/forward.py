"""The training forward: one model call over prompt + completion, reduced to completion tokens.

:func:`completion_forward` returns :class:`CompletionOutputs` (log-prob, entropy, value per
completion token, each [N, C] float32) for any model kind: a causal LM, a
:class:`~grpo_lab.models.value.PolicyWithValueHead` or a :class:`~grpo_lab.models.value.Critic`,
possibly wrapped by DDP / accelerate / DeepSpeed / peft. :func:`_kept_positions_forward` is the
call both it and :mod:`grpo_lab.models.shared_prompt` make: it chooses between the model's own
logits and the chunked LM head (:mod:`grpo_lab.models.chunked_head`).

Shape legend: N sequences, T = P + C tokens (left-padded prompt of P, completion of C), K kept
positions, H hidden size, V vocabulary size.

Alignment convention: the logits and the hidden state at position P-1+t predict completion token
t, so ``logp[:, t]`` is log pi(token t | prefix) and ``values[:, t]`` is V(s_t), the value of the
state just before token t is emitted. Position ids are always derived from the attention mask
(``cumsum - 1`` clamped at 0, :func:`position_ids_from_mask`), exactly as transformers
``generate`` does, so left padding does not shift positions between rollout and training.

Every model kind answers ``model(input_ids=, attention_mask=, position_ids=, logits_to_keep=)``
with an object carrying ``logits`` and/or ``values``; the forward calls the outermost wrapper so
that its hooks run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from grpo_lab.models.chunked_head import (
    _HEAD_CHECKS,
    MAX_LOGIT_ELEMENTS,
    _check_head,
    _chunkable_head,
    _head_logprobs,
)
from grpo_lab.models.logprobs import token_logprobs
from grpo_lab.models.value import ValueModelOutput


@dataclass
class CompletionOutputs:
    """Per-completion-token outputs of :func:`completion_forward` (None when not produced)."""

    logp: Tensor | None  # [N, C] float32 log-prob of each completion token under softmax(z / T)
    entropy: Tensor | None  # [N, C] float32 entropy of that distribution (only when asked)
    values: Tensor | None  # [N, C] float32 V(s_t) for predicting completion token t


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:  # [N, T] -> [N, T] long
    """Positions counting real tokens only (``cumsum - 1``, 0 on left padding), as in generate."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def completion_forward(
    model: nn.Module,
    input_ids: Tensor,  # [N, P+C]
    attention_mask: Tensor,  # [N, P+C]
    completion_len: int,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = 1024,
    max_logit_elements: int | None = MAX_LOGIT_ELEMENTS,
) -> CompletionOutputs:
    """One forward of ``model`` over prompt + completion, reduced to the C completion tokens.

    ``model`` is a causal LM (-> logp, entropy), a :class:`PolicyWithValueHead` (-> logp,
    entropy, values) or a :class:`Critic` (-> values), possibly wrapped by DDP / accelerate /
    DeepSpeed / peft; it is called once, through its outermost wrapper.

    Logits of K = C+1 positions are needed (the last one is dropped: it predicts past the end).
    While N * K * V <= ``max_logit_elements`` (or it is None) the model materialises them itself
    (``logits_to_keep=K``) and :func:`token_logprobs` reduces them ``chunk_size`` positions at
    a time. Above it, where the LM head qualifies (:func:`_chunkable_head`), the model returns
    no logits and the head is applied to its last hidden state in chunks of at most
    ``max_logit_elements`` logits (and ``chunk_size`` positions), each checkpointed under
    autograd; outputs and gradients are the same up to float rounding.
    """
    seq_len = input_ids.shape[1]
    if not 0 < completion_len < seq_len:
        raise ValueError(f"completion_len must be in [1, {seq_len - 1}], got {completion_len}")
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return _kept_positions_forward(
        model,
        inputs,
        completion_len + 1,
        input_ids[:, -completion_len:],
        temperature=temperature,
        compute_entropy=compute_entropy,
        chunk_size=chunk_size,
        max_logit_elements=max_logit_elements,
    )


def _kept_positions_forward(
    model: nn.Module,
    inputs: dict,
    keep: int,
    targets: Tensor,  # [N, C'] long, predicted by the first C' of the K kept positions
    *,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int,
    max_logit_elements: int | None,
) -> CompletionOutputs:
    """One ``model(**inputs)`` call keeping the last K = ``keep`` positions, reduced to the
    log-probs (entropy, values) of ``targets`` ([N, C'] each).

    Three ways, decided per call: the model's own logits (below the threshold, or where the
    head does not qualify or failed its check); the chunked head; or, on the first call for
    this model and train/eval mode, the one-time head check: the model is asked for the logits
    of its last position only, which are compared with the head applied to that position's
    hidden state. If they agree the same call continues on the chunked path, so the full
    logits are never materialised; if not, a second call takes the model's own logits.

    NOTE: on the chunked path the model still calls its head, on the empty selection (or the
    checked position), so the head's parameters (and any adapter on it) are reachable from the
    model's outputs: DDP with ``find_unused_parameters`` does not mark them unused before the
    chunks use them.
    """
    # Of the K kept positions the first C' predict targets; slicing from the end also covers a
    # model that ignored logits_to_keep.
    window = slice(-keep, (targets.shape[1] - keep) or None)
    head = _chunkable_head(model, targets.shape[0] * keep, max_logit_elements)
    verdict = None if head is None else _HEAD_CHECKS.get(head.lm, {}).get(head.lm.training)
    if head is not None and verdict is not False:
        extra = {"values_to_keep": keep} if head.with_values else {}
        length = inputs["input_ids"].shape[1]
        # [1] the last position for the check, else [0]: no logits at all
        selected = torch.arange(length - 1 if verdict is None else length, length)
        selected = selected.to(targets.device)
        out = model(**inputs, logits_to_keep=selected, output_hidden_states=True, **extra)
        if verdict is None:
            verdict = _check_head(head, out.hidden_states[-1][:, -1:], out.logits[:, -1:])
        if verdict:
            logp, entropy = _head_logprobs(
                head,
                out.hidden_states[-1][:, window],  # [N, C', H]
                targets,
                temperature=temperature,
                compute_entropy=compute_entropy,
                chunk_size=chunk_size,
                max_logit_elements=max_logit_elements,
            )
            values = out.values[:, window].float() if isinstance(out, ValueModelOutput) else None
            return CompletionOutputs(logp=logp, entropy=entropy, values=values)

    out = model(**inputs, logits_to_keep=keep)
    logp = entropy = values = None
    if out.logits is not None:
        logp, entropy = token_logprobs(
            out.logits[:, window],
            targets,
            temperature=temperature,
            compute_entropy=compute_entropy,
            chunk_size=chunk_size,
        )
    if isinstance(out, ValueModelOutput) and out.values is not None:
        values = out.values[:, window].float()
    return CompletionOutputs(logp=logp, entropy=entropy, values=values)
