"""Token log-probs and entropy from logits, a chunk of positions at a time.

:func:`token_logprobs` reduces logits [N, C, V] to the float32 log-prob of each target token
under softmax(logits / T), and optionally the entropy of that distribution
(:func:`grpo_lab.algos.entropy_from_logprobs`), without ever holding an [N, C, V] float32 copy:
it works on chunks of positions, each checkpointed under autograd. :func:`_over_chunks` is the
loop it shares with the chunked LM head (:mod:`grpo_lab.models.chunked_head`), which feeds it
hidden states instead of logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from grpo_lab.algos import entropy_from_logprobs


def _over_chunks(
    chunk_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    inputs: Tensor,  # [N, C, ...] logits or hidden states
    targets: Tensor,  # [N, C] long
    step: int,
    recompute: Callable[[Tensor], bool],
    compute_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """``chunk_fn`` over ``step`` positions at a time, checkpointed (non-reentrant) where
    ``recompute(chunk)`` says so; (logp [N, C], entropy [N, C] or None), concatenated."""
    logps, entropies = [], []
    for start in range(0, inputs.shape[1], step):
        x, y = inputs[:, start : start + step], targets[:, start : start + step]
        if recompute(x):
            logp, ent = checkpoint(chunk_fn, x, y, use_reentrant=False)
        else:
            logp, ent = chunk_fn(x, y)
        logps.append(logp)
        entropies.append(ent)
    entropy = torch.cat(entropies, dim=1) if compute_entropy else None
    return torch.cat(logps, dim=1), entropy


def _check_logprob_args(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunk_logprobs(
    z: Tensor,  # [N, c, V] logits, any float dtype
    y: Tensor,  # [N, c] long
    temperature: float,
    compute_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """(logp [N, c], entropy [N, c] or a 0-d placeholder), float32, of softmax(z / T)."""
    z_logp = torch.log_softmax(z.float() / temperature, dim=-1)  # [N, c, V]
    logp = z_logp.gather(-1, y[..., None]).squeeze(-1)
    if not compute_entropy:
        return logp, logp.new_zeros(())
    return logp, entropy_from_logprobs(z_logp)


def token_logprobs(
    logits: Tensor,  # [N, C, V] any float dtype
    targets: Tensor,  # [N, C] long
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = 1024,
    max_chunk_elements: int = 2**26,
    min_recompute_elements: int = 2**20,
) -> tuple[Tensor, Tensor | None]:
    """Float32 log-prob of ``targets`` (and entropy) under softmax(logits / temperature).

    Works ``chunk_size`` positions at a time, fewer when N * positions * V would exceed
    ``max_chunk_elements``. Under autograd each chunk is checkpointed, so
    only the model's own logits are kept for backward and the float32 log-softmax of a chunk is
    recomputed there; no [N, C, V] float32 tensor ever exists at once. Chunks of fewer than
    ``min_recompute_elements`` elements (4 MiB in float32 by default) are kept instead: for
    them checkpointing saves no memory worth its bookkeeping.

    Returns (logp [N, C] float32, entropy [N, C] float32 or None).
    """
    _check_logprob_args(temperature, chunk_size)

    def chunk_fn(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # [N, c, V], [N, c]
        return _chunk_logprobs(z, y, temperature, compute_entropy)

    recompute = torch.is_grad_enabled() and logits.requires_grad
    # Cap each chunk's float32 [N, c, V] block at max_chunk_elements (256 MiB by default), so a
    # 152k vocabulary over a few hundred positions never sits in float32 at once.
    n, _, vocab = logits.shape
    step = max(1, min(chunk_size, max_chunk_elements // max(1, n * vocab)))
    return _over_chunks(
        chunk_fn,
        logits,
        targets,
        step,
        lambda z: recompute and z.numel() >= min_recompute_elements,
        compute_entropy,
    )
