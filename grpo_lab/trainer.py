"""The RL loop: GRPO, PPO with a value head on the shared trunk, PPO with a separate critic.

One RL step, read top to bottom in :func:`step`:

    1. sample prompts   the run's PromptSampler; each process keeps its slice   phases.draw
    2. rollout          G completions per prompt by the rollout engine          phases.draw
    3. reward           the math reward; with rollout.dynamic_sampling, more    phases.draw
                        rounds until enough groups have signal
    4. experience       old log-probs (only when the batch feeds more than one  phases.make_experience
                        optimizer step), reference log-probs (kl_coef > 0),
                        values (PPO), advantages
    5. update           epochs x minibatches x micro-batches of policy loss     update.update
                        (+ value loss, + KL in the loss) -> grad clip -> step

and :func:`train_loop` around it: 6. log, 7. checkpoint and evaluate; then the final model.

Where things live:

- :func:`setup` builds a :class:`Run` (models, optimizers, schedulers, sampler, rollout engine,
  reward, accelerator, metrics writer) and resumes from a checkpoint when asked;
  :mod:`grpo_lab.build` loads and prepares the models and their optimizers.
- :mod:`grpo_lab.phases`: rollout, reward, experience; :mod:`grpo_lab.update`: the update and
  its loss normalisation; :mod:`grpo_lab.algos`: the maths; :mod:`grpo_lab.evaluation`: held-out
  accuracy; :mod:`grpo_lab.checkpoint`: checkpoints, resume, the saved model;
  :mod:`grpo_lab.guards`: divergence checks.

Launch with ``grpo-lab train RECIPE [key=value ...]`` or ``accelerate launch -m grpo_lab.train
RECIPE``; from Python, :func:`train` (a config) or ``train_loop(setup(cfg))``. Every step compares
the rollout engine's log-probs with the training forward's (``rollout/logprob_*``) from log-probs
already computed: the old-log-prob pass when there is one, else the update's own forward of the
rows it runs (at that point the sampling policy's).

Departures from the papers, on purpose:
- Loss normalisation is owned by :mod:`grpo_lab.update`, once: every loss is aggregated with
  token / sequence counts summed over the whole minibatch *and all processes*, so the update is
  identical whether a minibatch is run as 1x8, 4x2 or 8x1 micro-batches, or split across ranks.
- The learning-rate schedule advances once per RL step (not per minibatch), so ``warmup_steps``
  counts RL steps whatever ``trainer.num_minibatches`` is.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from grpo_lab import build, distributed, evaluation, phases
from grpo_lab.checkpoint import CheckpointError, restore, save_checkpoint, save_model
from grpo_lab.config import Config, ConfigError, save_config, to_dict
from grpo_lab.data import PromptSampler, fit_prompts, load_run_problems, model_context
from grpo_lab.guards import check_entropy, check_finite, divergence_advice
from grpo_lab.harness import Harness, MetricsWriter, format_step_line
from grpo_lab.models import PolicyWithValueHead
from grpo_lab.rewards import ScoreResult, VerifierPool, score_batch, set_default_pool
from grpo_lab.rollout import (
    RolloutBackend,
    build_backend,
    gather_params_for_generation,
    reads_values,
)
from grpo_lab.runs import claim_output_dir, clear_run
from grpo_lab.samples import SampleLog, sample_records
from grpo_lab.trackers import init_kwargs
from grpo_lab.update import Skips, update

logger = logging.getLogger("grpo_lab")

# (completions, golds) -> one ScoreResult per completion: score_batch's signature.
RewardFn = Callable[[list[str], list[str]], list[ScoreResult]]


@dataclass(eq=False)
class Run:
    """Everything one training run holds. :func:`setup` builds it; of its fields only ``step``
    and ``skips`` are reassigned afterwards, by :func:`step` (the objects themselves, such as
    the models, the sampler and the harness, change state as they are used).

    ``policy``, ``critic``, ``reference`` and the optimizers are as prepared by ``acc`` (DDP or
    DeepSpeed engines); ``generation_model`` is the bare causal LM that samples (peft-wrapped
    with LoRA). ``sched``/``critic_sched`` advance once per RL step.
    """

    cfg: Config
    acc: Accelerator
    tokenizer: Any
    policy: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    critic: torch.nn.Module | None
    critic_opt: torch.optim.Optimizer | None
    critic_sched: Any
    reference: torch.nn.Module | None
    generation_model: torch.nn.Module
    engine: RolloutBackend
    reward_fn: RewardFn
    sampler: PromptSampler
    eval_problems: list
    eval_plan: evaluation.EvalPlan
    harness: Harness
    writer: MetricsWriter
    samples: SampleLog
    out_dir: Path
    step: int = 0  # RL steps done
    skips: Skips = Skips()  # optimizer steps skipped for a non-finite gradient
    attention: dict[int, str | None] = field(default_factory=dict)  # per model, see phases

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def value_mode(self) -> str | None:
        """'head', 'critic' (PPO) or None (no value model)."""
        return self.cfg.ppo.value if self.cfg.algorithm == "ppo" else None

    @property
    def deepspeed(self) -> bool:
        return distributed.is_deepspeed(self.acc)

    @property
    def zero_stage(self) -> int:
        return distributed.zero_stage(self.acc)

    @functools.cached_property
    def rollout_value_head(self):
        """The shared-trunk value head, for engines that read values while sampling (the old
        values then cost no forward pass); None otherwise."""
        if not (
            self.value_mode == "head"
            and self.cfg.ppo.values_from_rollout
            and reads_values(self.engine)
        ):
            return None
        return self.acc.unwrap_model(self.policy).v_head


# ------------------------------------------------------------------ setup


def setup(
    cfg: Config,
    accelerator: Accelerator | None = None,
    *,
    reward_fn: RewardFn | None = None,
    sampler: PromptSampler | None = None,
) -> Run:
    """Build a run from ``cfg``: seed, output folder, data, models, optimizers, resume.

    ``reward_fn`` replaces the recipe's rule-based math reward (e.g. a benchmark's
    :class:`grpo_lab.rewards.ControlledReward`); by default :func:`score_batch` with
    ``reward.timeout_s``. ``sampler`` replaces the prompt sampler over the training problems; it
    is the one saved with checkpoints.
    """
    acc = accelerator or distributed.build_accelerator(cfg)
    cfg.validate(num_processes=acc.num_processes)
    if cfg.trainer.cpu_threads is not None:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    set_seed(cfg.seed, device_specific=True)
    out_dir = Path(cfg.output_dir)
    # A fresh run never writes into another run's folder (overwrite=true deletes it first).
    previous_run = claim_output_dir(out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    if cfg.rollout.backend == "compiled" and distributed.zero_stage(acc) == 3:
        raise ConfigError(
            "rollout.backend 'compiled' cannot run under DeepSpeed ZeRO-3 (the parameters "
            "are re-gathered for every rollout, so a compiled step's weights would move); "
            "use 'static' or 'shared_prefix'",
            ["rollout.backend"],
        )
    engine = build_backend(cfg.rollout.backend, sampler=cfg.rollout.sampler)
    train_problems, eval_problems = load_run_problems(cfg.data, seed=cfg.seed)
    plan = evaluation.eval_plan(cfg)  # the same problems and settings as `grpo-lab eval RUN`
    value_mode = cfg.ppo.value if cfg.algorithm == "ppo" else None
    tokenizer, policy, critic, reference, n_params = build.load_models(cfg, value_mode)
    generation_model = policy.lm if isinstance(policy, PolicyWithValueHead) else policy
    # Refuse (or, with data.max_prompt_tokens, drop) prompts longer than the model's context
    # minus rollout.max_new_tokens.
    context = model_context(generation_model.config, tokenizer)
    fit = functools.partial(fit_prompts, tokenizer=tokenizer, data=cfg.data, context=context,
                            max_new_tokens=cfg.rollout.max_new_tokens)  # fmt: skip
    train_problems = fit(train_problems, what="training")
    eval_problems = fit(eval_problems, what="evaluation")
    # Every rank draws the same global batch (same seed) and keeps its own slice of prompts:
    # a prompt's G samples always live on one rank, so group statistics need no gather.
    B = cfg.rollout.prompts_per_step  # divisible by the process count (Config.validate)
    sampler = sampler or PromptSampler(train_problems, batch_size=B, seed=cfg.seed)
    models = build.prepare(cfg, acc, policy, critic, reference)
    peak = None if cfg.harness.peak_tflops is None else cfg.harness.peak_tflops * 1e12
    harness = Harness(acc.device, n_params=n_params, peak_flops=peak)
    # The sampler position and harness counters travel with every checkpoint.
    acc.register_for_checkpointing(sampler, harness)
    if acc.is_main_process:
        clear_run(out_dir, previous_run)
    acc.wait_for_everyone()
    t = cfg.trainer
    # The schedules follow this run's trainer.lr / max_steps / warmup, not the checkpoint's.
    schedules = [(models["sched"], t.lr)]
    if models["critic"] is not None:
        schedules.append((models["critic_sched"], cfg.ppo.critic_lr or t.lr))
    fp = build.run_fingerprint(cfg, acc, models["policy"], models["critic"])
    state = restore(acc, cfg, out_dir, fp, schedules) or {}
    step = state.get("step", 0)
    if acc.is_main_process:
        # Written once the run is accepted, so a refused resume leaves the old config.
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    trackers = acc if cfg.harness.report_to else None
    main = acc.is_main_process
    writer = MetricsWriter(out_dir / "metrics.jsonl", accelerator=trackers, enabled=main)
    samples = SampleLog(out_dir, start_step=step, every=cfg.harness.sample_every,
                        num_prompts=cfg.harness.sample_prompts, last_step=t.max_steps,
                        accelerator=trackers, enabled=main)  # fmt: skip
    if cfg.harness.report_to:
        kwargs = init_kwargs(cfg.harness.report_to, cfg.output_dir)
        acc.init_trackers("grpo_lab", config=None, init_kwargs=kwargs)
    skips = Skips(state.get("skipped_total", 0), state.get("skipped_in_a_row", 0))
    if cfg.reward.num_workers is not None:
        # The process-wide pool, so the training reward and the held-out evaluation share it.
        set_default_pool(VerifierPool(cfg.reward.num_workers))
    return Run(
        cfg, acc, tokenizer, **models, generation_model=generation_model, engine=engine,
        reward_fn=reward_fn or functools.partial(score_batch, timeout_s=cfg.reward.timeout_s),
        sampler=sampler, eval_problems=eval_problems, eval_plan=plan, harness=harness,
        writer=writer, samples=samples, out_dir=out_dir, step=step, skips=skips,
    )  # fmt: skip


# ------------------------------------------------------------------ one RL step


def step(run: Run) -> dict[str, float]:
    """One RL step (module docstring, steps 1-5); returns its metrics record."""
    cfg, h, n = run.cfg, run.harness, run.step + 1
    h.start_step()
    # Steps 1-3: sample prompts, roll out G completions each, reward them (dynamic sampling:
    # more rounds). `drawn.train` is trained on; `drawn.rolled_out` is everything sampled.
    drawn = phases.draw(run, n)
    # Step 4: old / reference log-probs, values, advantages.
    exp = phases.make_experience(run, drawn.train.batch, drawn.train.rewards)
    # Step 5: epochs x minibatches of optimizer steps, then one scheduler step.
    with phases.timed(run, "update"):
        updated = update(run, exp, run.skips, step=n)
    run.skips = updated.skips
    check_finite(run.acc, _trained(run), f"the update of step {n}", _advice(cfg))
    h.add_tokens(
        generated=int(drawn.rolled_out.batch.completion_mask.sum()),
        trained=int(drawn.train.batch.attention_mask.sum()) * cfg.trainer.epochs,
        samples=drawn.train.batch.num_sequences,
    )
    run.step = n
    record = {"step": n, **phases.reward_metrics(run, drawn.rolled_out), **drawn.metrics}
    record |= phases.experience_metrics(exp) | updated.metrics | h.end_step()
    if run.samples.due(n):  # outside the step's timing
        results = drawn.train.results
        run.samples.write(
            sample_records(
                n,
                problems=[r.problem for r in results[:: cfg.rollout.group_size]],
                batch=drawn.train.batch,
                completions=[r.completion for r in results],
                results=results,
                advantages=exp.advantages,
                tokenizer=run.tokenizer,
                num_prompts=cfg.harness.sample_prompts,
            )
        )
    return record


# ------------------------------------------------------------------ the loop


def train_loop(run: Run) -> list[dict]:
    """Steps until ``trainer.max_steps`` (or ``max_time_s``), logging, evaluating and
    checkpointing on the way; then a last evaluation and the final model. Returns the records."""
    from tqdm.auto import tqdm

    cfg, t = run.cfg, run.cfg.trainer
    history: list[dict] = []
    bar = tqdm(
        total=t.max_steps if t.max_time_s is None else None,
        initial=run.step,
        desc=cfg.algorithm,
        disable=not (t.progress_bar and run.acc.is_main_process),
        dynamic_ncols=True,
    )
    check_finite(run.acc, _trained(run), "loading" if run.step == 0 else "resuming", _advice(cfg))
    if run.step == 0:
        _log_eval(run)  # the starting policy
    while run.step < t.max_steps and not _out_of_time(run):
        # Steps 1-5: sample -> rollout -> reward -> experience -> update.
        record = step(run)
        if run.step == 1:
            record.update(
                build.static_footprint(
                    run.acc, run.policy, run.opt, run.critic, run.critic_opt, run.reference
                )
            )
        # Step 6: log, and watch the entropy for divergence.
        run.writer.write(record)
        history.append(record)
        entropies = [r["policy/entropy"] for r in history if "policy/entropy" in r]
        vocab = run.generation_model.config.vocab_size
        check_entropy(entropies, vocab, run.cfg.divergence, f"step {run.step}", _advice(cfg))
        bar.update(1)
        bar.set_postfix(
            reward=f"{record['reward/mean']:.3f}", step_s=f"{record['time/step_s']:.2f}"
        )
        if t.log_every and run.step % t.log_every == 0 and not t.progress_bar:
            logger.info(format_step_line(record))
        # Step 7: checkpoint and evaluate on their cadences.
        if cfg.checkpoint.every and run.step % cfg.checkpoint.every == 0:
            write_checkpoint(run)
        if run.step < t.max_steps and t.eval_every > 0 and run.step % t.eval_every == 0:
            _log_eval(run)
    bar.close()
    _log_eval(run)
    save_model(run.acc, run.out_dir / "final", run.policy, run.tokenizer, run.critic)
    run.writer.close()
    if cfg.harness.report_to:
        run.acc.end_training()
    return history


def train(cfg: Config) -> list[dict]:
    """Run a whole training job described by ``cfg``; returns the per-step metric records."""
    start = time.perf_counter()
    run = setup(cfg)
    history = train_loop(run)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # NOTE: DeepSpeed ZeRO-3 (with offload) aborts at interpreter exit unless every rank
        # meets here and the process group is torn down explicitly.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if run.acc.is_main_process:
        logger.info(
            "finished %d steps in %.1f s; outputs in %s",
            run.step,
            time.perf_counter() - start,
            cfg.output_dir,
        )
    return history


# ------------------------------------------------------------------ evaluation, checkpoints


def held_out_accuracy(run: Run) -> dict[str, float]:
    """Greedy accuracy on the held-out problems by :func:`grpo_lab.evaluation.evaluate`, with
    the run's eval plan; each process scores its share and the counts are summed."""
    local = run.eval_problems[run.rank :: run.world]
    correct = 0.0
    # NOTE: the ZeRO-3 gather is a collective: every rank enters it, even one with no problems.
    with gather_params_for_generation(run.policy):
        if local:
            settings = run.eval_plan.settings()
            res = evaluation.evaluate(
                run.policy, run.tokenizer, local, k=1, backend=run.engine, **settings
            )
            correct = res["eval/greedy_acc"] * len(local)
    s = distributed.global_sum(
        run.acc, torch.tensor([correct, float(len(local))], device=run.acc.device)
    )
    return {
        "step": run.step,
        "eval/greedy_acc": float(s[0] / s[1].clamp(min=1)),
        "eval/n": float(s[1]),
    }


def _log_eval(run: Run) -> None:
    if not run.eval_problems:
        return
    record = held_out_accuracy(run)
    run.writer.write(record)
    if run.acc.is_main_process:
        logger.info(
            "eval step %d: greedy accuracy %.3f on %d held-out problems",
            record["step"],
            record["eval/greedy_acc"],
            int(record["eval/n"]),
        )


def write_checkpoint(run: Run) -> None:
    """Save a checkpoint; a failed save is logged and the run goes on (the previous
    checkpoint is intact and the next save may succeed)."""
    state = {
        "step": run.step,
        "skipped_total": run.skips.total,
        "skipped_in_a_row": run.skips.in_a_row,
        "fingerprint": build.run_fingerprint(run.cfg, run.acc, run.policy, run.critic),
        "config": to_dict(run.cfg),
    }
    try:
        path = save_checkpoint(run.acc, run.out_dir, run.step, state, keep=run.cfg.checkpoint.keep)
    except CheckpointError as e:
        logger.error("%s", e)
        return
    logger.info("checkpoint written: %s", path)


# ------------------------------------------------------------------ guards and footprint


def _trained(run: Run) -> dict[str, torch.nn.Module | None]:
    return {"policy": run.policy, "critic": run.critic}


def _advice(cfg: Config) -> str:
    t = cfg.trainer
    return divergence_advice(t.lr, t.warmup_steps, t.max_grad_norm)


def _out_of_time(run: Run) -> bool:
    """trainer.max_time_s spent; every process stops when any has spent it (one all-reduce)."""
    budget = run.cfg.trainer.max_time_s
    if budget is None:
        return False
    spent = torch.tensor([float(run.harness.total_s >= budget)], device=run.acc.device)
    return bool(distributed.global_sum(run.acc, spent) > 0)
