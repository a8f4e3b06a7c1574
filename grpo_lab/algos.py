"""Pure loss and advantage math for GRPO and PPO.

Every function here takes tensors and returns tensors: hyperparameters are keyword-only, there
are no config objects, no distributed calls and no host syncs, so each piece can be imported and
tested alone and the trainer only has to call it.

Shape legend:
    B  prompts in the batch
    G  completions per prompt (group size); rows [g*G:(g+1)*G] are prompt g's group
    N  = B*G sequences
    T  completion tokens (right-padded)
    V  vocabulary size
    mask [N, T] is bool or 0/1; nonzero marks a real completion token.

Conventions:
    - Advantage estimators run under ``torch.no_grad()``: their outputs are targets.
    - Values at padded positions never reach a result or a gradient, even if they are NaN/inf
      (``kl_penalty`` excepted: it is unmasked, see its NOTE).
    - Losses are normalised only by ``aggregate``; see its docstring for gradient accumulation.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
ADVANTAGE_SCALES = ("group", "batch", "none")
ROLLOUT_IS_MODES = ("truncate", "mask")
ROLLOUT_IS_LEVELS = ("token", "sequence")


# ----------------------------------------------------------------------------- masked helpers
def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` [N, T] over valid positions; over everything (0-dim) or along ``dim``."""
    x = torch.where(mask.bool(), x, 0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` [N, T] over valid positions. An empty slice gives 0, not NaN."""
    return masked_sum(x, mask, dim) / mask.bool().sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance (0-dim) of ``x`` [N, T] over valid positions.

    ``unbiased=True`` divides by (count - 1) (Bessel), as ``torch.var`` does; with fewer than two
    valid elements the denominator is clamped to 1, so the result is 0.
    """
    mask = mask.bool()
    count = mask.sum()
    centred_sq = masked_sum((x - masked_mean(x, mask)) ** 2, mask)
    return centred_sq / ((count - 1) if unbiased else count).clamp(min=1)


def whiten(
    x: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Whiten ``x`` [N, T] with masked statistics; returns [N, T], 0 at padding.

    Variance is unbiased (``masked_var``). With ``shift_mean=False`` only the scale changes: the
    mean is added back, as common PPO implementations do for advantages. ``stats`` = (mean, var)
    0-dim tensors computed elsewhere, e.g. over every data-parallel rank's tokens, so that the
    result does not depend on how the batch is split; by default they come from ``x`` itself.
    """
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, 0)


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Shannon entropy ``-sum_v p_v log p_v`` (Shannon 1948) of distributions given by their
    log-probabilities: logp [..., V] (normalised, e.g. a log-softmax) -> [...], in its dtype.

    A token with log-prob -inf (a banned token, probability 0) contributes 0, the limit of
    ``p log p`` as p -> 0, rather than ``0 * -inf = NaN``; on finite log-probs the result is
    exactly ``-(exp(logp) * logp).sum(-1)``. The training forwards
    (:func:`grpo_lab.models.token_logprobs`) call this on their float32 log-softmax.
    """
    # NOTE: masked_fill rather than where so that 0 * (-inf) never appears in the backward pass.
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(``logits``): [..., V] -> [...], in logits' dtype; -inf logits (banned
    tokens) contribute 0. ``entropy_from_logits(z.float() / T)`` is the entropy the training
    forwards report at temperature T, bit for bit (:func:`entropy_from_logprobs`)."""
    return entropy_from_logprobs(torch.log_softmax(logits, dim=-1))


# ----------------------------------------------------------------------------- advantages
def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"N={rewards.shape[0]} is not a positive multiple of group_size={group_size}"
        )
    return rewards.view(-1, group_size)  # [B, G]


@torch.no_grad()
def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    batch_std: Tensor | None = None,
) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, DeepSeekMath eq. 3 and §4.1.2).

    rewards [N] -> advantages [N]: ``(r - group mean) / (std + eps)`` where std is
        - ``"group"``: the group's standard deviation (GRPO);
        - ``"batch"``: the standard deviation of all N rewards (the mean stays per group);
        - ``"none"``: no division, mean-centred only (Dr. GRPO, Liu et al. 2025,
          "Understanding R1-Zero-like training", which removes the std's difficulty bias).
    Standard deviations are unbiased (divide by count - 1), as ``torch.std`` and TRL's
    GRPOTrainer compute them, so results compare directly with TRL (NOTE: TRL adds eps=1e-4;
    pass that to match it exactly).
    A group whose rewards are all identical gets advantage exactly 0 (also when G = 1).
    ``batch_std`` (0-dim) replaces the ``"batch"`` standard deviation, e.g. by one over every
    data-parallel rank's rewards, so that the result does not depend on how the batch is split.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    r = _groups(rewards, group_size)  # [B, G]
    centred = r - r.mean(-1, keepdim=True)  # [B, G]
    identical = (r == r[:, :1]).all(-1, keepdim=True)  # [B, 1]
    if scale == "group":
        var = (centred**2).sum(-1, keepdim=True) / max(group_size - 1, 1)  # [B, 1]
        centred = centred / (var.sqrt() + eps)
    elif scale == "batch":
        if batch_std is None:
            var = ((rewards - rewards.mean()) ** 2).sum() / max(rewards.numel() - 1, 1)
            batch_std = var.sqrt()
        centred = centred / (batch_std + eps)
    # NOTE: the mean of identical floats can differ from them by an ulp; force an exact 0.
    return torch.where(identical, 0.0, centred).reshape(-1)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): rewards [N] -> advantages [N].

    ``A_i = r_i - mean of the other G - 1 rewards of its group``; needs G >= 2. A group with
    identical rewards gets exactly 0.
    """
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    r = _groups(rewards, group_size)  # [B, G]
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # [B, G]
    identical = (r == r[:, :1]).all(-1, keepdim=True)  # [B, 1]
    return torch.where(identical, 0.0, r - baseline).reshape(-1)


@torch.no_grad()
def gae(
    token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

    token_rewards [N, T], values [N, T], mask [N, T] -> (advantages [N, T], returns [N, T]),
    ``returns = advantages + values``, both 0 where mask is 0. Padded positions are skipped by
    the backward scan, so the value after a sequence's last real token is 0 (terminal) and
    nothing from padding (even NaN) leaks in.
    """
    mask = mask.bool()
    rewards = torch.where(mask, token_rewards, 0)
    values = torch.where(mask, values, 0)
    next_value = torch.zeros_like(values[:, 0])  # [N]
    running = torch.zeros_like(values[:, 0])  # [N]
    advantages = torch.zeros_like(values)  # [N, T]
    for t in reversed(range(values.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lam * running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, running, 0)
    return advantages, torch.where(mask, advantages + values, 0)


# ----------------------------------------------------------------------------- KL estimators
def kl_penalty(
    logp: Tensor, ref_logp: Tensor, kind: str = "k1", *, max_log_ratio: float | None = 20.0
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) for tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"). logp, ref_logp [N, T] -> [N, T], unmasked.

    - ``k1 = logp - ref_logp``: unbiased, high variance, can be negative.
    - ``k2 = 0.5 * (logp - ref_logp)**2``: biased, low variance, >= 0.
    - ``k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1``: unbiased, >= 0 (DeepSeekMath eq. 4).
    For k3 the log-ratio is clamped to +-``max_log_ratio`` (None disables) so exp cannot
    overflow; beyond the clamp the gradient is 0.
    NOTE: mask the result with ``aggregate``; for k2/k3, non-finite padding would still poison
    the backward pass, so pass finite log-probs at padding.
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":
        log_ratio = ref_logp - logp
        if max_log_ratio is not None:
            log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
        return log_ratio.exp() - log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_KINDS)}")


# ----------------------------------------------------------------------------- aggregation
def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: Tensor | int | None = None,
    num_seqs: Tensor | int | None = None,
    norm_constant: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss [N, T] to a scalar.

    Modes:
        ``token-mean``: sum over valid tokens / num_tokens (default: mask.sum()).
        ``seq-mean-token-mean``: sum over sequences of each sequence's token mean / num_seqs
            (default N; a sequence without valid tokens contributes 0 but is still counted).
        ``seq-mean-token-sum``: sum over sequences of each sequence's token sum / num_seqs.
        ``seq-mean-token-sum-norm``: sum over valid tokens / (num_seqs * norm_constant), default
            norm_constant T = per_token.shape[-1] (Dr. GRPO's constant normaliser).

    Gradient accumulation: every mode is a sum of per-token or per-sequence terms divided by a
    count. Pass the counts of the FULL batch (all micro-batches, all ranks) as ``num_tokens`` /
    ``num_seqs``, and the sum of the micro-batch losses (and their gradients) equals the
    full-batch loss, however the batch is split. The defaults are local counts, which is right
    only for a single un-split batch. For ``seq-mean-token-sum-norm`` every micro-batch must be
    padded to the same T or ``norm_constant`` given explicitly.
    """
    mask = mask.bool()
    if mode == "token-mean":
        denom = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked_sum(per_token, mask) / denom
    num_seqs = per_token.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1).sum() / num_seqs
    if mode == "seq-mean-token-sum":
        return masked_sum(per_token, mask) / num_seqs
    if mode == "seq-mean-token-sum-norm":
        norm_constant = per_token.shape[-1] if norm_constant is None else norm_constant
        return masked_sum(per_token, mask) / (num_seqs * norm_constant)
    raise ValueError(f"unknown aggregation mode {mode!r}; valid: {', '.join(AGG_MODES)}")


# ----------------------------------------------------------------------------- DAPO shaping
@torch.no_grad()
def groups_with_signal(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling's filter (Yu et al. 2025, arXiv:2503.14476, eq. 11's constraint
    ``0 < |{o_i : is_equivalent(a, o_i)}| < G``, generalised to any reward): rewards [N] ->
    keep [B] bool, True for a group whose G rewards are not all equal.

    A group with identical rewards has group-relative advantage exactly 0 (``group_advantages``,
    ``rloo_advantages``), so it adds nothing to the policy gradient but still counts in the loss
    normaliser; dynamic sampling drops it and samples more prompts instead.
    """
    r = _groups(rewards, group_size)  # [B, G]
    return (r != r[:, :1]).any(-1)


@torch.no_grad()
def overlong_penalty(lengths: Tensor, *, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), a reward term.

    lengths [N] (completion tokens) -> [N] float32, added to the task reward:
        0                                   if |y| <= L_max - L_cache
        penalty * ((L_max - L_cache) - |y|) / L_cache    if L_max - L_cache < |y| <= L_max
        -penalty                            if |y| > L_max
    with ``L_max = max_len`` and ``L_cache = buffer`` (the paper uses penalty 1). ``buffer=0``
    gives 0 everywhere (off).
    """
    if buffer < 0 or buffer > max_len:
        raise ValueError(f"buffer must be in [0, max_len={max_len}], got {buffer}")
    lengths = lengths.float()
    if buffer == 0:
        return torch.zeros_like(lengths)
    start = max_len - buffer
    ramp = (start - lengths).clamp(max=0) / buffer  # [N] in [-1, 0] up to max_len
    return penalty * torch.where(lengths > max_len, -1.0, ramp)


def mask_truncated(mask: Tensor, truncated: Tensor) -> Tensor:
    """DAPO's overlong filtering (Yu et al. 2025, arXiv:2503.14476, section 3.4): the loss mask
    [N, T] with every row of a truncated completion (truncated [N] bool) set to 0, so a
    completion cut off at ``max_new_tokens`` neither contributes to the loss nor counts in its
    normaliser."""
    return mask * (~truncated.bool())[:, None].to(mask.dtype)


# ----------------------------------------------------------------------------- rollout vs training
@torch.no_grad()
def logprob_mismatch(train_logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the rollout engine's log-probs are from the training forward's, on the tokens the
    engine sampled. train_logp, sampling_logp, mask [N, T] -> local 0-dim sums and max:

        ``abs_sum``: sum over valid tokens of |log pi_train - log pi_sampler|;
        ``abs_max``: the largest of those (0 with no valid token);
        ``kl_sum``:  sum of the k3 estimate of KL(pi_sampler || pi_train) on tokens drawn from
                     the sampler (Schulman 2020): ``rho - 1 - log rho``, rho = pi_train /
                     pi_sampler, as ``kl_penalty(sampling_logp, train_logp, "k3")`` but written
                     ``expm1(log rho) - log rho`` and clamped at 0, so that differences near
                     float precision do not come out as rounding noise below 0;
        ``tokens``:  the number of valid tokens.
    Sums rather than means, so callers can add them over micro-batches and processes and divide
    once by the global count.
    """
    mask = mask.bool()
    log_rho = torch.where(mask, train_logp - sampling_logp, 0)  # [N, T]
    diff = log_rho.abs()  # [N, T]
    kl = (torch.expm1(log_rho) - log_rho).clamp(min=0)  # [N, T], 0 at padding
    return {
        "abs_sum": diff.sum(),
        "abs_max": diff.max() if diff.numel() else diff.new_zeros(()),
        "kl_sum": kl.sum(),
        "tokens": mask.sum().to(diff.dtype),
    }


@torch.no_grad()
def rollout_is_weights(
    train_logp: Tensor,
    sampling_logp: Tensor,
    mask: Tensor,
    *,
    mode: str = "truncate",
    level: str = "token",
    cap: float = 2.0,
) -> Tensor:
    """Importance weights that correct for the rollout engine sampling from a slightly different
    policy than the one the trainer computes: train_logp, sampling_logp, mask [N, T] -> [N, T]
    detached weights (0 at padding) that multiply the per-token policy loss.

    ``rho = pi_train / pi_sampler`` per token (``level="token"``) or per sequence
    (``level="sequence"``: the product over its valid tokens, the same value on each token).
        ``mode="truncate"``: ``min(rho, cap)``, truncated importance sampling (TIS; Yao et al.
            2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training").
        ``mode="mask"``: ``rho * 1[rho <= cap]``, masked importance sampling (MIS; Liu et al.
            2025, "When Speed Kills Stability"): a token or sequence past the cap is dropped from
            the gradient (it still counts in the normaliser, so the loss is not rescaled).
    When the two log-probs are equal every weight is exactly 1 (``cap >= 1``).
    """
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"mode must be one of {ROLLOUT_IS_MODES}, got {mode!r}")
    if level not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"level must be one of {ROLLOUT_IS_LEVELS}, got {level!r}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    mask = mask.bool()
    log_rho = torch.where(mask, train_logp - sampling_logp, 0)  # [N, T]
    if level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)  # [N, T]
    log_cap = math.log(cap)
    if mode == "truncate":
        weights = log_rho.clamp(max=log_cap).exp()  # exp of min(log rho, log cap): no overflow
    else:
        weights = torch.where(log_rho <= log_cap, log_rho.clamp(max=log_cap).exp(), 0)
    return torch.where(mask, weights, 0)


# ----------------------------------------------------------------------------- entropy bonus
def entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    *,
    coef: float,
    agg: str = "token-mean",
    num_tokens: Tensor | int | None = None,
    num_seqs: Tensor | int | None = None,
    norm_constant: Tensor | float | None = None,
) -> Tensor:
    """The entropy bonus of PPO (Schulman et al. 2017, eq. 9, ``+ c2 * S[pi](s_t)``) as a term to
    add to a loss to minimise: entropy, mask [N, T] -> ``-coef * aggregate(entropy, mask, agg)``
    (0-dim), reduced with the same counts as the policy loss."""
    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant)
    return -coef * aggregate(entropy, mask, agg, **counts)


# ----------------------------------------------------------------------------- policy losses
def _clipped_surrogate(
    ratio: Tensor,  # [N, T] importance ratio the objective uses
    log_ratio: Tensor,  # [N, T] token log(pi / pi_old), for the KL diagnostic
    advantages: Tensor,  # [N] or [N, T]
    mask: Tensor,  # [N, T] bool
    clip_low: float,
    clip_high: float | None,
    dual_clip: float | None,
    agg: str,
    counts: dict,
    weights: Tensor | None = None,  # [N, T] detached per-token loss weights; None = all 1
) -> tuple[Tensor, dict[str, Tensor]]:
    adv = advantages[:, None] if advantages.ndim == 1 else advantages  # [N, 1] or [N, T]
    if adv.ndim != 2 or adv.shape[0] != ratio.shape[0] or adv.shape[1] not in (1, ratio.shape[1]):
        raise ValueError(f"advantages must be [N] or [N, T], got {tuple(advantages.shape)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    clip_high = clip_low if clip_high is None else clip_high
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -adv * dual_clip)
        per_token = torch.where(adv < 0, capped, per_token)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate(per_token, mask, agg, **counts)

    with torch.no_grad():
        ratio, log_ratio = ratio.detach(), log_ratio.detach()
        active = clipped > unclipped
        low, high = active & (ratio < 1.0 - clip_low), active & (ratio > 1.0 + clip_high)
        metrics = {
            "clipfrac": masked_mean(active.to(ratio.dtype), mask),
            "clipfrac_low": masked_mean(low.to(ratio.dtype), mask),
            "clipfrac_high": masked_mean(high.to(ratio.dtype), mask),
            # k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old.
            "approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            dual = (adv < 0) & (ratio > dual_clip)
            metrics["dual_clipfrac"] = masked_mean(dual.to(ratio.dtype), mask)
    return loss, metrics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: Tensor | int | None = None,
    num_seqs: Tensor | int | None = None,
    norm_constant: Tensor | float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    logp, old_logp [N, T]; advantages [N] (broadcast over tokens) or [N, T]; mask [N, T].
    Per token, with ``ratio = exp(logp - old_logp)``:
        ``max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``
    ``clip_high`` defaults to ``clip_low``; a larger one is DAPO's clip-higher (Yu et al. 2025).
    ``dual_clip = c > 1`` caps the loss of A < 0 tokens at ``-A * c`` (Ye et al. 2020).
    The loss is reduced by ``aggregate(..., agg, num_tokens=, num_seqs=, norm_constant=)``.
    ``weights`` [N, T] (detached, e.g. ``rollout_is_weights``) multiply the per-token loss
    before it is reduced; None leaves it as is.

    Returns ``(loss 0-dim, metrics)``; metrics are detached 0-dim local masked token means:
    ``clipfrac`` (clipped branch active) = ``clipfrac_low`` (A < 0, ratio < 1 - clip_low) +
    ``clipfrac_high`` (A > 0, ratio > 1 + clip_high); ``approx_kl`` (k3 estimate of
    KL(pi_old || pi)); ``ratio_mean``; ``dual_clipfrac`` (A < 0, ratio > c) when dual clip is on.
    """
    mask = mask.bool()
    # NOTE: mask the log-ratio before exp so garbage at padding cannot overflow into NaN grads.
    log_ratio = torch.where(mask, logp - old_logp, 0)  # [N, T]
    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant)
    return _clipped_surrogate(
        log_ratio.exp(),
        log_ratio,
        advantages,
        mask,
        clip_low,
        clip_high,
        dual_clip,
        agg,
        counts,
        weights,
    )


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: Tensor | int | None = None,
    num_seqs: Tensor | int | None = None,
    norm_constant: Tensor | float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): PPO's clipped surrogate on a sequence-level ratio.

    Same arguments, shapes and metrics as ``policy_loss``. The ratio is the geometric mean of
    the token ratios over valid tokens, ``s_i = exp(mean_t log(pi / pi_old))``, in the paper's
    GSPO-token form ``sg[s_i] * pi_t / sg[pi_t]``: every token carries the value s_i, and with
    per-sequence advantages the gradient equals sequence-level GSPO. The paper's objective is
    ``agg="seq-mean-token-mean"``; it also uses far smaller clip ranges (about 3e-4 / 4e-4).
    A sequence without valid tokens gets ratio 1 and no loss.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logp - old_logp, 0)  # [N, T]
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # [N]
    # Value s_i on every token; gradient s_i * grad(log pi_t), the GSPO-token form.
    ratio = (seq_log_ratio.detach()[:, None] + log_ratio - log_ratio.detach()).exp()  # [N, T]
    counts = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant)
    return _clipped_surrogate(
        ratio, log_ratio, advantages, mask, clip_low, clip_high, dual_clip, agg, counts, weights
    )


# ----------------------------------------------------------------------------- value function
def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    num_tokens: Tensor | int | None = None,
    num_seqs: Tensor | int | None = None,
    norm_constant: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO implementations: values, old_values, returns, mask [N, T].

    Per token ``0.5 * max((V - R)**2, (clip(V, V_old - clip, V_old + clip) - R)**2)``;
    ``clip=None`` gives plain ``0.5 * (V - R)**2``. Reduced with ``aggregate`` like
    ``policy_loss``. Metrics (detached, local masked means): ``vf_clipfrac`` (fraction of
    tokens where the clipped term is the larger), ``value_mean``.
    """
    mask = mask.bool()
    values = torch.where(mask, values, 0)
    old_values, returns = torch.where(mask, old_values, 0), torch.where(mask, returns, 0)
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, active = 0.5 * unclipped, torch.zeros_like(mask)
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped = (clipped_values - returns) ** 2
        per_token, active = 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped
    loss = aggregate(
        per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=norm_constant
    )
    with torch.no_grad():
        metrics = {
            "vf_clipfrac": masked_mean(active.to(values.dtype), mask),
            "value_mean": masked_mean(values.detach(), mask),
        }
    return loss, metrics


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var[R - V] / Var[R]`` over valid tokens (values, returns, mask [N, T]) -> 0-dim.

    1 is a perfect critic, 0 no better than a constant, negative worse. Unbiased variances;
    NaN when the returns have zero variance (undefined).
    """
    var_returns = masked_var(returns, mask)
    ratio = masked_var(returns - values, mask) / var_returns
    return torch.where(var_returns > 0, 1 - ratio, torch.nan)


# ----------------------------------------------------------------------------- registries
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}
POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, Tensor]]]] = {}


def _register(registry: dict, kind: str, name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered")
        registry[name] = fn
        return fn

    return decorator


def _lookup(registry: dict, kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]


def register_advantage_estimator(name: str) -> Callable:
    """Decorator adding ``fn`` to ``ADVANTAGE_ESTIMATORS``; a duplicate name raises ValueError."""
    return _register(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str) -> Callable:
    """Decorator adding ``fn`` to ``POLICY_LOSSES``; a duplicate name raises ValueError."""
    return _register(POLICY_LOSSES, "policy loss", name)


def get_advantage_estimator(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The estimator registered as ``name``; ValueError listing valid names otherwise."""
    return _lookup(ADVANTAGE_ESTIMATORS, "advantage estimator", name)


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, Tensor]]]:
    """The policy loss registered as ``name``; ValueError listing valid names otherwise."""
    return _lookup(POLICY_LOSSES, "policy loss", name)


register_policy_loss("ppo")(policy_loss)
register_policy_loss("gspo")(gspo_loss)


# Every estimator: (token_rewards [N, T], mask [N, T], values [N, T] | None, *, group_size,
# gamma, lam, scale, eps, batch_std) -> (advantages [N, T], returns [N, T]), both 0 at padding. Group
# estimators score a sequence by the masked sum of its token rewards, broadcast the sequence
# advantage over its valid tokens, ignore values/gamma/lam, and return returns == advantages.
def _broadcast(seq_adv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    adv = torch.where(mask.bool(), seq_adv[:, None], 0)  # [N, T]
    return adv, adv


@register_advantage_estimator("grpo")
def grpo_estimator(
    token_rewards: Tensor,
    mask: Tensor,
    values: Tensor | None,
    *,
    group_size: int,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: str = "group",
    eps: float = 1e-6,
    batch_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GRPO: ``group_advantages`` of the sequence rewards with the given ``scale``."""
    rewards = masked_sum(token_rewards, mask, dim=-1)
    advantages = group_advantages(rewards, group_size, scale=scale, eps=eps, batch_std=batch_std)
    return _broadcast(advantages, mask)


@register_advantage_estimator("rloo")
def rloo_estimator(
    token_rewards: Tensor,
    mask: Tensor,
    values: Tensor | None,
    *,
    group_size: int,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: str = "group",
    eps: float = 1e-6,
    batch_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """RLOO: leave-one-out baseline within each group; ``scale``, ``eps`` and ``batch_std`` are
    ignored."""
    return _broadcast(rloo_advantages(masked_sum(token_rewards, mask, dim=-1), group_size), mask)


@register_advantage_estimator("gae")
def gae_estimator(
    token_rewards: Tensor,
    mask: Tensor,
    values: Tensor | None,
    *,
    group_size: int,
    gamma: float = 1.0,
    lam: float = 0.95,
    scale: str = "group",
    eps: float = 1e-6,
    batch_std: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """GAE over token rewards with the critic's ``values``; groups play no part. Whitening the
    advantages, if wanted, is the caller's step (``whiten``)."""
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values [N, T] from a critic, got None")
    return gae(token_rewards, values, mask, gamma=gamma, lam=lam)
