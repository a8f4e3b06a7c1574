"""What every rollout engine shares: the :class:`RolloutBackend` protocol and
:class:`ChunkedBackend`, the common half of grpo_lab's engines.

:class:`ChunkedBackend` checks the arguments, tokenises the prompts, resolves the EOS and pad
ids, cuts the prompts into chunks of whole groups, runs under no grad with the model in eval
mode and its ZeRO-3 parameters gathered once (:mod:`grpo_lab.zero3`), seeds the sampling, and
concatenates the chunks. An engine only turns one chunk of prompts into a
:class:`~grpo_lab.rollout.batch.RolloutBatch` (``generate_chunk``), ending with
:func:`finish_chunk`, which applies the masks every engine shares.

Reproducibility: with ``generator=None`` sampling draws from torch's global RNG, so
``torch.manual_seed(s)`` before a rollout reproduces the same tokens. With a ``generator``, one
seed is drawn from it and sampling runs under that seed in a forked RNG state, leaving the
global RNG untouched. Either way the same seed gives the same tokens only for the same prompts,
``batch_size``, device and library versions (chunks consume the RNG in order). Every engine
with the ``"multinomial"`` sampler consumes the RNG identically, so on bitwise-equal logits
they sample the same tokens.

Values: an engine that sets ``reads_values`` also fills ``RolloutBatch.values`` from a
:class:`ValueReadout`, a hook that reads a value head off the sampling forwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from grpo_lab.rollout.batch import RolloutBatch, completion_masks, concat_batches
from grpo_lab.rollout.sampling import Decoding
from grpo_lab.zero3 import check_generation_model, gather_params_for_generation

Prompts = Sequence[str] | Sequence[Sequence[int]]


class RolloutBackend(Protocol):
    """Anything that turns prompts into a :class:`RolloutBatch`; see
    :func:`grpo_lab.rollout.generate` for the arguments."""

    def generate(
        self,
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
    ) -> RolloutBatch: ...


class ValueReadout:
    """Values V(s_t) = ``value_head(h_t)`` read off the sampling forwards, where h_t is the
    hidden state the LM head receives (the trunk's last, post-norm hidden state: what
    :class:`grpo_lab.models.PolicyWithValueHead` feeds its head).

    A forward pre-hook on the LM head keeps ``value_head(h[:, -1])`` ([n] float32) of the last
    call; :meth:`take` returns it. The decode loop calls the model once per step on the last
    sampled token, so after step s the head has read the state that predicts completion token s:
    the prefill's last prompt position gives V(s_0), the forward of token s-1 gives V(s_s). No
    extra forward and no extra parameter gather: the engine gathers the head with the model.
    """

    def __init__(self, lm: nn.Module, value_head: nn.Module):
        head = lm.get_output_embeddings()
        if head is None:
            raise ValueError("value_head: the model has no LM head to read hidden states from")
        self.value_head = value_head
        self._last: Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._read)

    def _read(self, module: nn.Module, args: tuple) -> None:
        self._last = self.value_head(args[0][:, -1])  # [n, K, H] -> [n]

    def take(self) -> Tensor:  # [n] float32, the values of the last forward
        if self._last is None:
            raise RuntimeError("no forward has reached the LM head since the last take()")
        values, self._last = self._last.float(), None
        return values

    def close(self) -> None:
        self._handle.remove()


class ChunkedBackend:
    """The part every backend shares: argument checks, prompt tokenisation, EOS / pad
    resolution, chunking by whole groups, no grad, the ZeRO-3 gather, seeding and restoring
    train/eval mode. A subclass only turns one chunk of prompts into a :class:`RolloutBatch`.

    A subclass that sets ``reads_values`` also fills :attr:`RolloutBatch.values` from a
    :class:`ValueReadout` passed to its ``generate_chunk``."""

    reads_values = False

    def generate(
        self,
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
        value_head: nn.Module | None = None,
    ) -> RolloutBatch:
        _check_args(group_size, max_new_tokens, temperature, top_p, top_k, batch_size)
        if value_head is not None and not self.reads_values:
            raise ValueError(f"value_head: {type(self).__name__} does not read values")
        lm = _generation_model(model)
        check_generation_model(model, lm)
        prompt_tokens = _tokenize_prompts(tokenizer, prompts)
        eos_ids = _resolve_eos_ids(lm, tokenizer, eos_token_id)
        if not eos_ids and not ignore_eos:
            raise ValueError("eos_token_id: none given and none found on the tokenizer or model")
        decoding = Decoding(
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_ids=tuple(eos_ids),
            pad_id=_resolve_pad_id(tokenizer, eos_ids),
            ignore_eos=ignore_eos,
        )
        device = next(lm.parameters()).device

        prompts_per_chunk = len(prompt_tokens)
        if batch_size is not None:
            prompts_per_chunk = max(1, batch_size // group_size)
        chunks = []
        was_training = lm.training
        lm.eval()
        readout = None
        try:
            # The engine's gather covers a value head read during the rollout: it is part of
            # the engine's module (PolicyWithValueHead), so one collective serves both.
            with torch.no_grad(), gather_params_for_generation(model), _seeded(generator, device):
                readout = None if value_head is None else ValueReadout(lm, value_head)
                extra = {} if readout is None else {"readout": readout}
                for start in range(0, len(prompt_tokens), prompts_per_chunk):
                    chunk = prompt_tokens[start : start + prompts_per_chunk]
                    chunks.append(self.generate_chunk(lm, chunk, decoding, **extra))
        finally:
            if readout is not None:
                readout.close()
            lm.train(was_training)
        return concat_batches(chunks, decoding.pad_id)

    def generate_chunk(
        self, lm: nn.Module, prompt_tokens: list[list[int]], decoding: Decoding
    ) -> RolloutBatch:
        """One chunk of b prompts -> b*G rows; called under no grad with ``lm`` in eval mode
        (engines with ``reads_values`` also take ``readout: ValueReadout | None``)."""
        raise NotImplementedError


def finish_chunk(
    prompt_ids: Tensor,  # [n, P]
    prompt_mask: Tensor,  # [n, P]
    completion: Tensor,  # [n, C] sampled tokens, pad id after a row finished
    logp: Tensor,  # [n, C] float32 sampling log-probs
    decoding: Decoding,
    values: Tensor | None = None,  # [n, C] float32 rollout-time values
) -> RolloutBatch:
    """Masks, re-padding and truncation flags of one chunk (identical for every backend)."""
    if decoding.ignore_eos:
        comp_mask = torch.ones_like(completion)
        truncated = torch.ones(completion.shape[0], dtype=torch.bool, device=completion.device)
    else:
        completion, comp_mask, truncated = completion_masks(
            completion, list(decoding.eos_ids), decoding.pad_id
        )
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion,
        completion_mask=comp_mask,
        sampling_logp=logp.masked_fill(comp_mask == 0, 0.0),
        truncated=truncated,
        group_size=decoding.group_size,
        values=None if values is None else values.masked_fill(comp_mask == 0, 0.0),
    )


def _check_args(group_size, max_new_tokens, temperature, top_p, top_k, batch_size) -> None:
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")


def _generation_model(model: nn.Module) -> nn.Module:
    """The module whose ``generate`` to call: unwrap DDP/DeepSpeed, then ``generation_model``."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "generation_model", model)


def _tokenize_prompts(tokenizer: Any, prompts: Prompts) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("prompts: empty")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("tokenizer: required for string prompts")
        tokens = tokenizer(list(prompts))["input_ids"]
    elif any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: mix of strings and token ids")
    else:
        tokens = [[int(t) for t in p] for p in prompts]
    empty = [i for i, t in enumerate(tokens) if len(t) == 0]
    if empty:
        raise ValueError(f"prompts: prompt(s) {empty} have no tokens")
    return tokens


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _resolve_eos_ids(lm: nn.Module, tokenizer: Any, eos_token_id) -> list[int]:
    if eos_token_id is not None:
        return _as_list(eos_token_id)
    gen_config = getattr(lm, "generation_config", None)
    from_model = _as_list(getattr(gen_config, "eos_token_id", None))
    if from_model:
        return from_model
    return _as_list(getattr(tokenizer, "eos_token_id", None))


def _resolve_pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    if eos_ids:
        return eos_ids[0]
    raise ValueError("tokenizer: no pad_token_id and no eos_token_id to pad with")


@contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run under a seed drawn from ``generator`` in a forked RNG state (no-op when None)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        if cuda_devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
