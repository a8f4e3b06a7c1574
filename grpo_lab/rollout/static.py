"""The ``"static"`` and ``"compiled"`` engines: the shared-prefix prefill, then decode steps of
one fixed shape over a static KV cache with a ready-made 4D mask.

Both are :class:`StaticCacheBackend`; ``"compiled"`` is the same class with ``compile=True``,
which runs the fixed-shape step under ``torch.compile``. ``"compiled"`` is meant for CUDA, where
each step replays as one CUDA graph (no per-kernel launch cost); on CPU inductor's step is
slower than eager (``benchmarks/RESULTS.md``). ``"static"`` is its eager twin: the same tokens,
for checking it, and about as fast as ``"shared_prefix"`` on CPU. ``"static"`` can read a value
head during the rollout; ``"compiled"`` cannot (the captured graph would not run the hook) and
does not run under ZeRO-3. Attention must be ``sdpa`` or ``eager``.

Owns: :class:`StaticCacheBackend`, the :class:`StaticSlotLayer` KV cache layer (fixed shape,
written at a cursor) and the 4D attention mask each implementation takes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from grpo_lab.rollout.base import ValueReadout
from grpo_lab.rollout.batch import RolloutBatch
from grpo_lab.rollout.sampling import Decoding
from grpo_lab.rollout.shared_prefix import Decoder, SharedPrefixBackend, last_logits


class StaticCacheBackend(SharedPrefixBackend):
    """The shared-prefix engine with fixed-shape decode steps, ready for ``torch.compile`` and
    CUDA graphs.

    Prefill is the shared-prefix one (eager: prompt lengths vary). Its keys/values are then
    copied, repeated G times, into a static cache of ``capacity`` = P + max_new_tokens rounded
    up to a multiple of ``capacity_multiple`` positions (:class:`StaticSlotLayer`). Every decode
    step then has the same shapes and buffers: input ids [n, 1], position ids [n, 1], a
    ready-made 4D attention mask [n, 1, 1, capacity] over the whole buffer (true on real prompt
    tokens and on the positions written so far; transformers' own mask construction, a large
    share of a small model's per-token Python time, is skipped), and the cache, which each
    layer writes at its cursor in place. Attention runs over all ``capacity`` slots (masked
    ones count nothing), trading a little arithmetic for a step whose shapes never change.

    Args:
        sampler: as for :class:`SharedPrefixBackend`.
        compile: run the decode step through ``torch.compile``: ``mode="reduce-overhead"``
            (CUDA graphs: one replay per token, no per-kernel launch cost) on CUDA, the default
            inductor mode elsewhere. The first call per (model, rows, capacity) compiles; the
            cache buffers are then kept between calls (fixed addresses, as CUDA graphs need),
            costing 2 x layers x n x kv_heads x capacity x head_dim elements of memory while
            training runs. Not for ZeRO-3 (parameters are gathered per rollout, their storage
            changes).
        capacity_multiple: rounding of the cache length, so prompts of slightly different
            lengths reuse one compiled step.

    Same tokens, masks and log-probs as the other backends (tested against ``"hf"``: greedy
    tokens identical, sampled tokens identical on exact logits, log-probs to float tolerance).
    Supports the ``sdpa`` and ``eager`` attention implementations, which take a ready 4D mask;
    others raise a ``ValueError``.
    """

    def __init__(
        self, sampler: str = "multinomial", compile: bool = False, capacity_multiple: int = 32
    ):
        super().__init__(sampler, compact_below=0.0)  # fixed shapes: no row dropping
        if capacity_multiple < 1:
            raise ValueError(f"capacity_multiple must be >= 1, got {capacity_multiple}")
        self.compile = compile
        # The compiled step's graph would not run the readout's hook (the eager step does).
        self.reads_values = not compile
        self.capacity_multiple = capacity_multiple
        self._compiled_forward: Callable | None = None
        self._kept: tuple[tuple, DynamicCache] | None = None  # (key, cache) when compiling

    def generate_chunk(
        self,
        lm: nn.Module,
        prompt_tokens: list[list[int]],
        decoding: Decoding,
        readout: ValueReadout | None = None,
    ) -> RolloutBatch:
        _attention_mask_4d(lm, torch.ones(1, 1, 1, 1, dtype=torch.bool))  # fail before prefill
        return super().generate_chunk(lm, prompt_tokens, decoding, readout)

    def prefill_capacity(self, prompt_len: int, decoding: Decoding) -> int:
        """The prompt only: decoding happens in the static cache the prefill is copied to."""
        return prompt_len

    def decoder(
        self,
        lm: nn.Module,
        cache: DynamicCache,  # prefilled with the b prompts
        prompt_mask: Tensor,  # [b, P] long
        decoding: Decoding,
    ) -> Decoder:
        g, p = decoding.group_size, prompt_mask.shape[1]
        n = prompt_mask.shape[0] * g
        capacity = -(-(p + decoding.max_new_tokens) // self.capacity_multiple)
        capacity *= self.capacity_multiple
        static = self._static_cache(lm, cache, n, capacity)
        for layer, prefilled in zip(static.layers, cache.layers, strict=True):
            if isinstance(layer, StaticSlotLayer):
                layer.load_prefix(prefilled.keys, prefilled.values, repeats=g)
        attend = torch.zeros(n, 1, 1, capacity, dtype=torch.bool, device=prompt_mask.device)
        attend[:, 0, 0, :p] = prompt_mask.repeat_interleave(g, dim=0).bool()
        mask = _attention_mask_4d(lm, attend)  # [n, 1, 1, capacity], updated in place
        open_value = mask.new_ones(()) if mask.dtype == torch.bool else mask.new_zeros(())
        # Position of the token fed at step s: (real prompt tokens) + s - 1.
        positions = prompt_mask.sum(dim=1).repeat_interleave(g)[:, None] - 1  # [n, 1]
        forward = self._forward()

        def step(last_tokens: Tensor, s: int) -> Tensor:  # [n] -> [n, V]
            mask[:, :, :, p + s - 1] = open_value  # the slot the fed token is written to
            positions.add_(1)
            return forward(lm, last_tokens[:, None], mask, positions, static)

        return step

    def _forward(self) -> Callable:
        if not self.compile:
            return last_logits
        if self._compiled_forward is None:
            on_cuda = torch.cuda.is_available()
            compiled = torch.compile(
                last_logits, mode="reduce-overhead" if on_cuda else None, dynamic=False
            )

            def forward(*args) -> Tensor:
                if on_cuda:  # each replay may overwrite the last one's outputs: clone them
                    torch.compiler.cudagraph_mark_step_begin()
                    return compiled(*args).clone()
                return compiled(*args)

            self._compiled_forward = forward
        return self._compiled_forward

    def _static_cache(
        self, lm: nn.Module, prefilled: DynamicCache, n: int, capacity: int
    ) -> DynamicCache:
        """A cache with one :class:`StaticSlotLayer` per prefilled layer (layers the model
        left empty stay as they are). Compiled steps reuse the last one with the same layout."""
        layout = tuple(  # per layer: (key heads, key dim), (value heads, value dim), dtype
            (
                (layer.keys.shape[1], layer.keys.shape[-1]),
                (layer.values.shape[1], layer.values.shape[-1]),
                layer.keys.dtype,
            )
            if layer.is_initialized
            else None
            for layer in prefilled.layers
        )
        device = next(lm.parameters()).device
        key = (id(lm), n, capacity, layout, device)
        if self.compile and self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        static = DynamicCache(config=getattr(lm, "config", None))
        static.layers = [
            StaticSlotLayer(n, capacity, spec, device) if spec is not None else layer
            for spec, layer in zip(layout, prefilled.layers, strict=True)
        ]
        if self.compile:
            self._kept = (key, static)
        return static


class StaticSlotLayer(DynamicLayer):
    """A KV cache layer of fixed shape [n, heads, capacity, head_dim] written at a cursor.

    ``update`` writes the new keys/values at positions ``cursor, cursor+1, ...`` in place and
    returns the WHOLE buffers, so attention always sees ``capacity`` positions and the caller's
    4D mask hides the unwritten ones. The cursor is a 0-dim tensor advanced in place, so a
    captured step (CUDA graph) replays correctly. Buffers start at zero: a masked slot then never
    holds a non-finite value that could leak through ``0 * inf`` in attention.
    """

    is_compileable = True

    def __init__(
        self,
        n: int,
        capacity: int,
        spec: tuple[tuple[int, int], tuple[int, int], torch.dtype],  # (heads, dim) of k, v
        device: torch.device,
    ):
        super().__init__()
        ((k_heads, k_dim), (v_heads, v_dim), dtype), self.capacity = spec, capacity
        self.keys = torch.zeros(n, k_heads, capacity, k_dim, dtype=dtype, device=device)
        self.values = torch.zeros(n, v_heads, capacity, v_dim, dtype=dtype, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)
        self.device, self.is_initialized = device, True
        if not torch.compiler.is_compiling():  # fixed addresses: no graph break, no re-capture
            for t in (self.keys, self.values, self.cursor):
                torch._dynamo.mark_static_address(t)

    def load_prefix(
        self,
        keys: Tensor,  # [b, heads, P, head_dim]
        values: Tensor,  # [b, heads, P, head_dim]
        repeats: int,
    ) -> None:
        """Copy a prefilled prompt cache, each row repeated ``repeats`` times; cursor = P."""
        length = keys.shape[2]
        if length > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot hold {length}")
        self.keys[:, :, :length] = keys.repeat_interleave(repeats, dim=0)
        self.values[:, :, :length] = values.repeat_interleave(repeats, dim=0)
        self.cursor.fill_(length)

    def update(
        self, key_states: Tensor, value_states: Tensor, *args, **kwargs
    ) -> tuple[Tensor, Tensor]:
        slots = self.cursor + torch.arange(key_states.shape[-2], device=self.cursor.device)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.cursor.add_(key_states.shape[-2])
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.capacity, 0


def _attention_mask_4d(lm: nn.Module, attend: Tensor) -> Tensor:  # [n,1,1,L] bool -> same shape
    """The ready-made 4D mask the model's attention implementation takes: boolean (true =
    attend) for ``sdpa``, additive float (0 / dtype minimum) for ``eager``."""
    config = getattr(lm, "config", None)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return attend
    if impl == "eager":
        dtype = next(lm.parameters()).dtype
        return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill(
            ~attend, torch.finfo(dtype).min
        )
    raise ValueError(
        f"backend: the static-cache engine supports the 'sdpa' and 'eager' attention "
        f"implementations, not {impl!r}; use backend 'shared_prefix'"
    )
