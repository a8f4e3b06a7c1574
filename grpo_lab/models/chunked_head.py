"""The chunked LM head: log-probs from the last hidden state without materialising all logits.

Where the logits a forward would materialise (N x K x V) exceed ``max_logit_elements``, the
forwards (:mod:`grpo_lab.models.forward`, :mod:`grpo_lab.models.shared_prompt`) ask the model
for none of them (``logits_to_keep`` = an empty index tensor, ``output_hidden_states=True``) and
apply the LM head module themselves to the last hidden state a chunk of positions at a time,
together with the float32 log-softmax (:func:`_head_logprobs`); under autograd each chunk is
checkpointed, so only one chunk of logits exists at once, also in backward.

This is only sound where ``lm_head(hidden_states[-1])`` IS the model's logits; this module owns
the rule that decides it (:func:`_chunkable_head`: a config check, then a one-time numeric
check per model and train/eval mode, :func:`_check_head`, remembered in ``_HEAD_CHECKS``).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from grpo_lab.models.logprobs import _check_logprob_args, _chunk_logprobs, _over_chunks
from grpo_lab.models.value import Critic, PolicyWithValueHead

MAX_LOGIT_ELEMENTS = 2**26
# Config fields under which a transformers causal LM changes its logits after the LM head (or
# the hidden state between the final norm and the head), as found in transformers 5.24:
# Gemma 2/3/4, nanochat, Beam (softcapping), RecurrentGemma, Cohere, Granite, HyperCLOVA X,
# MiniCPM3, Falcon-H1, Inkling, Muse. A value other than None means the transform applies.
LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "logits_mup_width_multiplier",
    "output_multiplier",
)


@dataclass
class _LMHead:
    """An LM head that :func:`completion_forward` may apply itself."""

    module: nn.Module  # [..., H] -> [..., V], the lm's get_output_embeddings()
    lm: PreTrainedModel  # the causal LM owning it, under every wrapper
    with_values: bool  # the model is a PolicyWithValueHead (values come from the same call)


# Outcome of the one-time head check, per causal LM and training flag (see _chunkable_head).
_HEAD_CHECKS: weakref.WeakKeyDictionary[PreTrainedModel, dict[bool, bool]] = (
    weakref.WeakKeyDictionary()
)
# assert_close's default (rtol, atol) per dtype, for the head check.
_CHECK_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
}


def _chunkable_head(
    model: nn.Module, positions: int, max_logit_elements: int | None
) -> _LMHead | None:
    """The LM head to apply chunk by chunk for a pass keeping ``positions`` = N * K positions,
    or None where the model's own logits are to be used.

    None unless N * K * V exceeds ``max_logit_elements`` (never when that is None). Then the
    rule that ``lm_head(hidden_states[-1])`` is the model's logits:

    1. Unwrapping (DDP / DeepSpeed ``.module``, ``torch.compile``'s ``_orig_mod``, peft
       ``get_base_model()``, ``PolicyWithValueHead.lm``) must reach a transformers
       ``PreTrainedModel`` with ``get_output_embeddings()`` (a :class:`Critic` has none).
    2. Its config (and text config) sets none of ``LOGIT_TRANSFORM_FIELDS`` and does not
       untie ``hidden_states[-1]`` from the final-norm output (``tie_last_hidden_states``).
    3. Not FSDP (the head's parameters are sharded outside its root forward), and not a head
       partitioned by ZeRO-3 over several processes: each head call is then a collective
       gather and the number of chunks, which follows each process's own N and C, would
       differ between processes.
    4. The one-time check (:func:`_check_head`, run by the first call that passes 1-3, per
       causal LM and train/eval mode) found the head reproducing the model's own logits.
       That call still uses the model's logits, so a failed check only costs the saving.
    """
    if max_logit_elements is None:
        return None
    if max_logit_elements < 1:
        raise ValueError(f"max_logit_elements must be >= 1 or None, got {max_logit_elements}")
    head = _find_lm_head(model)
    if head is None:
        return None
    if positions * head.lm.config.get_text_config().vocab_size <= max_logit_elements:
        return None
    configs = (head.lm.config, head.lm.config.get_text_config())
    if any(getattr(c, "tie_last_hidden_states", None) is False for c in configs) or any(
        getattr(c, field, None) is not None for c in configs for field in LOGIT_TRANSFORM_FIELDS
    ):
        return None
    if any(hasattr(p, "ds_id") for p in head.module.parameters()) and _world_size() > 1:
        return None
    return head


def _find_lm_head(model: nn.Module) -> _LMHead | None:
    """The output embeddings under ``model``'s wrappers (None: a critic, FSDP, unknown)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    inner, with_values = model, False
    while not isinstance(inner, PreTrainedModel):
        if isinstance(inner, (FullyShardedDataParallel, FSDPModule, Critic)):
            return None
        if isinstance(inner, PolicyWithValueHead):
            inner, with_values = inner.lm, True
        elif callable(getattr(inner, "get_base_model", None)):
            inner = inner.get_base_model()  # peft
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module  # DDP, DeepSpeed
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod  # torch.compile
        else:
            return None
    head = inner.get_output_embeddings()
    if head is None or isinstance(inner, FSDPModule):
        return None
    return _LMHead(module=head, lm=inner, with_values=with_values)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_head(
    head: _LMHead,
    hidden: Tensor,  # [N, 1, H] the model's last hidden state at its last position
    logits: Tensor,  # [N, 1, V] the model's own logits there
) -> bool:
    """Record and return whether the head module applied to ``hidden`` gives ``logits``
    (assert_close's default tolerances of the coarser dtype; NaN matches NaN), warning when it
    does not.

    NOTE: the check runs once per causal LM and train/eval mode, on one position. It catches
    a transform the config fields do not name, but one that is numerically invisible at that
    position (e.g. a softcap far above these logits) would pass; the config rule is the
    primary guard. Stochastic layers in train mode (e.g. LoRA dropout on the head) fail it.
    """
    with torch.no_grad():
        ours = head.module(hidden.detach())  # [N, 1, V]
    coarse = max((ours.dtype, logits.dtype), key=lambda d: torch.finfo(d).eps)
    rtol, atol = _CHECK_TOLERANCES.get(coarse, (1.3e-6, 1e-5))
    ok = ours.shape == logits.shape and torch.allclose(
        ours.float(), logits.float(), rtol=rtol, atol=atol, equal_nan=True
    )
    _HEAD_CHECKS.setdefault(head.lm, {})[head.lm.training] = ok
    if not ok:
        warnings.warn(
            f"{type(head.lm).__name__}: its output embeddings applied to the last hidden state "
            "do not reproduce its logits; the chunked LM head is not used for this model in "
            f"{'train' if head.lm.training else 'eval'} mode",
            stacklevel=4,
        )
    return ok


def _head_logprobs(
    head: _LMHead,
    hidden: Tensor,  # [N, C, H] last hidden state at the positions predicting targets
    targets: Tensor,  # [N, C] long
    *,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int,
    max_logit_elements: int,
) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logprobs` of ``head.module(hidden)`` without ever holding more than one
    chunk's logits: at most ``chunk_size`` positions and ``max_logit_elements`` logits (at
    least one position). Under autograd each chunk (head, float32 log-softmax, gather,
    entropy) is checkpointed, so backward recomputes its logits instead of keeping them; the
    head's weight (tied or not) gets the sum of the chunks' gradients.

    Returns (logp [N, C] float32, entropy [N, C] float32 or None).
    """
    _check_logprob_args(temperature, chunk_size)

    def chunk_fn(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # [N, c, H], [N, c]
        return _chunk_logprobs(head.module(h), y, temperature, compute_entropy)

    vocab = head.lm.config.get_text_config().vocab_size
    step = max(1, min(chunk_size, max_logit_elements // max(1, hidden.shape[0] * vocab)))
    recompute = torch.is_grad_enabled()
    return _over_chunks(chunk_fn, hidden, targets, step, lambda h: recompute, compute_entropy)
