"""The rollout record, :class:`RolloutBatch`, and the functions that build and combine it.

Shape legend (used across :mod:`grpo_lab.rollout`): B prompts, G samples per prompt
(``group_size``), N = B*G sequences, P prompt tokens (left-padded), C completion tokens
(right-padded), V vocabulary size; lower-case b, n for one chunk of whole groups.

Layout is prompt-major: rows ``[g*G:(g+1)*G]`` of every tensor are the G samples of prompt g.
A completion's mask covers its tokens up to and including the first EOS; everything after is
the pad id with mask 0 (:func:`completion_masks`). ``sampling_logp`` is the log-prob of each
sampled token under ``softmax(logits / temperature)`` of the raw model logits, before top-k /
top-p truncation (see :mod:`grpo_lab.rollout.sampling`).

Owns: :class:`RolloutBatch` (with ``select``, ``to``, ``pad_completions``),
:func:`concat_batches`, :func:`left_pad`, :func:`completion_masks`, :func:`decode_completions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


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


def concat_batches(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """One batch holding the rows of ``batches`` in order (e.g. several rollout rounds of one
    step, or the chunks of one rollout), prompts left-padded and completions right-padded to the
    widest; masked values are unchanged. Every batch must have the same ``group_size``; the
    result has ``values`` only when every batch has them."""
    batches = list(batches)
    sizes = {b.group_size for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"batches must share one group_size, got {sorted(sizes)}")
    p = max(b.prompt_len for b in batches)
    c_len = max(b.completion_len for b in batches)

    def cat(name: str, width: int, value: float, left: bool) -> Tensor:
        parts = []
        for batch in batches:
            t = getattr(batch, name)
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
        truncated=torch.cat([b.truncated for b in batches]),
        group_size=sizes.pop(),
        values=cat("values", c_len, 0.0, left=False)
        if all(b.values is not None for b in batches)
        else None,
    )


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


def decode_completions(tokenizer: Any, batch: RolloutBatch) -> list[str]:
    """Completion texts, up to but excluding the EOS, with special tokens skipped."""
    lengths = batch.completion_lengths - (~batch.truncated).long()  # [N] drop the EOS
    return [
        tokenizer.decode(ids[:n].tolist(), skip_special_tokens=True)
        for ids, n in zip(batch.completion_ids, lengths.tolist())
    ]
