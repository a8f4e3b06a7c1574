"""Choosing each next token: the decoding settings of a rollout and one step's draw.

Sampling order, shared by every engine (transformers' warper order): logits in float32 ->
EOS banned (``ignore_eos`` only) -> ``sampling_logp`` recorded -> divide by the temperature ->
top-k -> top-p -> softmax -> one draw per sequence per step, also for sequences that already
finished (their token is replaced by the pad id). The draw is ``torch.multinomial`` (as in
transformers ``generate``) or, for grpo_lab's own engines, inverse CDF (same distribution,
another random stream); see :data:`SAMPLERS`.

``sampling_logp`` is taken under ``softmax(logits / temperature)`` before truncation, so it
equals what :func:`grpo_lab.models.completion_forward` computes for the same tokens; greedy
decoding (temperature 0) takes it at temperature 1.

Owns: :class:`Decoding`, :func:`choose_tokens`, :func:`truncate_logits`,
:func:`sample_multinomial`, :func:`sample_inverse_cdf`, :data:`SAMPLERS`. Stopping at EOS
(masks through the first EOS) is :func:`grpo_lab.rollout.batch.completion_masks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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
