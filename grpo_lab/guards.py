"""Divergence guards: stop a run whose policy has broken down, with the likely cause.

- :func:`non_finite_parameters`: names of parameters holding NaN or inf. The trainer checks the
  policy (and critic) before the first rollout and after every update, so a NaN never reaches
  sampling (where it surfaces as torch's "probability tensor contains either inf, nan") and never
  reaches a checkpoint.
- :func:`sampling_guard`: NaN or infinite logits from finite weights, met by the sampler.
- :func:`entropy_alarm`: the mean token entropy of the last ``divergence.patience`` steps all above
  ``divergence.entropy_max`` x ln(V) while the run's first step was below it (explosion: the
  policy has turned to noise, e.g. at a learning rate far too high) or all below ``divergence.entropy_min`` nats (collapse). The trainer warns or
  stops (``divergence.action``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from grpo_lab import distributed
from grpo_lab.errors import DivergenceError

logger = logging.getLogger("grpo_lab")

__all__ = [
    "check_entropy",
    "check_finite",
    "divergence_advice",
    "entropy_alarm",
    "non_finite_parameters",
    "sampling_guard",
]


def non_finite_parameters(module: nn.Module, limit: int = 3) -> list[str]:
    """Up to ``limit`` names of ``module``'s parameters that hold a NaN or an infinity.

    One device sync for the whole model. Parameters partitioned away from this process (ZeRO-3)
    are empty here and pass.
    """
    named = [(n, p) for n, p in module.named_parameters() if p.numel() > 0]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return []
    return [n for (n, _), ok in zip(named, finite.tolist()) if not ok][:limit]


@contextlib.contextmanager
def sampling_guard(when: str, advice: str) -> Iterator[None]:
    """Turn torch's sampling failure on NaN / inf probabilities into a :class:`DivergenceError`.

    Finite but huge weights (an update at ``lr=1e38``) pass :func:`non_finite_parameters` and
    overflow only in the logits; the sampler is the first to see them.
    """
    try:
        yield
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise DivergenceError(
            f"the policy's logits are NaN or infinite at {when} (sampling failed); {advice}"
        ) from e


def divergence_advice(lr: float, warmup_steps: int, max_grad_norm: float | None) -> str:
    """What usually causes a divergence, from this run's own settings."""
    advice = [f"lower trainer.lr (now {lr:g})"]
    if warmup_steps == 0:
        advice.append("add trainer.warmup_steps")
    if max_grad_norm is None:
        advice.append("set trainer.max_grad_norm (gradient clipping is off)")
    return (
        "likely causes: a learning rate too high, no warmup; "
        + ", ".join(advice)
        + ", then resume=auto from the last checkpoint (the ones written before are kept)"
    )


def entropy_alarm(
    entropies: Sequence[float],
    *,
    vocab_size: int,
    entropy_max: float | None,
    entropy_min: float | None,
    patience: int,
) -> str | None:
    """Why the policy entropy of the last ``patience`` steps is out of bounds, or None.

    ``entropies`` are per-step mean token entropies in nats (``policy/entropy``), oldest first;
    ``entropy_max`` is a fraction of the uniform distribution's entropy ``ln(vocab_size)``.
    """
    recent = list(entropies[-patience:])
    if len(recent) < patience or not recent:
        return None
    uniform = math.log(vocab_size)
    # A policy that started out as noise (a random initialisation) has nothing to explode from.
    started_below = entropies[0] <= (entropy_max or 0) * uniform
    if entropy_max is not None and started_below and all(e > entropy_max * uniform for e in recent):
        return (
            f"policy entropy exploded: {recent[-1]:.3f} nats per token for {patience} step(s), "
            f"above divergence.entropy_max={entropy_max:g} x {uniform:.3f} (uniform over the "
            f"{vocab_size}-token vocabulary): the policy now samples noise"
        )
    if entropy_min is not None and all(e < entropy_min for e in recent):
        return (
            f"policy entropy collapsed: {recent[-1]:.4f} nats per token for {patience} step(s), "
            f"below divergence.entropy_min={entropy_min:g}: the policy samples one answer "
            "whatever the prompt"
        )
    return None


def check_finite(acc, models: dict[str, nn.Module | None], when: str, advice: str) -> None:
    """Raise :class:`DivergenceError` when any process finds a NaN or an infinity in ``models``
    (prepared or not; None entries are skipped). One all-reduce: every process stops together.
    """
    bad = {
        name: non_finite_parameters(acc.unwrap_model(model))
        for name, model in models.items()
        if model is not None
    }
    flag = torch.tensor(float(any(bad.values())), device=acc.device)
    if float(distributed.global_sum(acc, flag)) == 0:
        return
    names = ", ".join(f"{k}: {', '.join(v)}" for k, v in bad.items() if v) or "on another rank"
    raise DivergenceError(f"parameters are NaN or infinite after {when} ({names}); " + advice)


def check_entropy(
    entropies: Sequence[float], vocab_size: int, divergence, where: str, advice: str
) -> None:
    """Warn, or with ``divergence.action=stop`` raise :class:`DivergenceError`, when
    :func:`entropy_alarm` fires on the per-step entropies so far (``divergence`` settings)."""
    d = divergence
    message = entropy_alarm(
        entropies,
        vocab_size=vocab_size,
        entropy_max=d.entropy_max,
        entropy_min=d.entropy_min,
        patience=d.patience,
    )
    if message is None:
        return
    message += f" at {where}; " + advice
    if d.action == "stop":
        raise DivergenceError(message + " (divergence.action=warn only warns)")
    logger.warning("%s", message)
