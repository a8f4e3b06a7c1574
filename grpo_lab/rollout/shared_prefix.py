"""Rollout engine: prompts -> G sampled completions per prompt, with masks and sampling log-probs.

Shape legend: B prompts, G samples per prompt (``group_size``), N = B*G sequences, P prompt
tokens (left-padded), C completion tokens (right-padded), V vocabulary size; lower-case b, n for
one chunk of whole groups.

Layout is prompt-major: rows ``[g*G:(g+1)*G]`` of every tensor are the G samples of prompt g.
A completion's mask covers its tokens up to and including the first EOS; everything after is
the pad id with mask 0. ``sampling_logp`` is the log-prob of each sampled token under
``softmax(logits / temperature)`` of the raw model logits, i.e. before top-k / top-p truncation,
so it equals what :func:`grpo_lab.models.completion_forward` computes for the same batch (greedy
decoding uses temperature 1; ``ignore_eos`` is the one exception, see :func:`generate`).

Sampling order, shared by every backend (transformers' warper order): logits in float32 ->
EOS banned (``ignore_eos`` only) -> ``sampling_logp`` recorded -> divide by the temperature ->
top-k -> top-p -> softmax -> one ``torch.multinomial`` draw per sequence per step, also for
sequences that already finished (their token is replaced by the pad id). The shared-prefix
backend can instead draw by inverse CDF (same distribution, another random stream).

Reproducibility: with ``generator=None`` sampling draws from torch's global RNG, so
``torch.manual_seed(s)`` before :func:`generate` reproduces the same tokens. With a
``generator``, one seed is drawn from it and sampling runs under that seed in a forked RNG state,
leaving the global RNG untouched. Either way the same seed gives the same tokens only for the same
prompts, ``batch_size``, device and library versions (chunks consume the RNG in order). Both
backends consume the RNG identically, so on bitwise-equal logits they sample the same tokens.

Backends sit behind the narrow :class:`RolloutBackend` protocol and are named in
:data:`ROLLOUT_BACKENDS`:

- ``"hf"``, :class:`HFGenerateBackend`: transformers ``generate`` (dynamic KV cache).
- ``"shared_prefix"``, :class:`SharedPrefixBackend`: each distinct prompt is prefilled once and
  its KV cache shared by its G samples; a lean decode loop without ``generate``'s per-token
  machinery.
- ``"static"``, :class:`StaticCacheBackend`: the shared-prefix prefill, then decode steps of one
  fixed shape over a static KV cache with a ready-made 4D mask.
- ``"compiled"``: ``"static"`` with the decode step under ``torch.compile`` (CUDA graphs on a
  GPU).

A vLLM-style engine plugs in the same way: anything with :class:`RolloutBackend`'s ``generate``
can be passed as ``backend=``.

Values: ``shared_prefix`` and ``static`` can also read a value head on the sampling trunk as they
go (``generate(..., value_head=)``, :class:`ValueReadout`, :func:`reads_values`), filling
``RolloutBatch.values`` without a forward pass of their own; ``hf`` and ``compiled`` cannot.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from grpo_lab.models import position_ids_from_mask
from grpo_lab.zero3 import check_generation_model, gather_params_for_generation

Prompts = Sequence[str] | Sequence[Sequence[int]]


@dataclass
class RolloutBatch:
    """N = B*G sequences, prompt-major: rows [g*G:(g+1)*G] are the G samples of prompt g."""

    prompt_ids: Tensor  # [N, P] long, left-padded with the pad id
    prompt_mask: Tensor  # [N, P] long, 1 on real prompt tokens
    completion_ids: Tensor  # [N, C] long, pad id after the first EOS
    completion_mask: Tensor  # [N, C] long, 1 up to and including the first EOS, 0 after
    sampling_logp: Tensor  # [N, C] float32, log-prob under softmax(logits / T); 0 where mask is 0
    truncated: Tensor  # [N] bool, no EOS within max_new_tokens
    group_size: int  # G of the rollout; rows of a `select`ed subset keep this value
    # [N, C] float32 V(s_t) read at rollout time by a value head on the sampling trunk (see
    # `generate`'s ``value_head``); 0 where the mask is 0; None when not read
    values: Tensor | None = None

    @property
    def input_ids(self) -> Tensor:  # [N, P+C]
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:  # [N, P+C]
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @property
    def completion_lengths(self) -> Tensor:  # [N] long, EOS included
        return self.completion_mask.sum(dim=1)

    @property
    def num_sequences(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def completion_len(self) -> int:
        return self.completion_ids.shape[1]

    def to(self, device: torch.device | str) -> RolloutBatch:
        return self._map(lambda t: t.to(device))

    def select(self, index: Tensor | slice) -> RolloutBatch:
        """Rows ``index`` (e.g. a minibatch). ``group_size`` keeps the rollout's G: the subset
        holds whole groups only if the caller selects them so (e.g. a slice of k*G rows at a
        multiple of G)."""
        return self._map(lambda t: t[index])

    def pad_completions(self, length: int, pad_id: int) -> RolloutBatch:
        """The same batch with its completions right-padded to ``length`` >= C columns (pad id,
        mask 0, log-prob 0): every masked quantity is unchanged. Used to give every
        data-parallel rank the same C, hence the same sequence of model calls."""
        extra = length - self.completion_len
        if extra < 0:
            raise ValueError(
                f"length: {length} is shorter than the completions ({self.completion_len})"
            )
        if extra == 0:
            return self
        n = self.num_sequences
        ids = self.completion_ids.new_full((n, extra), pad_id)
        return RolloutBatch(
            prompt_ids=self.prompt_ids,
            prompt_mask=self.prompt_mask,
            completion_ids=torch.cat([self.completion_ids, ids], dim=1),
            completion_mask=torch.cat([self.completion_mask, torch.zeros_like(ids)], dim=1),
            sampling_logp=torch.cat(
                [self.sampling_logp, self.sampling_logp.new_zeros(n, extra)], dim=1
            ),
            truncated=self.truncated,
            group_size=self.group_size,
            values=None
            if self.values is None
            else torch.cat([self.values, self.values.new_zeros(n, extra)], dim=1),
        )

    def _map(self, fn) -> RolloutBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{k: fn(v) if isinstance(v, Tensor) else v for k, v in values.items()})


class RolloutBackend(Protocol):
    """Anything that turns prompts into a :class:`RolloutBatch`; see :func:`generate`."""

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


class _SampledLogProbRecorder(LogitsProcessor):
    """Records log-softmax(logits / T) of each sampled token without keeping [N, C, V] logits.

    transformers calls custom processors with the raw logits of step t after the built-in
    processors (only the EOS suppression of ``min_new_tokens``, given the config we pass) and
    before the temperature / top-k / top-p warpers. At that call ``input_ids`` ends with the
    token sampled at step t-1, so the previous step's distribution can be gathered and dropped;
    only one [N, V] float32 tensor is held at a time (``output_logits=True`` would keep C of them).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.step_logp: list[Tensor] = []  # each [N]
        self._pending: Tensor | None = None  # [N, V]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._pending is not None:
            self.step_logp.append(self._gather(input_ids[:, -1]))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _gather(self, tokens: Tensor) -> Tensor:  # tokens [N] -> [N]
        return self._pending.gather(1, tokens[:, None]).squeeze(1)

    def finish(self, completion_ids: Tensor) -> Tensor:  # [N, C] -> [N, C] float32
        # NOTE: transformers may run a step past the stop and then undo it, so more steps than
        # kept tokens can have been recorded; the first C are the kept ones.
        c = completion_ids.shape[1]
        logp = self.step_logp[:c]
        if len(logp) < c:
            logp.append(self._gather(completion_ids[:, len(logp)]))
        if len(logp) != c:
            raise RuntimeError(f"recorded {len(logp)} sampling steps for {c} completion tokens")
        return torch.stack(logp, dim=1)


@dataclass(frozen=True)
class Decoding:
    """The resolved settings of one rollout, shared by all of its chunks."""

    group_size: int
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float  # 1.0 = off
    top_k: int | None  # None = off
    eos_ids: tuple[int, ...]  # empty only with ignore_eos
    pad_id: int
    ignore_eos: bool

    @property
    def logp_temperature(self) -> float:
        """The temperature of ``sampling_logp``: 1 for greedy decoding."""
        return self.temperature if self.temperature > 0 else 1.0


def choose_tokens(
    logits: Tensor, decoding: Decoding, *, sampler: str = "multinomial"
) -> tuple[Tensor, Tensor]:
    """Next tokens and their ``sampling_logp`` from one step's logits (order: module docstring).

    Args:
        logits: [n, V] raw next-token logits (any float dtype; the math runs in float32).
        sampler: a name in :data:`SAMPLERS`; unused for greedy decoding.
    Returns:
        (tokens [n] long, logp [n] float32 under ``softmax(logits / logp_temperature)``, with
        EOS banned first under ``ignore_eos``). Greedy (temperature 0) takes the first argmax.
    """
    d = decoding
    scaled = logits.float() / d.logp_temperature  # a new tensor: the in-place ban is safe
    if d.ignore_eos and d.eos_ids:
        # Banning after the division is the same as before it: -inf / T = -inf.
        eos = torch.tensor(d.eos_ids, dtype=torch.long, device=scaled.device)
        scaled.index_fill_(1, eos, -math.inf)
    if d.temperature > 0:
        probs = torch.softmax(truncate_logits(scaled, top_k=d.top_k, top_p=d.top_p), dim=-1)
        tokens = SAMPLERS[sampler](probs)
    else:
        tokens = scaled.argmax(dim=-1)  # greedy: scaled = logits / 1.0, bitwise the logits
    logp = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logp


def truncate_logits(scores: Tensor, *, top_k: int | None, top_p: float) -> Tensor:
    """Top-k, then top-p, with removed entries set to -inf (transformers' warper semantics,
    one token always kept).

    Top-k keeps every token whose score is >= the k-th largest (so ties with it survive).
    Top-p sorts the survivors by ascending score and drops each token whose cumulative
    probability up to and including it is <= ``1 - top_p``; the most likely token always stays.

    Args:
        scores: [n, V] float, already divided by the temperature.
    Returns:
        [n, V] scores with the removed tokens at -inf.
    """
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # [n, 1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        ascending, order = scores.sort(dim=-1)  # [n, V] each
        mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = mass_up_to <= 1.0 - top_p
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def sample_multinomial(probs: Tensor) -> Tensor:  # [n, V] -> [n] long
    """One ``torch.multinomial`` draw per row (global RNG), as transformers ``generate``."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def sample_inverse_cdf(probs: Tensor) -> Tensor:  # [n, V] -> [n] long
    """One uniform draw u per row (global RNG); the token is the first whose cumulative
    probability exceeds u times the row total. Tokens of probability 0 are never drawn.

    NOTE: u * total can round up to the total itself, which no cumulative value exceeds; u is
    therefore capped at the largest float below the total.
    """
    cdf = probs.cumsum(dim=-1)  # [n, V]
    total = cdf[:, -1:]  # [n, 1]
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


# How a token is drawn from a row of (truncated) probabilities: [n, V] -> [n] long.
SAMPLERS = {"multinomial": sample_multinomial, "inverse_cdf": sample_inverse_cdf}


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


def reads_values(backend: str | RolloutBackend) -> bool:
    """Whether ``backend`` can read a value head during the rollout (``generate``'s
    ``value_head``); a caller that needs values from another engine runs its own forward."""
    return bool(getattr(resolve_backend(backend), "reads_values", False))


class _ChunkedBackend:
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
        return _concat_chunks(chunks, decoding.pad_id, group_size)

    def generate_chunk(
        self, lm: nn.Module, prompt_tokens: list[list[int]], decoding: Decoding
    ) -> RolloutBatch:
        """One chunk of b prompts -> b*G rows; called under no grad with ``lm`` in eval mode
        (engines with ``reads_values`` also take ``readout: ValueReadout | None``)."""
        raise NotImplementedError


class HFGenerateBackend(_ChunkedBackend):
    """Rollouts with transformers ``generate`` (dynamic KV cache, one chunk at a time).

    Each prompt is repeated G times before ``generate``, so its prefill runs G times.
    """

    def generate_chunk(
        self, lm: nn.Module, prompt_tokens: list[list[int]], decoding: Decoding
    ) -> RolloutBatch:
        d = decoding
        device = next(lm.parameters()).device
        ids, mask = left_pad(prompt_tokens, d.pad_id)  # [b, P]
        ids = ids.repeat_interleave(d.group_size, dim=0).to(device)  # [n, P], prompt-major
        mask = mask.repeat_interleave(d.group_size, dim=0).to(device)
        recorder = _SampledLogProbRecorder(d.logp_temperature)
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=_generation_config(d),
            logits_processor=LogitsProcessorList([recorder]),
            # The parameters are gathered for the whole rollout (ZeRO-3 hooks paused): a rank
            # stops when its own rows finish, with no per-token all-reduce to wait for the others.
            synced_gpus=False,
        )
        completion = out.sequences[:, ids.shape[1] :]  # [n, C]
        return _finish_chunk(ids, mask, completion, recorder.finish(completion), d)


class SharedPrefixBackend(_ChunkedBackend):
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
    exactly (see the module docstring): after its first EOS a row is fed the pad id (attention
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
        logits = _last_logits(  # [b, V]
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
        return _finish_chunk(
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
        return _last_logits(lm, last_tokens[:, None], attention_mask, positions, cache)


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
            return _last_logits
        if self._compiled_forward is None:
            on_cuda = torch.cuda.is_available()
            compiled = torch.compile(
                _last_logits, mode="reduce-overhead" if on_cuda else None, dynamic=False
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
    backend: str | RolloutBackend = "hf",
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
        generator: see the module docstring on reproducibility.
        backend: a name in :data:`ROLLOUT_BACKENDS` (``"hf"`` or ``"shared_prefix"``) or any
            :class:`RolloutBackend`.
        value_head: a module [n, H] -> [n] (a :class:`grpo_lab.models.ValueHead` on this
            model's trunk) read during the rollout into ``RolloutBatch.values``, saving a value
            model's no-grad forward; only for engines where :func:`reads_values` is true
            (``shared_prefix``, ``static``), others raise ``ValueError``.

    Explicit values replace the model's ``generation_config`` for temperature, top-k/p,
    typical-p, repetition penalty, n-gram ban and minimum length (checkpoints often ship e.g.
    ``top_k=20``), so results do not depend on it; ``"shared_prefix"`` never reads it.
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


def decode_completions(tokenizer: Any, batch: RolloutBatch) -> list[str]:
    """Completion texts, up to but excluding the EOS, with special tokens skipped."""
    lengths = batch.completion_lengths - (~batch.truncated).long()  # [N] drop the EOS
    return [
        tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
        for ids, n in zip(batch.completion_ids, lengths.tolist())
    ]


def completion_masks(
    completion_ids: Tensor, eos_ids: list[int], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask through the first EOS and re-pad after it.

    Args:
        completion_ids: [N, C] sampled tokens.
    Returns:
        (completion_ids [N, C] with pad id after the first EOS, mask [N, C] long with ones up to
        and including the first EOS, truncated [N] bool: no EOS at all).
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS count strictly before t
    mask = (eos_before == 0).long()
    return completion_ids.masked_fill(mask == 0, pad_id), mask, ~is_eos.any(dim=1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None):
    """Left-pad token lists to ``length`` (default: the longest).

    Returns (ids [n, length] long, mask [n, length] long with ones on real tokens).
    """
    length = max(len(s) for s in sequences) if length is None else length
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, length - len(seq) :] = 1
    return ids, mask


def _finish_chunk(
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


def _last_logits(
    lm: nn.Module,
    input_ids: Tensor,  # [n, L_new]
    attention_mask: Tensor,  # [n, L_cached + L_new]
    position_ids: Tensor,  # [n, L_new]
    cache: DynamicCache,
    **kwargs,
) -> Tensor:  # [n, V] float32, the logits after the last input token
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


def _concat_chunks(chunks: list[RolloutBatch], pad_id: int, group_size: int) -> RolloutBatch:
    p = max(c.prompt_len for c in chunks)
    c_len = max(c.completion_len for c in chunks)

    def cat(name: str, width: int, value: float, left: bool) -> Tensor:
        parts = []
        for chunk in chunks:
            t = getattr(chunk, name)
            extra = width - t.shape[1]
            pad = (extra, 0) if left else (0, extra)
            parts.append(torch.nn.functional.pad(t, pad, value=value))
        return torch.cat(parts, dim=0)

    return RolloutBatch(
        prompt_ids=cat("prompt_ids", p, pad_id, left=True),
        prompt_mask=cat("prompt_mask", p, 0, left=True),
        completion_ids=cat("completion_ids", c_len, pad_id, left=False),
        completion_mask=cat("completion_mask", c_len, 0, left=False),
        sampling_logp=cat("sampling_logp", c_len, 0.0, left=False),
        truncated=torch.cat([c.truncated for c in chunks]),
        group_size=group_size,
        values=cat("values", c_len, 0.0, left=False)
        if all(c.values is not None for c in chunks)
        else None,
    )


def concat_batches(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch holding the rows of ``batches`` in order (e.g. several rollout rounds of one
    step), prompts left-padded and completions right-padded to the widest; masked values are
    unchanged. Every batch must have the same ``group_size``."""
    sizes = {b.group_size for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"batches must share one group_size, got {sorted(sizes)}")
    return _concat_chunks(list(batches), pad_id, sizes.pop())


def _generation_config(d: Decoding) -> GenerationConfig:
    # NOTE: transformers fills every None field from the model's generation_config and then from
    # global defaults (top_k=50), so "off" must be spelled out: top_k=0, top_p=1.0, penalties 1.0.
    sample = d.temperature > 0
    return GenerationConfig(
        max_new_tokens=d.max_new_tokens,
        min_new_tokens=d.max_new_tokens if d.ignore_eos else None,
        do_sample=sample,
        temperature=d.temperature if sample else 1.0,
        top_p=d.top_p if sample else 1.0,
        top_k=(d.top_k or 0) if sample else None,  # greedy never applies top-k
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=None if d.ignore_eos else 0,  # min_new_tokens overrides it
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=list(d.eos_ids) or None,
        pad_token_id=d.pad_id,
        use_cache=True,
        return_dict_in_generate=True,
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
