"""The policy (and value) update of one RL step.

    update(run, exp, skips, step=n) -> Updated(metrics, skips)
      for epoch in range(trainer.epochs):
        for minibatch in trainer.num_minibatches (a random split when more than one):
          accumulate_gradients(run, exp, rows)   micro-batches: forward, losses, backward
          clip_and_step(policy), clip_and_step(critic)
                                                 a non-finite norm skips the step; counted
      scheduler.step()                           once per RL step, not per minibatch

Loss normalisation is owned here, once: every loss is aggregated with token / sequence counts
summed over the whole minibatch *and all processes*, so the update is identical whether a
minibatch is run as 1x8, 4x2 or 8x1 micro-batches, or split across ranks.

Every diagnostic is declared with its reduction where it is produced (:class:`Tally`):

- ``SUM``: a share already normalised by the minibatch's global counts (the losses, token-mean
  entropy / KL / log-prob mismatch), summed over micro-batches and processes;
- ``MEAN``: a per-micro-batch statistic (clip fractions, ratios), averaged over micro-batches
  and processes;
- ``MAX``: a maximum over micro-batches and processes.

Over the optimizer steps of one RL step, ``MAX`` metrics keep the maximum and the others the
mean. The optimizers and the LR schedule are built in :mod:`grpo_lab.build`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from grpo_lab import algos, distributed
from grpo_lab.phases import Experience, forward

if TYPE_CHECKING:
    from grpo_lab.trainer import Run

logger = logging.getLogger("grpo_lab")

Reduction = Literal["sum", "mean", "max"]
SUM: Reduction = "sum"
MEAN: Reduction = "mean"
MAX: Reduction = "max"


@dataclass
class Tally:
    """Named scalar tensors, each accumulated with the reduction declared when it is added."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    how: dict[str, Reduction] = field(default_factory=dict)

    def add(self, name: str, value: torch.Tensor, how: Reduction) -> None:
        value = value.detach().float()
        self.how[name] = how
        if how == MAX:
            self.values[name] = torch.maximum(self.values.get(name, value), value)
        else:
            self.values[name] = self.values.get(name, 0.0) + value

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values


@dataclass
class Accumulated:
    """What :func:`accumulate_gradients` measured on one minibatch (this process)."""

    tally: Tally  # summed (or max) over the micro-batches run
    micro_batches: int
    rows_skipped: int  # zero-advantage rows not run (see rows_with_signal)


@dataclass(frozen=True)
class Skips:
    """Optimizer steps skipped for a non-finite gradient norm: in total and in a row."""

    total: int = 0
    in_a_row: int = 0


@dataclass
class Updated:
    """What :func:`update` returns: the step's update metrics and the new skip counters."""

    metrics: dict[str, float]
    skips: Skips


# ------------------------------------------------------------------ one RL step's update


def update(run: Run, exp: Experience, skips: Skips, *, step: int) -> Updated:
    """Epochs x minibatches of optimizer steps on ``exp``, then one scheduler step.

    ``skips`` are the run's skip counters before this update and ``step`` (1-based) the RL step,
    for messages; raises when ``trainer.max_skipped_steps`` updates in a row were skipped.
    """
    t = run.cfg.trainer
    N = exp.batch.num_sequences
    per_minibatch = N // t.num_minibatches
    sums: dict[str, float] = {}
    how: dict[str, Reduction] = {}
    rows_skipped = 0
    grad_norms = []
    n_updates = 0
    for _ in range(t.epochs):
        order = (
            torch.randperm(N, device=exp.rewards.device)
            if t.num_minibatches > 1
            else torch.arange(N)
        )
        for mb in range(t.num_minibatches):
            idx = order[mb * per_minibatch : (mb + 1) * per_minibatch]
            minibatch = accumulate_gradients(run, exp, idx)
            rows_skipped += minibatch.rows_skipped
            norm = clip_and_step(run, run.policy, run.opt)
            skips = count_skip(run, skips, norm, step)
            critic_norm = None
            if run.critic is not None:
                critic_norm = clip_and_step(run, run.critic, run.critic_opt)
                skips = count_skip(run, skips, critic_norm, step)
            metrics = reduce_over_processes(run, minibatch)
            if critic_norm is not None:
                metrics["value/grad_norm"] = critic_norm  # already global (clipped over ranks)
            grad_norms.append(norm)
            for k, v in metrics.items():
                how.setdefault(k, minibatch.tally.how.get(k, MEAN))
                sums[k] = max(sums.get(k, v), v) if how[k] == MAX else sums.get(k, 0.0) + v
            n_updates += 1
    run.sched.step()
    if run.critic is not None:
        run.critic_sched.step()
    out = {k: v if how[k] == MAX else v / n_updates for k, v in sums.items()}
    out["optim/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
    out["optim/lr"] = run.sched.get_last_lr()[0]
    out["optim/skipped_steps"] = skips.total
    out["update/zero_advantage_rows_skipped"] = rows_skipped / (N * t.epochs)
    return Updated(out, skips)


def reduce_over_processes(run: Run, minibatch: Accumulated) -> dict[str, float]:
    """One minibatch's diagnostics over every process, by their declared reductions."""
    tally, scale = minibatch.tally, minibatch.micro_batches * run.world
    # Losses were normalised by global counts, so their sum over micro-batches and processes
    # is the minibatch loss; MEAN diagnostics are per-micro-batch values, averaged.
    keys = [k for k, how in tally.how.items() if how != MAX]
    local = torch.stack([tally[k] if tally.how[k] == SUM else tally[k] / scale for k in keys])
    result = dict(zip(keys, distributed.global_sum(run.acc, local).tolist()))
    for k in (k for k, how in tally.how.items() if how == MAX):
        result[k] = float(distributed.global_amax(run.acc, tally[k]))
    return result


def clip_and_step(run: Run, model, opt) -> float:
    """Clip the gradient norm, step and zero grads; a non-finite norm skips the step.

    Returns the global gradient norm before clipping. Under DeepSpeed the engine clips, steps
    and skips on overflow itself.
    """
    if run.deepspeed:
        return distributed.engine_step(model)
    max_norm = run.cfg.trainer.max_grad_norm
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(run.acc.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf))
    if math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def count_skip(run: Run, skips: Skips, norm: float, step: int) -> Skips:
    """The skip counters after an optimizer step with gradient norm ``norm``."""
    if run.deepspeed:  # DeepSpeed's loss scaler handles overflow; nothing is counted here
        return skips
    if math.isfinite(norm):
        return Skips(skips.total, 0)
    skips = Skips(skips.total + 1, skips.in_a_row + 1)
    logger.warning("non-finite gradient norm at step %d: update skipped", step)
    if skips.in_a_row >= run.cfg.trainer.max_skipped_steps:
        raise RuntimeError(
            f"{skips.in_a_row} consecutive updates had non-finite gradients; stopping. "
            "Lower trainer.lr, enable trainer.max_grad_norm, or check the reward."
        )
    return skips


def rows_with_signal(run: Run, exp: Experience, idx: torch.Tensor) -> torch.Tensor:
    """The rows of ``idx`` whose update is not exactly zero (at least one row).

    A row whose advantage is 0 at every token (a GRPO group with identical rewards) adds
    exactly nothing to the clipped policy loss or its gradient, so with no value model and
    no KL or entropy term in the loss it is not run at all; the loss is still normalised by
    the counts of the whole minibatch, so the update is unchanged. With several processes
    every rank must make the same number of forward/backward calls (gradient reductions
    and ZeRO-3 gathers are collective), so each rank keeps as many rows as the rank with
    the most signal, topping its own up with zero-advantage rows.
    """
    L = run.cfg.loss
    if not (
        run.cfg.trainer.skip_zero_advantage
        and run.value_mode is None
        and (L.kl_coef == 0 or L.kl_mode == "reward")
        and L.entropy_coef == 0
    ):
        return idx
    signal = (exp.advantages[idx] != 0).any(dim=-1)  # [len(idx)]
    keep = max(int(signal.sum()), 1)
    keep = distributed.global_max(run.acc, keep)
    # Rows with signal first (stable order), then zero-advantage rows as needed.
    order = torch.argsort((~signal).to(torch.int8), stable=True)
    return idx[order[:keep]]


def accumulate_gradients(run: Run, exp: Experience, idx: torch.Tensor) -> Accumulated:
    """Forward and backward the minibatch ``idx`` (local row indices) in micro-batches.

    Gradients accumulate in the models' ``.grad``. The result does not depend on
    ``trainer.micro_batch_size`` or on the number of processes: every loss is normalised by the
    minibatch's global token / sequence counts.
    """
    cfg, t, L = run.cfg, run.cfg.trainer, run.cfg.loss
    mask = exp.batch.completion_mask
    rows = rows_with_signal(run, exp, idx)
    # Global counts, in one all-reduce: each micro-batch's loss is its share of the whole
    # minibatch's loss summed over every process (DDP/DeepSpeed average gradients over ranks,
    # so distributed.backward multiplies the loss back by the world size). Token-mean
    # diagnostics (entropy, KL) average over the tokens actually run.
    tokens, seqs, run_tokens = distributed.global_sum(
        run.acc,
        torch.stack([mask[idx].sum(), mask.new_tensor(len(idx)), mask[rows].sum()]).float(),
    )
    # loss.mask_truncated can leave a minibatch without a token: its loss is then 0, not NaN.
    tokens, run_tokens = tokens.clamp(min=1), run_tokens.clamp(min=1)
    counts = {
        "num_tokens": tokens,
        "num_seqs": seqs,
        "norm_constant": float(cfg.rollout.max_new_tokens),
    }
    token_mean = {"num_tokens": run_tokens}
    policy_loss_fn = algos.get_policy_loss(L.policy_loss)
    micro = [rows[i : i + t.micro_batch_size] for i in range(0, len(rows), t.micro_batch_size)]
    tally = Tally()
    for i, mi in enumerate(micro):
        last = i == len(micro) - 1
        b = exp.batch.select(mi)
        m = b.completion_mask
        out = forward(run, run.policy, b, entropy=True)
        # The training forward's log-probs of the sampling policy (its own, on one update).
        old_logp = exp.old_logp[mi] if exp.old_logp is not None else out.logp.detach()
        is_weights = None
        if L.rollout_is is not None:
            is_weights = algos.rollout_is_weights(
                old_logp,
                b.sampling_logp,
                m,
                mode=L.rollout_is,
                level=L.rollout_is_level,
                cap=L.rollout_is_cap,
            )
        pg_loss, pg_metrics = policy_loss_fn(
            out.logp,
            old_logp,
            exp.advantages[mi],
            m,
            clip_low=L.clip_low,
            clip_high=L.clip_high,
            dual_clip=L.dual_clip,
            agg=L.agg,
            weights=is_weights,
            **counts,
        )
        loss = pg_loss
        tally.add("loss/policy", pg_loss, SUM)
        entropy = algos.aggregate(out.entropy, m, "token-mean", **token_mean)
        tally.add("policy/entropy", entropy, SUM)
        for k, v in pg_metrics.items():
            tally.add(f"policy/{k}", v, MEAN)
        mismatch = algos.logprob_mismatch(old_logp, b.sampling_logp, m)
        tally.add("rollout/logprob_diff_mean", mismatch["abs_sum"] / run_tokens, SUM)
        tally.add("rollout/logprob_diff_max", mismatch["abs_max"], MAX)
        tally.add("rollout/logprob_kl", mismatch["kl_sum"] / run_tokens, SUM)
        if exp.ref_logp is not None:
            kl = algos.kl_penalty(out.logp, exp.ref_logp[mi], kind=L.kl_estimator)
            tally.add("policy/kl_ref", algos.aggregate(kl, m, "token-mean", **token_mean), SUM)
            if L.kl_mode == "loss":
                kl_loss = algos.aggregate(kl, m, L.agg, **counts)
                loss = loss + L.kl_coef * kl_loss
                tally.add("loss/kl", kl_loss, SUM)
        if L.entropy_coef:
            loss = loss + algos.entropy_bonus(
                out.entropy, m, coef=L.entropy_coef, agg=L.agg, **counts
            )
        if run.value_mode == "head":
            v_loss = _value_loss(run, out.values, exp, mi, counts, tally)
            loss = loss + cfg.ppo.vf_coef * v_loss
        tally.add("loss/total", loss, SUM)
        distributed.backward(run.acc, run.policy, loss, last=last)
        if run.critic is not None:
            values = forward(run, run.critic, b).values
            v_loss = _value_loss(run, values, exp, mi, counts, tally)
            distributed.backward(run.acc, run.critic, v_loss, last=last)
    return Accumulated(tally, len(micro), len(idx) - len(rows))


def _value_loss(run: Run, values, exp: Experience, mi, counts, tally: Tally) -> torch.Tensor:
    """The clipped value loss of micro-batch ``mi``; its diagnostics go to ``tally``."""
    v_loss, v_metrics = algos.value_loss(
        values,
        exp.old_values[mi],
        exp.returns[mi],
        exp.batch.completion_mask[mi],
        clip=run.cfg.ppo.value_clip,
        agg=run.cfg.loss.agg,
        **counts,
    )
    tally.add("loss/value", v_loss, SUM)
    for k, v in v_metrics.items():
        tally.add(f"value/{k}", v, MEAN)
    return v_loss
