"""What a run is built from: the models, their optimizers and LR schedules, prepared by accelerate.

    load_models(cfg)                     -> tokenizer, policy, critic, reference, parameter count
    prepare(cfg, acc, policy, critic, reference)
                                         -> the prepared models, AdamW optimizers, schedules
    run_fingerprint(cfg, acc, policy, critic)   -> what a checkpoint resume must match
    static_footprint(acc, policy, opt, ...)      -> mem/* of parameters, gradients, optimizer

:func:`grpo_lab.trainer.setup` calls them in this order. The policy is the causal LM (LoRA
adapters with ``model.lora.r > 0``), wrapped with a value head on its trunk for
``ppo.value=head``; ``ppo.value=critic`` loads a separate critic. The reference exists only with
``loss.kl_coef > 0`` and no LoRA (with LoRA the policy with its adapters off is the reference).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator

from grpo_lab import distributed
from grpo_lab.checkpoint import fingerprint
from grpo_lab.config import Config
from grpo_lab.harness import footprint_metrics, model_footprint
from grpo_lab.models import (
    PolicyWithValueHead,
    apply_lora,
    load_causal_lm,
    load_critic,
    load_reference,
    load_tokenizer,
)


def load_models(cfg: Config, value_mode: str | None):
    """(tokenizer, policy, critic or None, reference or None, policy parameter count)."""
    m = cfg.model
    load_kw = {
        "dtype": m.dtype,
        "attn_implementation": m.attn_implementation,
        "gradient_checkpointing": m.gradient_checkpointing,
        "trust_remote_code": m.trust_remote_code,
    }
    tokenizer = load_tokenizer(m.name_or_path, trust_remote_code=m.trust_remote_code)
    lm = load_causal_lm(m.name_or_path, **load_kw)
    n_params = sum(p.numel() for p in lm.parameters())
    if m.lora.r > 0:
        lm = apply_lora(
            lm,
            r=m.lora.r,
            alpha=m.lora.alpha,
            dropout=m.lora.dropout,
            target_modules=list(m.lora.target_modules),
        )
    policy = PolicyWithValueHead(lm) if value_mode == "head" else lm
    critic = None
    if value_mode == "critic":
        critic = load_critic(cfg.ppo.critic_model or m.name_or_path, **load_kw)
    reference = None
    # With LoRA the reference is the policy with its adapters disabled: no second copy.
    if cfg.loss.kl_coef > 0 and m.lora.r == 0:
        reference = load_reference(
            m.name_or_path,
            dtype=m.dtype,
            attn_implementation=m.attn_implementation,
            trust_remote_code=m.trust_remote_code,
        )
    return tokenizer, policy, critic, reference, n_params


def prepare(cfg: Config, acc: Accelerator, policy, critic, reference) -> dict[str, Any]:
    """AdamW and the LR schedule for the policy (and critic), all prepared by ``acc``."""
    t = cfg.trainer
    deepspeed = distributed.is_deepspeed(acc)
    opt = build_optimizer(policy, t.lr, t, fused=not deepspeed)
    sched = build_schedule(opt, t)
    if deepspeed:
        distributed.configure_deepspeed(
            acc, micro_batch_size=t.micro_batch_size, max_grad_norm=t.max_grad_norm
        )
        # NOTE: the schedulers stay outside the DeepSpeed engines, which would otherwise step
        # them once per optimizer step; here they advance once per RL step.
        policy, opt = acc.prepare(policy, opt)
    else:
        policy, opt, sched = acc.prepare(policy, opt, sched)
    critic_opt = critic_sched = None
    if critic is not None:
        critic_opt = build_optimizer(critic, cfg.ppo.critic_lr or t.lr, t, fused=not deepspeed)
        critic_sched = build_schedule(critic_opt, t)
        if deepspeed:
            critic, critic_opt = acc.prepare(critic, critic_opt)
        else:
            critic, critic_opt, critic_sched = acc.prepare(critic, critic_opt, critic_sched)
    if reference is not None:
        bf16 = cfg.model.dtype == "bfloat16"
        reference = distributed.prepare_reference(acc, reference, bf16=bf16)
    return dict(policy=policy, opt=opt, sched=sched, critic=critic, critic_opt=critic_opt,
                critic_sched=critic_sched, reference=reference)  # fmt: skip


def run_fingerprint(cfg: Config, acc: Accelerator, policy, critic=None) -> dict:
    """What a resume must match. The model's name may change (hub name vs local copy);
    its parameter shapes may not."""
    extra = {
        "algorithm": cfg.algorithm,
        "value_mode": cfg.ppo.value if cfg.algorithm == "ppo" else None,
        "lora_r": cfg.model.lora.r,
        "world_size": acc.num_processes,
    }
    models = {"policy": acc.unwrap_model(policy)}
    if critic is not None:
        models["critic"] = acc.unwrap_model(critic)
    return fingerprint(models, extra)


def static_footprint(
    acc: Accelerator, policy, opt, critic=None, critic_opt=None, reference=None
) -> dict[str, float]:
    """mem/* bytes of the parameters, gradients and optimizer state of every model (as
    prepared)."""
    fps = {"policy": model_footprint(acc.unwrap_model(policy), _bare(opt))}
    if critic is not None:
        fps["critic"] = model_footprint(acc.unwrap_model(critic), _bare(critic_opt))
    if reference is not None:
        fps["reference"] = model_footprint(acc.unwrap_model(reference))
    return footprint_metrics(fps)


def _bare(opt):
    return getattr(opt, "optimizer", opt)


def build_optimizer(module, lr: float, t, *, fused: bool) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters with ``trainer`` settings ``t``."""
    params = [p for p in module.parameters() if p.requires_grad]
    # One fused kernel per step instead of a dozen ops per tensor; DeepSpeed wraps the
    # optimizer in its own flattened partitions, so it keeps torch's default there.
    fused = fused and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, fused=fused or None
    )


def build_schedule(opt, t) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``trainer`` settings ``t``, stepped once per RL step.

    Linear warmup from ``lr / warmup_steps`` (step 0 already trains), then constant, linear or
    cosine decay to 0 at ``max_steps``. NOTE: transformers' ``get_scheduler`` starts warmup at
    lr 0 and would change every recorded run; this one is kept.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(t.lr_scheduler, t.warmup_steps, t.max_steps)
    )


def lr_lambda(kind: str, warmup: int, total: int):
    """The multiplier of the base learning rate at (0-based) RL step ``step``."""

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
