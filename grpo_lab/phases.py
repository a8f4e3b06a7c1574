"""The phases of one RL step before the update: rollout, reward, experience.

Each function takes the :class:`grpo_lab.trainer.Run` (the models, engine, sampler and
accelerator of a run, read but never changed here) and what the previous phase produced, and
returns what it made and measured:

    draw(run, step)               -> Drawn: prompts -> rollout -> reward (dynamic-sampling rounds)
    reward_metrics(run, sampled)  -> reward/* and rollout/* of everything rolled out
    make_experience(run, b, r)    -> Experience: old / reference log-probs, values, advantages
    experience_metrics(exp)       -> advantage/* and value/* of the batch trained on

The maths (advantage estimators, KL, whitening) lives in :mod:`grpo_lab.algos`. Every process
holds whole groups (a prompt's G samples live on one rank), so group statistics need no gather;
batch statistics (``advantage.scale=batch``, whitening) are reduced over every process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from grpo_lab import algos, distributed, dynamic_sampling
from grpo_lab.data import Problem, render_prompt
from grpo_lab.guards import divergence_advice, sampling_guard
from grpo_lab.models import (
    SHARED_PROMPT_ATTENTION,
    CompletionOutputs,
    attention_implementation,
    completion_forward,
    shared_prompt_completion_forward,
)
from grpo_lab.rollout import RolloutBatch, decode_completions, generate
from grpo_lab.samples import ScoredRow

if TYPE_CHECKING:
    from grpo_lab.trainer import Run


@dataclass
class Sampled:
    """This process's rollout of one step, scored. N = local sequences (groups x G)."""

    batch: RolloutBatch
    rewards: torch.Tensor  # [N] float32 task reward
    results: list[ScoredRow]  # per row: score, status, completion text, problem


@dataclass
class Drawn:
    """What :func:`draw` returns: the rows to train on and everything that was rolled out.

    Without dynamic sampling both are the same round; with it, ``train`` is a selection of
    ``rolled_out`` (the groups with signal, topped up) and ``metrics`` its rollout/* counts.
    """

    train: Sampled
    rolled_out: Sampled
    metrics: dict[str, float]


@dataclass
class Experience:
    """Everything the update needs about one rollout batch (all on this process).

    N = local sequences, C = completion tokens.
    """

    batch: RolloutBatch
    rewards: torch.Tensor  # [N] float32 outcome reward
    # [N, C] behaviour-policy log-probs; None = one on-policy update (the ratio is exactly 1)
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None  # [N, C] reference log-probs; None when kl_coef == 0
    old_values: torch.Tensor | None  # [N, C] values at rollout time (PPO only)
    advantages: torch.Tensor  # [N, C]
    returns: torch.Tensor  # [N, C]


# ------------------------------------------------------------------ forwards


def forward(run: Run, model, batch: RolloutBatch, *, entropy: bool = False) -> CompletionOutputs:
    """The training forward of ``batch``'s completions: log-probs [N, C] (and values, entropy).

    With ``trainer.share_prompts`` and an attention that supports it, the G completions of a
    prompt share one prompt encoding (:func:`shared_prompt_completion_forward`).
    """
    cfg = run.cfg
    kwargs = {
        "temperature": cfg.rollout.temperature,
        "compute_entropy": entropy,
        "max_logit_elements": cfg.trainer.max_logit_elements,
    }
    if cfg.trainer.share_prompts and _attention(run, model) in SHARED_PROMPT_ATTENTION:
        try:
            return shared_prompt_completion_forward(
                model,
                batch.prompt_ids,
                batch.prompt_mask,
                batch.completion_ids,
                batch.completion_mask,
                **kwargs,
            )
        except ValueError as err:
            raise ValueError(f"{err} (or set trainer.share_prompts=false)") from err
    return completion_forward(
        model, batch.input_ids, batch.attention_mask, batch.completion_len, **kwargs
    )


def _attention(run: Run, model) -> str | None:
    """The attention implementation of the transformers model inside ``model``'s wrappers
    (looked up once per model: unwrapping reads package metadata)."""
    if id(model) not in run.attention:
        run.attention[id(model)] = attention_implementation(model)
    return run.attention[id(model)]


def no_grad_forward(run: Run, model, batch: RolloutBatch, *wants: str) -> tuple[torch.Tensor, ...]:
    """Completion log-probs and/or values ([N, C] each) for the whole batch, micro-batch by
    micro-batch, without grad. ``wants`` names CompletionOutputs fields."""
    mb = run.cfg.trainer.micro_batch_size
    outs: dict[str, list[torch.Tensor]] = {w: [] for w in wants}
    with torch.no_grad():
        for start in range(0, batch.num_sequences, mb):
            out = forward(run, model, batch.select(slice(start, start + mb)))
            for w in wants:
                outs[w].append(getattr(out, w).detach())
    return tuple(torch.cat(outs[w], dim=0) for w in wants)


@contextmanager
def timed(run: Run, name: str) -> Iterator[None]:
    """A timed harness phase that turns CUDA out-of-memory into an actionable message."""
    try:
        with run.harness.phase(name):
            yield
    except torch.cuda.OutOfMemoryError as e:
        r, t = run.cfg.rollout, run.cfg.trainer
        local_seqs = r.prompts_per_step * r.group_size // run.world
        raise RuntimeError(
            f"CUDA out of memory in the {name!r} phase: {local_seqs} sequences per process, "
            f"up to {r.max_new_tokens} new tokens, micro-batch {t.micro_batch_size}, "
            f"generation batch {r.batch_size or local_seqs}, ZeRO stage {run.zero_stage}, "
            f"LoRA r={run.cfg.model.lora.r}. To use less memory: lower "
            "trainer.micro_batch_size (update) or rollout.batch_size (rollout), set "
            "model.gradient_checkpointing=true, use a ZeRO-3 launch config "
            "(recipes/accelerate/zero3.yaml), or train LoRA adapters (model.lora.r=16)."
        ) from e


@contextmanager
def reference_model(run: Run) -> Iterator:
    """The reference policy: its own frozen copy, or (LoRA) the policy with adapters off."""
    if run.reference is not None:
        yield run.reference
        return
    with run.generation_model.disable_adapter():
        yield run.policy


# ------------------------------------------------------------------ rollout and reward


def rollout(run: Run, questions: list[str]) -> RolloutBatch:
    """G completions of each question by the current policy, on this process's device."""
    cfg, r = run.cfg, run.cfg.rollout
    prompts = [
        render_prompt(
            q,
            template=cfg.data.template,
            tokenizer=run.tokenizer,
            use_chat_template=cfg.data.use_chat_template,
            system_prompt=cfg.data.system_prompt,
        )
        for q in questions
    ]
    # The policy as prepared: under ZeRO-3 the engine gathers its parameters once for the
    # whole rollout and pauses its hooks (grpo_lab.zero3).
    batch = generate(
        run.policy,
        run.tokenizer,
        prompts,
        group_size=r.group_size,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        ignore_eos=r.ignore_eos,
        batch_size=r.batch_size,
        backend=run.engine,
        value_head=run.rollout_value_head,
    )
    batch = batch.to(run.acc.device)
    if run.world > 1:
        # Every rank pads to the longest completion of any rank: the same C gives every rank
        # the same sequence of model calls (and of ZeRO-3 parameter gathers) in the update.
        longest = distributed.global_max(run.acc, batch.completion_len)
        batch = batch.pad_completions(longest, run.tokenizer.pad_token_id)
    return batch


def score(run: Run, batch: RolloutBatch, problems: list[Problem]) -> Sampled:
    """Task rewards of ``batch`` (G rows per problem, in order) by ``run.reward_fn``. Each
    result keeps its completion text and problem, so a selection of rows still knows what it
    holds."""
    rows = [p for p in problems for _ in range(run.cfg.rollout.group_size)]
    texts = decode_completions(run.tokenizer, batch)
    results = [
        ScoredRow(r.score, r.status, r.extracted, completion=text, problem=p)
        for r, text, p in zip(run.reward_fn(texts, [p.answer for p in rows]), texts, rows)
    ]
    rewards = torch.tensor(
        [r.score for r in results], dtype=torch.float32, device=batch.completion_ids.device
    )
    return Sampled(batch, rewards, results)


def draw_round(run: Run, step: int) -> Sampled:
    """One round of this process's share of the sampler's next prompts: rollout, then reward.
    ``step`` (1-based) names the step in a divergence error."""
    problems = local_share(run.sampler.next_batch(), run.rank, run.world)
    t = run.cfg.trainer
    advice = divergence_advice(t.lr, t.warmup_steps, t.max_grad_norm)
    with timed(run, "rollout"), sampling_guard(f"step {step}", advice):
        batch = rollout(run, [p.question for p in problems])
    with timed(run, "reward"):
        return score(run, batch, problems)


def draw(run: Run, step: int) -> Drawn:
    """The step's scored rollout: one round, or with ``rollout.dynamic_sampling`` rounds until
    the batch holds prompts_per_step groups with signal (DAPO; see grpo_lab.dynamic_sampling)."""
    cfg = run.cfg
    if not cfg.rollout.dynamic_sampling:
        sampled = draw_round(run, step)
        return Drawn(sampled, sampled, {})
    G = cfg.rollout.group_size
    batch, rewards, results, metrics, everything = dynamic_sampling.sample_with_signal(
        lambda: _as_round(draw_round(run, step)),
        lambda b, r: algos.groups_with_signal(training_rewards(cfg, b, r), G),
        groups_wanted=cfg.rollout.prompts_per_step // run.world,
        max_extra_rounds=cfg.rollout.max_extra_rounds,
        global_sum=lambda x: distributed.global_sum(run.acc, x),
        pad_id=run.tokenizer.pad_token_id,
    )
    return Drawn(Sampled(batch, rewards, results), Sampled(*everything), metrics)


def _as_round(sampled: Sampled) -> dynamic_sampling.Round:
    return sampled.batch, sampled.rewards, sampled.results


def local_share(problems: list[Problem], rank: int, world: int) -> list[Problem]:
    """This process's contiguous slice of the global prompt batch."""
    per_rank = len(problems) // world
    return problems[rank * per_rank : (rank + 1) * per_rank]


def training_rewards(cfg, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
    """The task rewards [N] plus DAPO's soft overlong punishment when it is on."""
    rw = cfg.reward
    if rw.overlong_buffer == 0:
        return rewards
    return rewards + algos.overlong_penalty(
        batch.completion_lengths,
        max_len=cfg.rollout.max_new_tokens,
        buffer=rw.overlong_buffer,
        penalty=rw.overlong_penalty,
    )


def reward_metrics(run: Run, sampled: Sampled) -> dict[str, float]:
    """reward/* and rollout/* of everything rolled out this step, over every process.

    Every statistic is a ratio of global sums (one all-reduce): the reward std is the
    population std over all sequences.
    """
    G = run.cfg.rollout.group_size
    batch, rewards = sampled.batch, sampled.rewards
    groups = rewards.view(-1, G)
    errors = sum(r.status in ("timeout", "parse_error") for r in sampled.results)
    local = {
        "reward": rewards.sum(),
        "reward_sq": (rewards**2).sum(),
        "correct": (rewards > 0.5).float().sum(),
        "length": batch.completion_lengths.float().sum(),
        "truncated": batch.truncated.float().sum(),
        "rows": torch.tensor(float(len(rewards)), device=rewards.device),
        "solved_groups": (groups > 0.5).any(dim=1).float().sum(),
        # Groups whose rewards are all equal carry no GRPO signal (advantage 0 everywhere).
        "zero_std_groups": (~algos.groups_with_signal(rewards, G)).float().sum(),
        "errors": torch.tensor(float(errors), device=rewards.device),
    }
    s = dict(zip(local, distributed.global_sum(run.acc, torch.stack(list(local.values())))))
    n = s["rows"]
    mean = s["reward"] / n
    var = (s["reward_sq"] / n - mean**2).clamp(min=0)
    n_groups = n / G
    return {
        "reward/mean": float(mean),
        "reward/std": float(var.sqrt()),
        "reward/accuracy": float(s["correct"] / n),
        "reward/solved_groups": float(s["solved_groups"] / n_groups),
        "reward/zero_std_groups": float(s["zero_std_groups"] / n_groups),
        "reward/errors": float(s["errors"]),
        "rollout/completion_len_mean": float(s["length"] / n),
        "rollout/truncated_frac": float(s["truncated"] / n),
    }


# ------------------------------------------------------------------ experience


def make_experience(run: Run, batch: RolloutBatch, rewards: torch.Tensor) -> Experience:
    """Old log-probs (only when the batch feeds more than one optimizer step), reference
    log-probs (``loss.kl_coef > 0``), values (PPO), then per-token rewards and advantages."""
    cfg = run.cfg
    rewards = training_rewards(cfg, batch, rewards)
    mask = batch.completion_mask
    updates_per_batch = cfg.trainer.epochs * cfg.trainer.num_minibatches
    old_logp = old_values = ref_logp = None
    # NOTE: with a single optimizer step per batch the policy that is updated *is* the one that
    # sampled, so the ratio is exactly 1: the old-log-prob forward is skipped and the update
    # uses its own detached log-probs (same gradient, one forward fewer).
    if updates_per_batch > 1 and run.value_mode == "head":
        # One pass of the shared trunk gives both the behaviour log-probs and the values.
        with timed(run, "old_logprob"):
            old_logp, old_values = no_grad_forward(run, run.policy, batch, "logp", "values")
    elif updates_per_batch > 1:
        with timed(run, "old_logprob"):
            (old_logp,) = no_grad_forward(run, run.policy, batch, "logp")
    if cfg.loss.kl_coef > 0:
        with timed(run, "ref"), reference_model(run) as reference:
            (ref_logp,) = no_grad_forward(run, reference, batch, "logp")
    is_ppo = run.value_mode is not None
    if is_ppo and old_values is None and batch.values is not None:
        old_values = batch.values  # read by the rollout engine (value head on the trunk)
    if is_ppo and old_values is None:
        with timed(run, "values"):
            value_model = run.critic if run.critic is not None else run.policy
            (old_values,) = no_grad_forward(run, value_model, batch, "values")
    if old_values is not None:
        old_values = old_values * mask

    # Outcome reward on the last completion token; optional per-token KL penalty (classic PPO).
    token_rewards = torch.zeros_like(batch.sampling_logp)
    last = (batch.completion_lengths - 1).clamp(min=0)
    has_tokens = batch.completion_lengths > 0
    token_rewards[has_tokens, last[has_tokens]] = rewards[has_tokens]
    if ref_logp is not None and cfg.loss.kl_mode == "reward":
        behaviour = old_logp if old_logp is not None else batch.sampling_logp
        kl = algos.kl_penalty(behaviour, ref_logp, kind=cfg.loss.kl_estimator)
        token_rewards = token_rewards - cfg.loss.kl_coef * kl * mask

    a = cfg.advantage
    batch_std = None
    if a.scale == "batch":  # the reward std of the whole batch, over every process
        seq_rewards = (token_rewards * mask).sum(-1, keepdim=True)  # [N, 1]
        ones = torch.ones_like(seq_rewards)
        batch_std = distributed.global_masked_stats(run.acc, seq_rewards, ones)[1].sqrt()
    estimator = algos.get_advantage_estimator(cfg.resolved_estimator())
    advantages, returns = estimator(
        token_rewards,
        mask,
        old_values,
        group_size=cfg.rollout.group_size,
        gamma=a.gamma,
        lam=a.lam,
        scale=a.scale,
        batch_std=batch_std,
    )
    if cfg.resolved_whiten():
        stats = distributed.global_masked_stats(run.acc, advantages, mask)
        advantages = algos.whiten(advantages, mask, stats=stats)
    if cfg.loss.mask_truncated:  # after the advantages: truncated rows keep their rewards
        batch = dataclasses.replace(
            batch, completion_mask=algos.mask_truncated(mask, batch.truncated)
        )
    return Experience(batch, rewards, old_logp, ref_logp, old_values, advantages, returns)


def experience_metrics(exp: Experience) -> dict[str, float]:
    """This process's advantage/value diagnostics of the batch trained on."""
    mask = exp.batch.completion_mask
    out = {"rollout/old_logprob_pass": float(exp.old_logp is not None)}
    if exp.old_values is not None:
        out["value/explained_variance"] = float(
            algos.explained_variance(exp.old_values, exp.returns, mask)
        )
        out["value/mean"] = float(algos.masked_mean(exp.old_values, mask))
    out["advantage/mean"] = float(algos.masked_mean(exp.advantages, mask))
    return out
