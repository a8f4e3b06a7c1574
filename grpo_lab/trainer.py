"""The RL loop: GRPO, PPO with a value head on the shared trunk, PPO with a separate critic.

One optimizer step (``Trainer.step``), read top to bottom:

    sample prompts -> rollout (G completions each) -> reward (with ``rollout.dynamic_sampling``:
    more rounds until enough groups have signal) -> old log-probs (only when the
    batch is used for more than one optimizer step) -> reference log-probs (only when
    ``loss.kl_coef > 0``) -> values (PPO; a value head's are read during the rollout by engines
    that can) -> advantages (registry) -> epochs x minibatches x
    micro-batches of policy loss (+ value loss, + KL in the loss) -> grad clip -> optimizer.

The maths lives in :mod:`grpo_lab.algos`; this module only orchestrates it. Launch it with
``grpo-lab train RECIPE [key=value ...]`` or ``accelerate launch -m grpo_lab.train RECIPE``.
Every step compares the rollout engine's log-probs with the training forward's
(``rollout/logprob_*``) from log-probs already computed: the old-log-prob pass when there is one,
else the update's own forward of the rows it runs (at that point the sampling policy's).

Departures from the papers, on purpose:
- Loss normalisation is owned here, once: every loss is aggregated with token / sequence counts
  summed over the whole minibatch *and all processes*, so the update is identical whether a
  minibatch is run as 1x8, 4x2 or 8x1 micro-batches, or split across ranks.
- The learning-rate schedule advances once per RL step (not per minibatch), so ``warmup_steps``
  counts RL steps whatever ``trainer.num_minibatches`` is.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from grpo_lab import algos, distributed, dynamic_sampling
from grpo_lab.checkpoint import (
    CheckpointError,
    apply_schedule,
    config_changes,
    fingerprint,
    replace_folder,
    resume_from,
    save_checkpoint,
)
from grpo_lab.config import Config, ConfigError, save_config, to_dict
from grpo_lab.data import (
    PromptSampler,
    fit_prompts,
    load_run_problems,
    model_context,
    render_prompt,
)
from grpo_lab.errors import DivergenceError, disk_full_error, is_out_of_space
from grpo_lab.evaluation import eval_plan, evaluate
from grpo_lab.guards import (
    divergence_advice,
    entropy_alarm,
    non_finite_parameters,
    sampling_guard,
)
from grpo_lab.harness import (
    Harness,
    MetricsWriter,
    footprint_metrics,
    format_step_line,
    model_footprint,
)
from grpo_lab.models import (
    SHARED_PROMPT_ATTENTION,
    PolicyWithValueHead,
    apply_lora,
    attention_implementation,
    completion_forward,
    load_causal_lm,
    load_critic,
    load_reference,
    load_tokenizer,
    shared_prompt_completion_forward,
)
from grpo_lab.rewards import ScoreResult, score_batch
from grpo_lab.rollout import (
    RolloutBatch,
    build_backend,
    decode_completions,
    gather_params_for_generation,
    generate,
    reads_values,
)
from grpo_lab.runs import claim_output_dir, clear_run
from grpo_lab.samples import SampleLog, ScoredRow, sample_records
from grpo_lab.trackers import init_kwargs

logger = logging.getLogger("grpo_lab")

# Update diagnostics reduced by a maximum (over micro-batches, processes and updates), not a sum.
_MAX_REDUCED = frozenset({"rollout/logprob_diff_max"})


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


# (completions, golds) -> one ScoreResult per completion: score_batch's signature.
RewardFn = Callable[[list[str], list[str]], list[ScoreResult]]


class Trainer:
    """``reward_fn`` replaces the recipe's rule-based math reward (e.g. a benchmark's
    :class:`grpo_lab.rewards.ControlledReward`); by default :func:`score_batch` with
    ``reward.timeout_s``."""

    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator | None = None,
        *,
        reward_fn: RewardFn | None = None,
    ):
        self.cfg = cfg
        self.reward_fn = reward_fn or functools.partial(score_batch, timeout_s=cfg.reward.timeout_s)
        self.acc = accelerator or distributed.build_accelerator(cfg)
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        cfg.validate(num_processes=self.world)
        if cfg.trainer.cpu_threads is not None:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        set_seed(cfg.seed, device_specific=True)
        self.out_dir = Path(cfg.output_dir)
        # A fresh run never writes into another run's folder (overwrite=true deletes it first).
        previous_run = claim_output_dir(self.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)

        if cfg.rollout.backend == "compiled" and self.zero_stage == 3:
            raise ConfigError(
                "rollout.backend 'compiled' cannot run under DeepSpeed ZeRO-3 (the parameters "
                "are re-gathered for every rollout, so a compiled step's weights would move); "
                "use 'static' or 'shared_prefix'",
                ["rollout.backend"],
            )
        self._attn_cache: dict[int, str | None] = {}
        self.rollout_backend = build_backend(cfg.rollout.backend, sampler=cfg.rollout.sampler)
        self.is_ppo = cfg.algorithm == "ppo"
        self.value_mode = cfg.ppo.value if self.is_ppo else None
        self._build_data()
        self._build_models()
        self._fit_prompts()
        self._build_optimizers()
        self.harness = Harness(
            self.acc.device, n_params=self._n_policy_params, peak_flops=self._peak_override()
        )
        self.global_step = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self._skipped_rows = 0
        # The sampler position and harness counters travel with every checkpoint.
        self.acc.register_for_checkpointing(self.sampler, self.harness)
        if self.acc.is_main_process:
            clear_run(self.out_dir, previous_run)
        self.acc.wait_for_everyone()
        self._resume()
        if self.acc.is_main_process:
            # Written once the run is accepted, so a refused resume leaves the old config.
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.writer = MetricsWriter(
            self.out_dir / "metrics.jsonl",
            accelerator=self.acc if cfg.harness.report_to else None,
            enabled=self.acc.is_main_process,
        )
        self.samples = SampleLog(
            self.out_dir,
            start_step=self.global_step,
            every=cfg.harness.sample_every,
            num_prompts=cfg.harness.sample_prompts,
            last_step=cfg.trainer.max_steps,
            accelerator=self.acc if cfg.harness.report_to else None,
            enabled=self.acc.is_main_process,
        )
        if cfg.harness.report_to:
            self.acc.init_trackers(
                "grpo_lab",
                config=None,
                init_kwargs=init_kwargs(cfg.harness.report_to, cfg.output_dir),
            )

    # ------------------------------------------------------------------ setup
    def _peak_override(self) -> float | None:
        t = self.cfg.harness.peak_tflops
        return None if t is None else t * 1e12

    def _build_data(self) -> None:
        self.train_problems, self.eval_problems = load_run_problems(
            self.cfg.data, seed=self.cfg.seed
        )
        # The same problems (validated above) and settings as `grpo-lab eval RUN`.
        self.eval_plan = eval_plan(self.cfg)

    def _fit_prompts(self) -> None:
        """Refuse (or, with data.max_prompt_tokens, drop) prompts longer than the model's
        context minus rollout.max_new_tokens; then build the sampler."""
        fit = functools.partial(
            fit_prompts,
            tokenizer=self.tokenizer,
            data=self.cfg.data,
            context=model_context(self.generation_model.config, self.tokenizer),
            max_new_tokens=self.cfg.rollout.max_new_tokens,
        )
        self.train_problems = fit(self.train_problems, what="training")
        self.eval_problems = fit(self.eval_problems, what="evaluation")
        B = self.cfg.rollout.prompts_per_step  # divisible by the process count (Config.validate)
        # Every rank draws the same global batch (same seed) and keeps its own slice of prompts:
        # a prompt's G samples always live on one rank, so group statistics need no gather.
        self.sampler = PromptSampler(self.train_problems, batch_size=B, seed=self.cfg.seed)

    def _build_models(self) -> None:
        cfg, m = self.cfg, self.cfg.model
        load_kw = {
            "dtype": m.dtype,
            "attn_implementation": m.attn_implementation,
            "gradient_checkpointing": m.gradient_checkpointing,
            "trust_remote_code": m.trust_remote_code,
        }
        self.tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
        lm = load_causal_lm(m.name_or_path, **load_kw)
        self._n_policy_params = sum(p.numel() for p in lm.parameters())
        if m.lora.r > 0:
            lm = apply_lora(
                lm,
                r=m.lora.r,
                alpha=m.lora.alpha,
                dropout=m.lora.dropout,
                target_modules=list(m.lora.target_modules),
            )
        self.policy = PolicyWithValueHead(lm) if self.value_mode == "head" else lm
        self.critic = None
        if self.value_mode == "critic":
            self.critic = load_critic(cfg.ppo.critic_model or m.name_or_path, **load_kw)
        self.reference = None
        # With LoRA the reference is the policy with its adapters disabled: no second copy.
        if cfg.loss.kl_coef > 0 and m.lora.r == 0:
            self.reference = load_reference(
                m.name_or_path,
                dtype=m.dtype,
                attn_implementation=m.attn_implementation,
                trust_remote_code=m.trust_remote_code,
            )

    def _build_optimizers(self) -> None:
        t = self.cfg.trainer

        def adamw(module, lr):
            params = [p for p in module.parameters() if p.requires_grad]
            # One fused kernel per step instead of a dozen ops per tensor; DeepSpeed wraps the
            # optimizer in its own flattened partitions, so it keeps torch's default there.
            fused = not self.deepspeed and all(p.is_floating_point() for p in params)
            return torch.optim.AdamW(
                params,
                lr=lr,
                betas=tuple(t.adam_betas),
                weight_decay=t.weight_decay,
                fused=fused or None,
            )

        def schedule(opt):
            return torch.optim.lr_scheduler.LambdaLR(
                opt, _lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps)
            )

        self.opt = adamw(self.policy, t.lr)
        self.sched = schedule(self.opt)
        if self.deepspeed:
            distributed.configure_deepspeed(
                self.acc, micro_batch_size=t.micro_batch_size, max_grad_norm=t.max_grad_norm
            )
            # NOTE: the schedulers stay outside the DeepSpeed engines, which would otherwise step
            # them once per optimizer step; here they advance once per RL step.
            self.policy, self.opt = self.acc.prepare(self.policy, self.opt)
        else:
            self.policy, self.opt, self.sched = self.acc.prepare(self.policy, self.opt, self.sched)
        if self.critic is not None:
            self.critic_opt = adamw(self.critic, self.cfg.ppo.critic_lr or t.lr)
            self.critic_sched = schedule(self.critic_opt)
            if self.deepspeed:
                self.critic, self.critic_opt = self.acc.prepare(self.critic, self.critic_opt)
            else:
                self.critic, self.critic_opt, self.critic_sched = self.acc.prepare(
                    self.critic, self.critic_opt, self.critic_sched
                )
        if self.reference is not None:
            self.reference = distributed.prepare_reference(
                self.acc, self.reference, bf16=self.cfg.model.dtype == "bfloat16"
            )

    @property
    def deepspeed(self) -> bool:
        return distributed.is_deepspeed(self.acc)

    @property
    def zero_stage(self) -> int:
        return distributed.zero_stage(self.acc)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict:
        """What a resume must match. The model's name may change (hub name vs local copy);
        its parameter shapes may not."""
        m = self.cfg.model
        extra = {
            "algorithm": self.cfg.algorithm,
            "value_mode": self.value_mode,
            "lora_r": m.lora.r,
            "world_size": self.world,
        }
        models = {"policy": self.acc.unwrap_model(self.policy)}
        if self.critic is not None:
            models["critic"] = self.acc.unwrap_model(self.critic)
        return fingerprint(models, extra)

    def _resume(self) -> None:
        found = resume_from(
            self.acc, self.cfg.resume, self.out_dir, self._fingerprint(), to_dict(self.cfg)
        )
        if found is None:
            if self.acc.is_main_process:
                # A fresh run starts a fresh metrics file rather than appending to a stale one.
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            if self.cfg.resume == "auto":
                logger.info(
                    "resume=auto: no complete checkpoint in %s, starting fresh", self.out_dir
                )
            return
        path, state = found
        t = self.cfg.trainer
        # The schedule follows this run's trainer.lr / max_steps / warmup, not the checkpoint's.
        apply_schedule(self.sched, t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
        if self.critic is not None:
            apply_schedule(
                self.critic_sched,
                self.cfg.ppo.critic_lr or t.lr,
                betas=t.adam_betas,
                weight_decay=t.weight_decay,
            )
        changed, _ = config_changes(state.get("config") or {}, to_dict(self.cfg))
        changed = [c for c in changed if not c.startswith(("resume:", "overwrite:"))]
        if changed and state.get("config"):
            logger.info("resume applies changed settings: %s", "; ".join(changed))
        self.global_step = state["step"]
        self.skipped_total = state["skipped_total"]
        self.skipped_in_a_row = state["skipped_in_a_row"]
        if self.acc.is_main_process:
            # Rows written after the checkpoint are redone by this run, exactly as before.
            MetricsWriter.truncate_after(self.out_dir / "metrics.jsonl", self.global_step)
        self.acc.wait_for_everyone()
        logger.info("resumed from %s at step %d", path, self.global_step)

    def save_checkpoint(self) -> None:
        state = {
            "step": self.global_step,
            "skipped_total": self.skipped_total,
            "skipped_in_a_row": self.skipped_in_a_row,
            "fingerprint": self._fingerprint(),
            "config": to_dict(self.cfg),
        }
        try:
            path = save_checkpoint(
                self.acc, self.out_dir, self.global_step, state, keep=self.cfg.checkpoint.keep
            )
        except CheckpointError as e:
            # The run goes on: the previous checkpoint is intact and the next save may succeed.
            logger.error("%s", e)
            return
        logger.info("checkpoint written: %s", path)

    # ------------------------------------------------------------------ helpers
    @functools.cached_property
    def generation_model(self):
        """The bare causal LM (peft-wrapped with LoRA) that samples; unwrapped once, since
        accelerate's unwrap_model looks up package metadata on every call."""
        model = self.acc.unwrap_model(self.policy)
        return model.lm if isinstance(model, PolicyWithValueHead) else model

    def _global_sum(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.global_sum(self.acc, x)

    def _global_masked_stats(self, x: torch.Tensor, mask: torch.Tensor):
        return distributed.global_masked_stats(self.acc, x, mask)

    def _forward(self, model, batch: RolloutBatch, *, entropy: bool = False):
        kwargs = {
            "temperature": self.cfg.rollout.temperature,
            "compute_entropy": entropy,
            "max_logit_elements": self.cfg.trainer.max_logit_elements,
        }
        if self.cfg.trainer.share_prompts and self._attention(model) in SHARED_PROMPT_ATTENTION:
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

    def _attention(self, model) -> str | None:
        """The attention implementation of the transformers model inside ``model``'s wrappers."""
        if id(model) not in self._attn_cache:
            self._attn_cache[id(model)] = attention_implementation(model)
        return self._attn_cache[id(model)]

    def _no_grad_forward(self, model, batch: RolloutBatch, *wants: str) -> tuple[torch.Tensor, ...]:
        """Completion log-probs and/or values ([N, C] each) for the whole batch, micro-batch by
        micro-batch, without grad. `wants` names CompletionOutputs fields."""
        mb = self.cfg.trainer.micro_batch_size
        outs: dict[str, list[torch.Tensor]] = {w: [] for w in wants}
        with torch.no_grad():
            for start in range(0, batch.num_sequences, mb):
                out = self._forward(model, batch.select(slice(start, start + mb)))
                for w in wants:
                    outs[w].append(getattr(out, w).detach())
        return tuple(torch.cat(outs[w], dim=0) for w in wants)

    @contextmanager
    def _phase(self, name: str):
        """A timed harness phase that turns CUDA out-of-memory into an actionable message."""
        try:
            with self.harness.phase(name):
                yield
        except torch.cuda.OutOfMemoryError as e:
            r, t = self.cfg.rollout, self.cfg.trainer
            local_seqs = r.prompts_per_step * r.group_size // self.world
            raise RuntimeError(
                f"CUDA out of memory in the {name!r} phase: {local_seqs} sequences per process, "
                f"up to {r.max_new_tokens} new tokens, micro-batch {t.micro_batch_size}, "
                f"generation batch {r.batch_size or local_seqs}, ZeRO stage {self.zero_stage}, "
                f"LoRA r={self.cfg.model.lora.r}. To use less memory: lower "
                "trainer.micro_batch_size (update) or rollout.batch_size (rollout), set "
                "model.gradient_checkpointing=true, use a ZeRO-3 launch config "
                "(recipes/accelerate/zero3.yaml), or train LoRA adapters (model.lora.r=16)."
            ) from e

    @contextmanager
    def _reference_model(self):
        """The reference policy: its own frozen copy, or (LoRA) the policy with adapters off."""
        if self.reference is not None:
            yield self.reference
            return
        with self.generation_model.disable_adapter():
            yield self.policy

    # ------------------------------------------------------------------ one step
    def step(self) -> dict[str, float]:
        cfg, h = self.cfg, self.harness
        h.start_step()
        # `sampled`: everything rolled out this step; the batch trained on may be a selection.
        sampling_metrics = {}
        if cfg.rollout.dynamic_sampling:
            batch, rewards, results, sampling_metrics, sampled = self._sample_with_signal()
        else:
            batch, rewards, results = sampled = self._sample_round()
        exp = self._make_experience(batch, rewards)
        with self._phase("update"):
            train_metrics = self._update(exp)
        self._check_finite(f"the update of step {self.global_step + 1}")
        h.add_tokens(
            generated=int(sampled[0].completion_mask.sum()),
            trained=int(batch.attention_mask.sum()) * cfg.trainer.epochs,
            samples=batch.num_sequences,
        )
        self.global_step += 1
        record = {"step": self.global_step}
        record.update(self._reward_metrics(*sampled))
        record.update(sampling_metrics)
        record.update(self._experience_metrics(exp))
        record.update(train_metrics)
        record.update(h.end_step())
        if self.samples.due(self.global_step):  # outside the step's timing
            self.samples.write(
                sample_records(
                    self.global_step,
                    problems=[r.problem for r in results[:: cfg.rollout.group_size]],
                    batch=batch,
                    completions=[r.completion for r in results],
                    results=results,
                    advantages=exp.advantages,
                    tokenizer=self.tokenizer,
                    num_prompts=cfg.harness.sample_prompts,
                )
            )
        return record

    def _sample_round(self) -> tuple[RolloutBatch, torch.Tensor, list[ScoredRow]]:
        """One round of this process's share of the next prompts: rollout, then task rewards.
        Each result keeps its completion text and problem, so a selection of rows (dynamic
        sampling) still knows what it holds."""
        cfg = self.cfg
        problems = self._local_problems(self.sampler.next_batch())
        t = cfg.trainer
        advice = divergence_advice(t.lr, t.warmup_steps, t.max_grad_norm)
        with self._phase("rollout"), sampling_guard(f"step {self.global_step + 1}", advice):
            batch = self._rollout([p.question for p in problems])
        with self._phase("reward"):
            rows = [p for p in problems for _ in range(cfg.rollout.group_size)]
            texts = decode_completions(self.tokenizer, batch)
            results = [
                ScoredRow(r.score, r.status, r.extracted, completion=text, problem=p)
                for r, text, p in zip(self.reward_fn(texts, [p.answer for p in rows]), texts, rows)
            ]
            rewards = torch.tensor(
                [r.score for r in results], dtype=torch.float32, device=batch.completion_ids.device
            )
        return batch, rewards, results

    def _sample_with_signal(self):
        """Rounds of `_sample_round` until the batch holds prompts_per_step groups with signal
        (DAPO dynamic sampling; see grpo_lab.dynamic_sampling)."""
        G = self.cfg.rollout.group_size
        return dynamic_sampling.sample_with_signal(
            self._sample_round,
            lambda batch, rewards: algos.groups_with_signal(
                self._training_rewards(batch, rewards), G
            ),
            groups_wanted=self.cfg.rollout.prompts_per_step // self.world,
            max_extra_rounds=self.cfg.rollout.max_extra_rounds,
            global_sum=self._global_sum,
            pad_id=self.tokenizer.pad_token_id,
        )

    def _training_rewards(self, batch: RolloutBatch, rewards: torch.Tensor) -> torch.Tensor:
        """The task rewards [N] plus DAPO's soft overlong punishment when it is on."""
        rw = self.cfg.reward
        if rw.overlong_buffer == 0:
            return rewards
        return rewards + algos.overlong_penalty(
            batch.completion_lengths,
            max_len=self.cfg.rollout.max_new_tokens,
            buffer=rw.overlong_buffer,
            penalty=rw.overlong_penalty,
        )

    def _check_finite(self, when: str) -> None:
        """Stop before a rollout (or a checkpoint) sees non-finite weights; every rank stops."""
        bad = {
            name: non_finite_parameters(self.acc.unwrap_model(model))
            for name, model in (("policy", self.policy), ("critic", self.critic))
            if model is not None
        }
        flag = torch.tensor(float(any(bad.values())), device=self.acc.device)
        if float(self._global_sum(flag)) == 0:
            return
        t = self.cfg.trainer
        names = ", ".join(f"{k}: {', '.join(v)}" for k, v in bad.items() if v) or "on another rank"
        raise DivergenceError(
            f"parameters are NaN or infinite after {when} ({names}); "
            + divergence_advice(t.lr, t.warmup_steps, t.max_grad_norm)
        )

    def _check_entropy(self, history: list[dict]) -> None:
        """Warn or stop when the policy entropy stays beyond divergence.entropy_max/min."""
        d = self.cfg.divergence
        message = entropy_alarm(
            [r["policy/entropy"] for r in history if "policy/entropy" in r],
            vocab_size=self.generation_model.config.vocab_size,
            entropy_max=d.entropy_max,
            entropy_min=d.entropy_min,
            patience=d.patience,
        )
        if message is None:
            return
        t = self.cfg.trainer
        message += f" at step {self.global_step}; " + divergence_advice(
            t.lr, t.warmup_steps, t.max_grad_norm
        )
        if d.action == "stop":
            raise DivergenceError(message + " (divergence.action=warn only warns)")
        logger.warning("%s", message)

    def _local_problems(self, problems):
        per_rank = len(problems) // self.world
        return problems[self.rank * per_rank : (self.rank + 1) * per_rank]

    def _rollout(self, questions: list[str]) -> RolloutBatch:
        cfg, r = self.cfg, self.cfg.rollout
        prompts = [
            render_prompt(
                q,
                template=cfg.data.template,
                tokenizer=self.tokenizer,
                use_chat_template=cfg.data.use_chat_template,
                system_prompt=cfg.data.system_prompt,
            )
            for q in questions
        ]
        # The policy as prepared: under ZeRO-3 the engine gathers its parameters once for the
        # whole rollout and pauses its hooks (grpo_lab.zero3).
        batch = generate(
            self.policy,
            self.tokenizer,
            prompts,
            group_size=r.group_size,
            max_new_tokens=r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            ignore_eos=r.ignore_eos,
            batch_size=r.batch_size,
            backend=self.rollout_backend,
            value_head=self._rollout_value_head,
        )
        batch = batch.to(self.acc.device)
        if self.world > 1:
            # Every rank pads to the longest completion of any rank: the same C gives every rank
            # the same sequence of model calls (and of ZeRO-3 parameter gathers) in the update.
            longest = distributed.global_max(self.acc, batch.completion_len)
            batch = batch.pad_completions(longest, self.tokenizer.pad_token_id)
        return batch

    @functools.cached_property
    def _rollout_value_head(self):
        """The shared-trunk value head, for engines that read values while sampling (the old
        values then cost no forward pass); None otherwise."""
        if not (
            self.value_mode == "head"
            and self.cfg.ppo.values_from_rollout
            and reads_values(self.rollout_backend)
        ):
            return None
        return self.acc.unwrap_model(self.policy).v_head

    def _make_experience(self, batch: RolloutBatch, rewards: torch.Tensor) -> Experience:
        cfg = self.cfg
        rewards = self._training_rewards(batch, rewards)
        mask = batch.completion_mask
        updates_per_batch = cfg.trainer.epochs * cfg.trainer.num_minibatches
        old_logp = old_values = ref_logp = None
        # NOTE: with a single optimizer step per batch the policy that is updated *is* the one that
        # sampled, so the ratio is exactly 1: the old-log-prob forward is skipped and the update
        # uses its own detached log-probs (same gradient, one forward fewer).
        if updates_per_batch > 1 and self.value_mode == "head":
            # One pass of the shared trunk gives both the behaviour log-probs and the values.
            with self._phase("old_logprob"):
                old_logp, old_values = self._no_grad_forward(self.policy, batch, "logp", "values")
        elif updates_per_batch > 1:
            with self._phase("old_logprob"):
                (old_logp,) = self._no_grad_forward(self.policy, batch, "logp")
        if cfg.loss.kl_coef > 0:
            with self._phase("ref"), self._reference_model() as reference:
                (ref_logp,) = self._no_grad_forward(reference, batch, "logp")
        if self.is_ppo and old_values is None and batch.values is not None:
            old_values = batch.values  # read by the rollout engine (value head on the trunk)
        if self.is_ppo and old_values is None:
            with self._phase("values"):
                value_model = self.critic if self.critic is not None else self.policy
                (old_values,) = self._no_grad_forward(value_model, batch, "values")
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
            batch_std = self._global_masked_stats(seq_rewards, torch.ones_like(seq_rewards))[1]
            batch_std = batch_std.sqrt()
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
            advantages = algos.whiten(
                advantages, mask, stats=self._global_masked_stats(advantages, mask)
            )
        if cfg.loss.mask_truncated:  # after the advantages: truncated rows keep their rewards
            batch = dataclasses.replace(
                batch, completion_mask=algos.mask_truncated(mask, batch.truncated)
            )
        return Experience(batch, rewards, old_logp, ref_logp, old_values, advantages, returns)

    # ------------------------------------------------------------------ update
    def _update(self, exp: Experience) -> dict[str, float]:
        t = self.cfg.trainer
        N = exp.batch.num_sequences
        per_minibatch = N // t.num_minibatches
        sums: dict[str, float] = {}
        self._skipped_rows = 0
        n_updates = 0
        grad_norms = []
        for _ in range(t.epochs):
            order = (
                torch.randperm(N, device=exp.rewards.device)
                if t.num_minibatches > 1
                else torch.arange(N)
            )
            for mb in range(t.num_minibatches):
                idx = order[mb * per_minibatch : (mb + 1) * per_minibatch]
                metrics, norm = self._optimizer_step(exp, idx)
                grad_norms.append(norm)
                for k, v in metrics.items():
                    sums[k] = max(sums.get(k, v), v) if k in _MAX_REDUCED else sums.get(k, 0.0) + v
                n_updates += 1
        self.sched.step()
        if self.critic is not None:
            self.critic_sched.step()
        out = {k: v if k in _MAX_REDUCED else v / n_updates for k, v in sums.items()}
        out["optim/grad_norm"] = float(sum(grad_norms) / len(grad_norms))
        out["optim/lr"] = self.sched.get_last_lr()[0]
        out["optim/skipped_steps"] = self.skipped_total
        out["update/zero_advantage_rows_skipped"] = self._skipped_rows / (N * t.epochs)
        return out

    def _optimizer_step(self, exp: Experience, idx: torch.Tensor) -> tuple[dict[str, float], float]:
        """Accumulate gradients over the minibatch `idx`, then clip and step the optimizer(s)."""
        totals, n_micro = self.accumulate_gradients(exp, idx)
        grad_norm = self._clip_and_step(self.policy, self.opt)
        critic_norm = None
        if self.critic is not None:
            critic_norm = self._clip_and_step(self.critic, self.critic_opt)
        # Losses were normalised by global counts, so their sum over micro-batches and processes
        # is the minibatch loss; the other diagnostics are per-micro-batch means, averaged.
        summed = ("loss/", "policy/entropy", "policy/kl_ref", "rollout/logprob_diff_mean")
        summed += ("rollout/logprob_kl",)
        keys = [k for k in totals if k not in _MAX_REDUCED]
        local = torch.stack(
            [
                totals[k] if k.startswith(summed) else totals[k] / (n_micro * self.world)
                for k in keys
            ]
        )
        result = dict(zip(keys, self._global_sum(local).tolist()))
        for k in _MAX_REDUCED & totals.keys():
            result[k] = float(distributed.global_amax(self.acc, totals[k]))
        if critic_norm is not None:
            result["value/grad_norm"] = critic_norm  # already global (clipped over all ranks)
        return result, grad_norm

    def accumulate_gradients(
        self, exp: Experience, idx: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Forward and backward the minibatch `idx` (local row indices) in micro-batches.

        Gradients accumulate in the models' ``.grad``; returns summed diagnostics and the number of
        micro-batches. The result does not depend on ``trainer.micro_batch_size`` or on the number
        of processes: every loss is normalised by the minibatch's global token / sequence counts.
        """
        cfg, t, L = self.cfg, self.cfg.trainer, self.cfg.loss
        mask = exp.batch.completion_mask
        rows = self._rows_with_signal(exp, idx)
        self._skipped_rows += len(idx) - len(rows)
        # Global counts, in one all-reduce: each micro-batch's loss is its share of the whole
        # minibatch's loss summed over every process (DDP/DeepSpeed average gradients over ranks,
        # so _backward multiplies the loss back by the world size). Token-mean diagnostics
        # (entropy, KL) average over the tokens actually run.
        tokens, seqs, run_tokens = self._global_sum(
            torch.stack([mask[idx].sum(), mask.new_tensor(len(idx)), mask[rows].sum()]).float()
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
        totals: dict[str, torch.Tensor] = {}
        for i, mi in enumerate(micro):
            last = i == len(micro) - 1
            b = exp.batch.select(mi)
            m = b.completion_mask
            out = self._forward(self.policy, b, entropy=True)
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
            stats = {
                "loss/policy": pg_loss,
                "policy/entropy": algos.aggregate(out.entropy, m, "token-mean", **token_mean),
            }
            stats.update({f"policy/{k}": v for k, v in pg_metrics.items()})
            mismatch = algos.logprob_mismatch(old_logp, b.sampling_logp, m)
            stats["rollout/logprob_diff_mean"] = mismatch["abs_sum"] / run_tokens
            stats["rollout/logprob_diff_max"] = mismatch["abs_max"]
            stats["rollout/logprob_kl"] = mismatch["kl_sum"] / run_tokens
            if exp.ref_logp is not None:
                kl = algos.kl_penalty(out.logp, exp.ref_logp[mi], kind=L.kl_estimator)
                stats["policy/kl_ref"] = algos.aggregate(kl, m, "token-mean", **token_mean)
                if L.kl_mode == "loss":
                    kl_loss = algos.aggregate(kl, m, L.agg, **counts)
                    loss = loss + L.kl_coef * kl_loss
                    stats["loss/kl"] = kl_loss
            if L.entropy_coef:
                loss = loss + algos.entropy_bonus(
                    out.entropy, m, coef=L.entropy_coef, agg=L.agg, **counts
                )
            if self.value_mode == "head":
                v_loss, v_metrics = self._value_loss(out.values, exp, mi, counts)
                loss = loss + cfg.ppo.vf_coef * v_loss
                stats["loss/value"] = v_loss
                stats.update({f"value/{k}": v for k, v in v_metrics.items()})
            stats["loss/total"] = loss
            self._backward(loss, self.policy, last)
            if self.critic is not None:
                values = self._forward(self.critic, b).values
                v_loss, v_metrics = self._value_loss(values, exp, mi, counts)
                stats["loss/value"] = v_loss
                stats.update({f"value/{k}": v for k, v in v_metrics.items()})
                self._backward(v_loss, self.critic, last)
            for k, v in stats.items():
                v = v.detach().float()
                totals[k] = (
                    torch.maximum(totals.get(k, v), v)
                    if k in _MAX_REDUCED
                    else totals.get(k, 0.0) + v
                )
        return totals, len(micro)

    def _rows_with_signal(self, exp: Experience, idx: torch.Tensor) -> torch.Tensor:
        """The rows of `idx` whose update is not exactly zero (at least one row).

        A row whose advantage is 0 at every token (a GRPO group with identical rewards) adds
        exactly nothing to the clipped policy loss or its gradient, so with no value model and
        no KL or entropy term in the loss it is not run at all; the loss is still normalised by
        the counts of the whole minibatch, so the update is unchanged. With several processes
        every rank must make the same number of forward/backward calls (gradient reductions
        and ZeRO-3 gathers are collective), so each rank keeps as many rows as the rank with
        the most signal, topping its own up with zero-advantage rows.
        """
        L = self.cfg.loss
        if not (
            self.cfg.trainer.skip_zero_advantage
            and self.value_mode is None
            and (L.kl_coef == 0 or L.kl_mode == "reward")
            and L.entropy_coef == 0
        ):
            return idx
        signal = (exp.advantages[idx] != 0).any(dim=-1)  # [len(idx)]
        keep = max(int(signal.sum()), 1)
        keep = distributed.global_max(self.acc, keep)
        # Rows with signal first (stable order), then zero-advantage rows as needed.
        order = torch.argsort((~signal).to(torch.int8), stable=True)
        return idx[order[:keep]]

    def _value_loss(self, values, exp: Experience, mi, counts):
        return algos.value_loss(
            values,
            exp.old_values[mi],
            exp.returns[mi],
            exp.batch.completion_mask[mi],
            clip=self.cfg.ppo.value_clip,
            agg=self.cfg.loss.agg,
            **counts,
        )

    def _backward(self, loss: torch.Tensor, model, last: bool) -> None:
        distributed.backward(self.acc, model, loss, last=last)

    def _clip_and_step(self, model, opt) -> float:
        """Clip, step, zero grads. A non-finite gradient skips the update and is counted."""
        if self.deepspeed:
            return distributed.engine_step(model)
        max_norm = self.cfg.trainer.max_grad_norm
        params = [p for p in model.parameters() if p.requires_grad]
        norm = self.acc.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
        norm = float(norm)
        if not math.isfinite(norm):
            opt.zero_grad(set_to_none=True)
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            logger.warning(
                "non-finite gradient norm at step %d: update skipped", self.global_step + 1
            )
            if self.skipped_in_a_row >= self.cfg.trainer.max_skipped_steps:
                raise RuntimeError(
                    f"{self.skipped_in_a_row} consecutive updates had non-finite gradients; stopping. "
                    "Lower trainer.lr, enable trainer.max_grad_norm, or check the reward."
                )
            return norm
        self.skipped_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ metrics
    def _reward_metrics(
        self, batch: RolloutBatch, rewards: torch.Tensor, results
    ) -> dict[str, float]:
        G = self.cfg.rollout.group_size
        lengths = batch.completion_lengths.float()
        local = torch.stack(
            [
                rewards.sum(),
                (rewards**2).sum(),
                (rewards > 0.5).float().sum(),
                lengths.sum(),
                batch.truncated.float().sum(),
                torch.tensor(float(len(rewards)), device=rewards.device),
                _solved_groups(rewards, G),
                _zero_std_groups(rewards, G),
                torch.tensor(
                    float(sum(r.status in ("timeout", "parse_error") for r in results)),
                    device=rewards.device,
                ),
            ]
        )
        s = self._global_sum(local)
        n = s[5]
        mean = s[0] / n
        var = (s[1] / n - mean**2).clamp(min=0)
        n_groups = n / G
        return {
            "reward/mean": float(mean),
            "reward/std": float(var.sqrt()),
            "reward/accuracy": float(s[2] / n),
            "reward/solved_groups": float(s[6] / n_groups),
            "reward/zero_std_groups": float(s[7] / n_groups),
            "reward/errors": float(s[8]),
            "rollout/completion_len_mean": float(s[3] / n),
            "rollout/truncated_frac": float(s[4] / n),
        }

    def _experience_metrics(self, exp: Experience) -> dict[str, float]:
        mask = exp.batch.completion_mask
        out = {"rollout/old_logprob_pass": float(exp.old_logp is not None)}
        if exp.old_values is not None:
            out["value/explained_variance"] = float(
                algos.explained_variance(exp.old_values, exp.returns, mask)
            )
            out["value/mean"] = float(algos.masked_mean(exp.old_values, mask))
        out["advantage/mean"] = float(algos.masked_mean(exp.advantages, mask))
        return out

    def static_footprint(self) -> dict[str, float]:
        fps = {
            "policy": model_footprint(
                self.acc.unwrap_model(self.policy),
                self.opt.optimizer if hasattr(self.opt, "optimizer") else self.opt,
            )
        }
        if self.critic is not None:
            fps["critic"] = model_footprint(
                self.acc.unwrap_model(self.critic),
                getattr(self.critic_opt, "optimizer", self.critic_opt),
            )
        if self.reference is not None:
            fps["reference"] = model_footprint(self.acc.unwrap_model(self.reference))
        return footprint_metrics(fps)

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy; each process scores its share of the eval problems."""
        local = self.eval_problems[self.rank :: self.world]
        correct = 0.0
        model = self.policy  # as prepared: under ZeRO-3 the engine, see _rollout
        # NOTE: the ZeRO-3 gather is a collective: every rank enters it, even one with no problems.
        with gather_params_for_generation(model):
            if local:
                res = evaluate(
                    model,
                    self.tokenizer,
                    local,
                    k=1,
                    backend=self.rollout_backend,
                    **self.eval_plan.settings(),
                )
                correct = res["eval/greedy_acc"] * len(local)
        s = self._global_sum(torch.tensor([correct, float(len(local))], device=self.acc.device))
        return {
            "step": self.global_step,
            "eval/greedy_acc": float(s[0] / s[1].clamp(min=1)),
            "eval/n": float(s[1]),
        }

    def _maybe_evaluate(self, force: bool = False) -> None:
        every = self.cfg.trainer.eval_every
        due = force or (every > 0 and self.global_step % every == 0)
        if due and self.eval_problems:
            record = self.evaluate()
            self.writer.write(record)
            if self.acc.is_main_process:
                logger.info(
                    "eval step %d: greedy accuracy %.3f on %d held-out problems",
                    record["step"],
                    record["eval/greedy_acc"],
                    int(record["eval/n"]),
                )

    # ------------------------------------------------------------------ loop
    def _out_of_time(self) -> bool:
        """trainer.max_time_s spent; every process stops when any has spent it (one all-reduce)."""
        budget = self.cfg.trainer.max_time_s
        if budget is None:
            return False
        spent = torch.tensor([float(self.harness.total_s >= budget)], device=self.acc.device)
        return bool(self._global_sum(spent) > 0)

    def train(self) -> list[dict]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        history = []
        bar = tqdm(
            total=cfg.trainer.max_steps if cfg.trainer.max_time_s is None else None,
            initial=self.global_step,
            desc=f"{cfg.algorithm}",
            disable=not (cfg.trainer.progress_bar and self.acc.is_main_process),
            dynamic_ncols=True,
        )
        self._check_finite("loading" if self.global_step == 0 else "resuming")
        if self.global_step == 0:
            self._maybe_evaluate(force=True)
        while self.global_step < cfg.trainer.max_steps and not self._out_of_time():
            record = self.step()
            if self.global_step == 1:
                record.update(self.static_footprint())
            self.writer.write(record)
            history.append(record)
            self._check_entropy(history)
            bar.update(1)
            bar.set_postfix(
                reward=f"{record['reward/mean']:.3f}", step_s=f"{record['time/step_s']:.2f}"
            )
            if (
                cfg.trainer.log_every
                and self.global_step % cfg.trainer.log_every == 0
                and not cfg.trainer.progress_bar
            ):
                logger.info(format_step_line(record))
            every = cfg.checkpoint.every
            if every and self.global_step % every == 0:
                self.save_checkpoint()
            if self.global_step < cfg.trainer.max_steps:
                self._maybe_evaluate()
        bar.close()
        self._maybe_evaluate(force=True)
        self.save(self.out_dir / "final")
        self.writer.close()
        if cfg.harness.report_to:
            self.acc.end_training()
        return history

    def save(self, path: Path) -> None:
        """Write the policy (or its LoRA adapter and value head), tokenizer and critic to `path`.

        Written to ``<path>.tmp`` and renamed into place. Under ZeRO-3 every rank takes part in
        gathering the partitioned weights; the main process writes. ``replicas.json`` holds each
        rank's digest of its parameters; ranks that differ raise after the save.
        """
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.acc.wait_for_everyone()
        policy = self.acc.unwrap_model(self.policy)
        failed: list[BaseException] = []

        def write(*steps) -> None:
            """Main process only; a full disk is remembered so every rank stops together."""
            if not self.acc.is_main_process or failed:
                return
            try:
                for step in steps:
                    step()
            except Exception as e:
                if not is_out_of_space(e, path.parent):
                    raise
                failed.append(e)

        replicas = {}  # every rank's digest of its own parameters, checked below
        with gather_params_for_generation(policy):
            replicas["policy"] = distributed.replica_digests(self.acc, policy)
            write(
                lambda: shutil.rmtree(tmp, ignore_errors=True),
                lambda: policy.save_pretrained(tmp),
                lambda: self.tokenizer.save_pretrained(tmp),
            )
        if self.critic is not None:
            critic = self.acc.unwrap_model(self.critic)
            with gather_params_for_generation(critic):
                replicas["critic"] = distributed.replica_digests(self.acc, critic)
                write(lambda: critic.save_pretrained(tmp / "critic"))
        write(
            lambda: (tmp / distributed.REPLICAS_FILE).write_text(
                json.dumps(replicas, indent=2) + "\n"
            )
        )
        if self._global_sum(torch.tensor(float(len(failed)), device=self.acc.device)) > 0:
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full_error(
                path.parent,
                f"the model to {path}",
                "nothing was replaced; free space, then resume=auto continues from the newest "
                "checkpoint",
            ) from (failed[0] if failed else None)
        if self.acc.is_main_process:
            replace_folder(tmp, path)
        self.acc.wait_for_everyone()
        distributed.check_replicas(replicas, str(path / distributed.REPLICAS_FILE))


def _solved_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    return (rewards.view(-1, G) > 0.5).any(dim=1).float().sum()


def _zero_std_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    # Groups whose rewards are all equal carry no GRPO signal (advantage 0 everywhere).
    r = rewards.view(-1, G)
    return (r.max(dim=1).values == r.min(dim=1).values).float().sum()


def _lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f


def train(cfg: Config) -> list[dict]:
    """Run a whole training job described by `cfg`; returns the per-step metric records."""
    start = time.perf_counter()
    trainer = Trainer(cfg)
    history = trainer.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # NOTE: DeepSpeed ZeRO-3 (with offload) aborts at interpreter exit unless every rank
        # meets here and the process group is torn down explicitly.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if trainer.acc.is_main_process:
        logger.info(
            "finished %d steps in %.1f s; outputs in %s",
            trainer.global_step,
            time.perf_counter() - start,
            cfg.output_dir,
        )
    return history
