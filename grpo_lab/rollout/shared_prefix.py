"""The ``"shared_prefix"`` engine: each distinct prompt is prefilled once and its KV cache
shared by its G samples, then a lean decode loop without ``generate``'s per-token machinery.

The default engine of training runs (``rollout.backend``) and of
:func:`grpo_lab.rollout.generate`: the same tokens as ``"hf"`` for the same seed, at 1/G of its
prefill cost, with finished rows dropped from the decode batch. It can read a value head during
the rollout (:class:`~grpo_lab.rollout.base.ValueReadout`).

Owns: :class:`SharedPrefixBackend` and its decode loop, the :class:`Decoder` protocol through
which :class:`~grpo_lab.rollout.static.StaticCacheBackend` swaps the decode step, the
:class:`PreallocatedLayer` KV cache layer (written in place), and :func:`last_logits`, the one
cached model call both engines make.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from grpo_lab.models import position_ids_from_mask
from grpo_lab.rollout.base import ChunkedBackend, ValueReadout, finish_chunk
from grpo_lab.rollout.batch import RolloutBatch, left_pad
from grpo_lab.rollout.sampling import SAMPLERS, Decoding, choose_tokens


class SharedPrefixBackend(ChunkedBackend):
    """Prefill each distinct prompt once, share its KV cache with its G samples, decode in a
    plain loop.

    Per chunk of b prompts: one forward over the b left-padded prompts (positions from the mask,
    as in :func:`grpo_lab.models.completion_forward`, logits of the last position only) fills
    the KV cache; ``batch_repeat_interleave(G)`` then copies each prompt's keys and values to
    its G rows, so prefill costs 1/G of the ``"hf"`` backend's. The cache is a transformers
    ``DynamicCache`` whose full-attention layers are :class:`PreallocatedLayer` (written in
    place, no per-step concatenation). Each decode step is one forward of the n = b*G last
    tokens with the attention mask grown by one column and ``position_ids`` = (real tokens so
    far) - 1, i.e. ``cumsum - 1`` of the mask at the last position.

    Tokens, log-probs, masks and truncation flags follow the ``"hf"`` backend's conventions
    exactly (:mod:`grpo_lab.rollout.batch`, :mod:`grpo_lab.rollout.sampling`): after its first EOS a row is fed the pad id (attention
    mask 1, as ``generate`` does) and the loop stops once every row has emitted an EOS. The
    model's ``generation_config`` is never read.

    Finished rows leave the decode batch: once the unfinished rows are at most ``compact_below``
    of the rows being decoded, the others are dropped from the KV cache and the mask, so later
    steps compute (and read the cache of) live rows only. Sampling still draws for all n rows
    (dropped rows get placeholder logits and the pad id), so the random stream, and with it
    every live row's token, is the same as without dropping.

    Args:
        sampler: how a token is drawn from the truncated distribution. ``"multinomial"``
            (default): ``torch.multinomial``, the same RNG use as ``generate``, so on bitwise
            equal logits both backends draw the same tokens. ``"inverse_cdf"``: one uniform per
            row located in the cumulative distribution (:func:`sample_inverse_cdf`); the same
            distribution from a different random stream, and much cheaper on CPU, where
            ``torch.multinomial`` draws one exponential variate per vocabulary entry.
        compact_below: drop finished rows when the unfinished ones fall to this fraction of
            the decode batch (0 = never; 1 = as soon as any row finishes).

    Models are called as ``lm(input_ids=, attention_mask=, position_ids=, cache=,
    use_cache=True[, logits_to_keep=1])``: transformers 5 names the KV-cache argument ``cache``
    (``past_key_values`` is its deprecated alias). A model that ignores the cache must then
    depend on the last token only (the test mocks do).

    Subclasses change the decode step through :meth:`decoder` (it receives the prefilled cache
    and returns the per-token step); :class:`StaticCacheBackend` is one.
    """

    reads_values = True

    def __init__(self, sampler: str = "multinomial", compact_below: float = 0.75):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: {sampler!r} is not one of {sorted(SAMPLERS)}")
        if not 0.0 <= compact_below <= 1.0:
            raise ValueError(f"compact_below: must be in [0, 1], got {compact_below}")
        self.sampler = sampler
        self.compact_below = compact_below

    def generate_chunk(
        self,
        lm: nn.Module,
        prompt_tokens: list[list[int]],
        decoding: Decoding,
        readout: ValueReadout | None = None,
    ) -> RolloutBatch:
        d, g = decoding, decoding.group_size
        device = next(lm.parameters()).device
        prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompt_tokens, d.pad_id))
        n = prompt_ids.shape[0] * g
        cache = _preallocated_cache(lm, capacity=self.prefill_capacity(prompt_ids.shape[1], d))
        keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(lm) else {}
        logits = last_logits(  # [b, V]
            lm, prompt_ids, prompt_mask, position_ids_from_mask(prompt_mask), cache, **keep
        )
        logits = logits.repeat_interleave(g, dim=0)  # [n, V]
        value = None if readout is None else readout.take().repeat_interleave(g)  # [n]
        values = []  # each [n]
        step_fn = self.decoder(lm, cache, prompt_mask, d)
        eos = torch.tensor(d.eos_ids, dtype=torch.long, device=device)  # [E]
        stop_on_eos = eos.numel() > 0 and not d.ignore_eos
        unfinished = torch.ones(n, dtype=torch.bool, device=device)  # [n]
        rows = None  # [m] the rows still decoded, ascending; None = all n
        tokens, logps = [], []  # each [n]
        for step in range(d.max_new_tokens):
            if step > 0:
                fed = tokens[-1] if rows is None else tokens[-1][rows]
                logits = step_fn(fed, step)  # [m, V]
                value = None if readout is None else readout.take()  # [m]
                if rows is not None:  # dropped rows: placeholder logits, their token is pad
                    logits = logits.new_zeros(n, logits.shape[1]).index_copy_(0, rows, logits)
                    if value is not None:
                        value = value.new_zeros(n).index_copy_(0, rows, value)
            if value is not None:
                values.append(value)
            token, logp = choose_tokens(logits, d, sampler=self.sampler)
            tokens.append(torch.where(unfinished, token, d.pad_id))
            logps.append(logp)
            if stop_on_eos:
                unfinished &= ~torch.isin(tokens[-1], eos)
                alive = int(unfinished.sum())  # one host sync per step, as in generate
                if alive == 0:
                    break
                decoded = n if rows is None else rows.numel()
                if alive <= self.compact_below * decoded and alive < decoded:
                    live = unfinished if rows is None else unfinished[rows]  # [m]
                    step_fn.keep(live.nonzero().squeeze(1))
                    rows = unfinished.nonzero().squeeze(1)
        completion = torch.stack(tokens, dim=1)  # [n, C]
        prompt_ids = prompt_ids.repeat_interleave(g, dim=0)  # [n, P]
        prompt_mask = prompt_mask.repeat_interleave(g, dim=0)
        return finish_chunk(
            prompt_ids,
            prompt_mask,
            completion,
            torch.stack(logps, dim=1),
            d,
            values=torch.stack(values, dim=1) if values else None,
        )

    def prefill_capacity(self, prompt_len: int, decoding: Decoding) -> int:
        """Positions the prefill cache is allocated with: the whole rollout, since this engine
        decodes into the same cache."""
        return prompt_len + decoding.max_new_tokens

    def decoder(
        self,
        lm: nn.Module,
        cache: DynamicCache,  # prefilled with the b prompts
        prompt_mask: Tensor,  # [b, P] long
        decoding: Decoding,
    ) -> Decoder:
        """Repeat the prefilled cache to the n = b*G rows and return the decode step."""
        g = decoding.group_size
        cache.batch_repeat_interleave(g)
        # Every step's mask is a prefix of this one: rows keep attending after their EOS, as
        # generate does; those positions are masked out of the returned completion.
        full_mask = torch.cat(  # [n, P + max_new_tokens]
            [
                prompt_mask.repeat_interleave(g, dim=0),
                prompt_mask.new_ones(prompt_mask.shape[0] * g, decoding.max_new_tokens),
            ],
            dim=1,
        )
        return _CacheDecoder(self, lm, cache, full_mask, prompt_mask.shape[1])

    def decode_step(
        self,
        lm: nn.Module,
        last_tokens: Tensor,  # [n] long
        attention_mask: Tensor,  # [n, L] long, L = tokens in the cache + 1
        cache: DynamicCache,
    ) -> Tensor:  # [n, V] float32 logits for the next token
        """One cached forward of the last sampled tokens."""
        positions = attention_mask.sum(dim=1, keepdim=True) - 1  # [n, 1] == (cumsum - 1)[:, -1:]
        return last_logits(lm, last_tokens[:, None], attention_mask, positions, cache)


class Decoder(Protocol):
    """A chunk's decode step, made by :meth:`SharedPrefixBackend.decoder`."""

    def __call__(self, last_tokens: Tensor, s: int) -> Tensor:
        """Token s-1 of the m rows being decoded ([m] long) -> [m, V] float32 logits for
        completion token s (s >= 1)."""
        ...

    def keep(self, index: Tensor) -> None:
        """Keep only rows ``index`` ([m'] long, ascending) of those being decoded; called only
        by backends with ``compact_below > 0`` (a fixed-shape step need not have it)."""
        ...


class _CacheDecoder:
    """Decode steps over the shared-prefix backend's growing cache (see :class:`Decoder`)."""

    def __init__(
        self,
        backend: SharedPrefixBackend,
        lm: nn.Module,
        cache: DynamicCache,
        full_mask: Tensor,  # [n, P + max_new_tokens] long
        prompt_len: int,
    ):
        self.backend, self.lm, self.cache = backend, lm, cache
        self.full_mask, self.prompt_len = full_mask, prompt_len

    def __call__(self, last_tokens: Tensor, s: int) -> Tensor:  # [m] -> [m, V]
        mask = self.full_mask[:, : self.prompt_len + s]
        return self.backend.decode_step(self.lm, last_tokens, mask, self.cache)

    def keep(self, index: Tensor) -> None:  # [m'] long
        self.cache.batch_select_indices(index)
        self.full_mask = self.full_mask[index]


class PreallocatedLayer(DynamicLayer):
    """A full-attention KV cache layer whose keys/values live in buffers of ``capacity``
    positions allocated at the first update, so a decode step writes one position in place
    instead of copying the whole cache (``DynamicLayer`` concatenates: O(L^2) copies overall).

    ``keys`` / ``values`` are views of the first ``length`` positions, [batch, heads, length,
    head_dim] like a ``DynamicLayer``'s. Updates past ``capacity`` raise.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer: Tensor | None = None  # [batch, heads, capacity, head_dim]
        self._value_buffer: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, _ = key_states.shape
        self._key_buffer = key_states.new_empty(batch, heads, self.capacity, key_states.shape[-1])
        self._value_buffer = value_states.new_empty(
            batch, heads, self.capacity, value_states.shape[-1]
        )
        self.is_initialized = True

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot hold {end}")
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:  # [m] long
        if not self.is_initialized:
            return
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self._refresh_views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        # NOTE: only the filled positions are copied; the new buffers' tails stay uninitialised.
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(old.shape[0] * repeats, *old.shape[1:])
            new[:, :, : self.length] = old[:, :, : self.length].repeat_interleave(repeats, dim=0)
            setattr(self, name, new)
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.length]
        self.values = self._value_buffer[:, :, : self.length]


def _preallocated_cache(lm: nn.Module, capacity: int) -> DynamicCache:
    """The model's ``DynamicCache`` with every plain full-attention layer preallocated to
    ``capacity`` positions (sliding-window and other special layers keep their own class)."""
    cache = DynamicCache(config=getattr(lm, "config", None))
    if cache.layer_class_to_replicate is DynamicLayer:  # no config: layers are added lazily
        cache.layer_class_to_replicate = lambda: PreallocatedLayer(capacity)
    cache.layers = [
        PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def last_logits(
    lm: nn.Module,
    input_ids: Tensor,  # [n, L_new]
    attention_mask: Tensor,  # [n, L_cached + L_new]
    position_ids: Tensor,  # [n, L_new]
    cache: DynamicCache,
    **kwargs,
) -> Tensor:  # [n, V] float32, the logits after the last input token
    """One forward of the new tokens over ``cache`` (which it extends); only the last
    position's logits are returned, in float32."""
    out = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        **kwargs,
    )
    return out.logits[:, -1].float()


def _accepts_logits_to_keep(lm: nn.Module) -> bool:
    """Whether the underlying model's forward takes ``logits_to_keep`` (peft forwards it)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "logits_to_keep" in inspect.signature(base.forward).parameters
