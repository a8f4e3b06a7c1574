"""Run configuration: nested dataclasses, YAML recipes, dotted command-line overrides, validation.

A run is described by one :class:`Config`. It is built in three layers, later ones winning::

    defaults (the dataclasses below)  <-  recipe YAML  <-  overrides "a.b.c=value"

    grpo-lab train recipes/x.yaml trainer.lr=1e-6 rollout.group_size=4 output_dir=runs/a

Conventions:

- Every field is documented by the string literal written right after it (the attribute-docstring
  convention). :func:`describe` reads those strings from this file's source with :mod:`ast`, so
  ``--help`` and ``grpo-lab config --explain`` print exactly what is written here.
- Merging: a YAML mapping for a section merges into that section, key by key; every other value
  (scalars, lists, dicts) replaces the default wholesale. A section left empty in YAML
  (``trainer:`` with nothing under it) reads as ``null`` and is treated as an empty mapping.
- Override values are parsed with ``yaml.safe_load``, so ``true``, ``null``, ``4`` and
  ``[q_proj, v_proj]`` mean what they mean in a recipe. Two conveniences on top:
  a string field takes the raw text when YAML would read something else (``data.template=123``
  gives ``"123"``, ``data.system_prompt=Answer: briefly`` gives that sentence), and a float field
  accepts any string Python's ``float`` parses.
- NOTE: YAML 1.1 (PyYAML) reads ``1e-6`` as the *string* ``"1e-6"``; it needs a dot (``1.0e-6``)
  to be a float. Float fields therefore coerce numeric strings, and int fields accept integral
  floats and numeric strings (``trainer.max_steps=1e4``).
- Values are checked against the annotations (int, float, bool, str, Optional, Literal choices,
  list[...], dict[...], nested dataclasses); bools are never read as ints or vice versa.
- Every problem raises one :class:`ConfigError` (a ``ValueError``) naming the dotted key, the
  recipe file or override it came from, and for unknown keys or choices a close match.
- :meth:`Config.validate` checks ranges and relations between fields; :func:`load_config` calls
  it. The trainer calls it again with the real process count, which adds the per-process
  divisibility checks.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import operator
import textwrap
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from grpo_lab.errors import UserError

__all__ = [
    "AdvantageConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DivergenceConfig",
    "HarnessConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "PPOConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "apply_overrides",
    "describe",
    "format_help",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

#: Estimators whose baseline comes from the other completions of the same prompt.
GROUP_ESTIMATORS = frozenset({"grpo", "rloo"})


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key(s) and, when known, where it came from.

    ``keys`` holds the dotted keys involved (empty for file-level problems).
    """

    kind = "config error"

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters on the policy (peft); the base weights stay frozen when enabled."""

    r: int = 0
    """Adapter rank; 0 disables LoRA and trains every weight."""
    alpha: int = 16
    """LoRA scaling numerator: the adapter output is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Names of the linear layers that get adapters."""


@dataclass
class ModelConfig:
    """The policy model and how it is loaded."""

    name_or_path: str = "builtin:tiny-arith"
    """Hub name, local checkpoint folder, or "builtin:tiny-arith" for the embedded tiny model."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers ("sdpa", "eager", "flash_attention_2"); null = its default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint to run."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters."""


@dataclass
class DataConfig:
    """Prompts and reference answers."""

    name: Literal["arith", "gsm8k", "math"] = "arith"
    """Task: synthetic arithmetic, GSM8K, or MATH."""
    path: str | None = None
    """Local JSONL file of training problems; null = generate (arith) or download from the hub."""
    eval_path: str | None = None
    """Local JSONL file of evaluation problems; null = the task's default evaluation split."""
    template: str = "plain"
    """Name of the prompt template that wraps each question."""
    use_chat_template: bool = False
    """Render prompts with the tokenizer's chat template."""
    system_prompt: str | None = None
    """System message for chat-templated prompts; null = none."""
    max_value: int = 99
    """Arithmetic: largest operand."""
    num_operands: int = 2
    """Arithmetic: operands per problem."""
    ops: list[str] = field(default_factory=lambda: ["+"])
    """Arithmetic: operators to draw from."""
    num_eval: int = 512
    """Number of evaluation problems (the first ones of the evaluation set); 0 = no evaluation."""
    max_prompt_tokens: int | None = None
    """Drop problems whose prompt is longer than this many tokens (the log says how many were
    dropped); null = every prompt must fit the model's context minus rollout.max_new_tokens, and
    a longer one is an error naming its file and row."""


@dataclass
class RolloutConfig:
    """Sampling completions from the policy."""

    group_size: int = 8
    """G: completions sampled per prompt."""
    prompts_per_step: int = 16
    """B: prompts per training step, across all processes; a step trains on B * G completions."""
    max_new_tokens: int = 6
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]; 1 = off."""
    top_k: int | None = None
    """Sample among the k most likely tokens; null = off."""
    ignore_eos: bool = False
    """Keep generating after end-of-sequence until max_new_tokens (fixed-length benchmarks)."""
    batch_size: int | None = None
    """Sequences per generate call on each process; null = all at once."""
    backend: Literal["hf", "shared_prefix", "static", "compiled"] = "shared_prefix"
    """Rollout engine: "shared_prefix" (each prompt prefilled once, its KV cache shared by its G
    samples, a lean decode loop; same tokens as "hf" for the same seed), "static" (the same with
    fixed-shape decode steps over a static KV cache; sdpa/eager attention), "compiled" ("static"
    with the decode step under torch.compile: CUDA graphs on a GPU; compiles on first use; not
    with ZeRO-3) or "hf" (transformers generate)."""
    sampler: Literal["multinomial", "inverse_cdf"] = "multinomial"
    """How grpo_lab's engines draw a token: "multinomial" (torch.multinomial, the same random
    stream as transformers generate) or "inverse_cdf" (one uniform per row in the cumulative
    distribution: the same distribution, another stream; much cheaper on CPU with large
    vocabularies). Not with backend "hf"."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476, eq. 11): drop the groups whose G
    rewards are all equal (no group-relative signal) and sample further rounds of
    prompts_per_step prompts until prompts_per_step groups with signal are found, or
    max_extra_rounds rounds have run (the batch is then topped up with the dropped groups, which
    train nothing). Group estimators (grpo, rloo) only."""
    max_extra_rounds: int = 4
    """Dynamic sampling: most extra rollout rounds per training step; 0 = filter only, never
    resample."""


@dataclass
class RewardConfig:
    """Scoring completions."""

    timeout_s: float = 2.0
    """Seconds allowed to score one completion; a completion that runs over gets reward 0."""
    num_workers: int = 1
    """Worker processes that score completions."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13): the last this
    many tokens before rollout.max_new_tokens, over which a penalty grows linearly from 0 to
    overlong_penalty and is subtracted from the reward (a completion's length counts its EOS);
    0 = off."""
    overlong_penalty: float = 1.0
    """Soft overlong punishment: the penalty at rollout.max_new_tokens (the paper's is 1)."""


@dataclass
class LossConfig:
    """Policy loss, KL penalty, entropy bonus."""

    policy_loss: str = "ppo"
    """Policy loss, by name in algos.POLICY_LOSSES."""
    clip_low: float = 0.2
    """Lower clip range: the ratio is clipped below at 1 - clip_low."""
    clip_high: float | None = None
    """Upper clip range: the ratio is clipped above at 1 + clip_high; null = clip_low."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss for negative advantages; null = off."""
    agg: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    """How per-token losses are reduced to one number."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference model; 0 = no reference model is loaded."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman's k1, k2, k3)."""
    kl_mode: Literal["loss", "reward"] = "loss"
    """Where the KL goes: a loss term (GRPO) or a per-token reward penalty (classic PPO)."""
    entropy_coef: float = 0.0
    """Entropy bonus (PPO, Schulman et al. 2017, eq. 9): this weight times the policy's entropy,
    aggregated like the policy loss (loss.agg), is subtracted from the loss; 0 = off."""
    mask_truncated: bool = False
    """DAPO overlong filtering (Yu et al. 2025, arXiv:2503.14476, section 3.4): completions cut
    off at rollout.max_new_tokens are masked out of the loss and its normaliser (they still
    count in their group's reward statistics)."""
    rollout_is: Literal["truncate", "mask"] | None = None
    """Correct for the rollout engine's log-probs differing from the training forward's: weight
    each token's policy loss by rho = pi_train / pi_sampler, truncated at rollout_is_cap
    ("truncate": TIS, Yao et al. 2025) or set to 0 above it ("mask": MIS, Liu et al. 2025);
    null = off (the mismatch is still logged as rollout/logprob_*)."""
    rollout_is_level: Literal["token", "sequence"] = "token"
    """Importance ratio per token, or per sequence (the product over its tokens)."""
    rollout_is_cap: float = 2.0
    """Rollout correction: the cap C >= 1 on the importance ratio."""


@dataclass
class AdvantageConfig:
    """Turning rewards into advantages."""

    estimator: str | None = None
    """Estimator, by name in algos.ADVANTAGE_ESTIMATORS; null = "grpo" for algorithm grpo, "gae" for ppo."""
    scale: Literal["group", "batch", "none"] = "group"
    """Group estimators: divide by the reward std of the group, of the whole batch (all
    processes), or not at all."""
    gamma: float = 1.0
    """GAE discount, in [0, 1]."""
    lam: float = 0.95
    """GAE lambda, in [0, 1]."""
    whiten: bool | None = None
    """Whiten advantages over the batch; null = true for gae, false otherwise."""


@dataclass
class PPOConfig:
    """The learned value function (algorithm ppo only)."""

    value: Literal["head", "critic"] = "head"
    """Value head on the policy's trunk, or a separate critic model."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float | None = 0.2
    """Clip value updates to +- value_clip around the rollout values; null = off."""
    critic_model: str | None = None
    """Critic checkpoint (ppo.value=critic); null = the policy's checkpoint."""
    critic_lr: float | None = None
    """Critic learning rate (ppo.value=critic); null = trainer.lr."""
    values_from_rollout: bool = True
    """ppo.value=head: read the rollout-time values off the sampling forwards (engines
    shared_prefix and static) instead of a separate no-grad values pass (the same values, to
    float rounding, for a model without dropout: the rollout runs in eval mode); false = always
    the separate pass."""


@dataclass
class TrainerConfig:
    """Optimisation schedule."""

    max_steps: int = 100
    """Training steps; each samples one rollout batch and trains on it."""
    max_time_s: float | None = None
    """Wall-clock budget: stop after the first step that brings the run's cumulative step time
    (``time/total_s``, evaluation excluded) to this many seconds, or at max_steps, whichever
    comes first; null = no budget. The learning-rate schedule still spans max_steps."""
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    warmup_steps: int = 0
    """Training steps of linear learning-rate warmup from 0."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup (linear and cosine decay to 0 at max_steps)."""
    epochs: int = 1
    """mu: passes over each rollout batch."""
    num_minibatches: int = 1
    """Optimizer updates per epoch; the rollout batch is split into this many minibatches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on each process (gradient accumulation fills a minibatch)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null = no clipping."""
    max_skipped_steps: int = 5
    """Consecutive non-finite updates tolerated (and skipped) before training stops."""
    log_every: int = 1
    """Log metrics every this many training steps."""
    eval_every: int = 0
    """Evaluate every this many training steps; 0 = only at the start and the end."""
    progress_bar: bool = True
    """Show a progress bar on the main process."""
    skip_zero_advantage: bool = True
    """Do not run forward/backward for sequences whose advantage is 0 everywhere (GRPO groups
    with identical rewards): their gradient is exactly zero. Applies to GRPO with no KL-in-loss
    or entropy term; with several processes each runs as many rows as the one with the most
    signal. The update is identical either way."""
    max_logit_elements: int | None = 2**26
    """Most logits (rows x positions x vocabulary) the training / scoring forwards let the model
    materialise; above it the LM head runs chunk by chunk on the last hidden state (same
    results, checkpointed; e.g. ~2.5 GB less on a 152k vocabulary x 16 x 256). null = never
    chunk."""
    share_prompts: bool = True
    """Run each distinct prompt once per training / scoring forward and share its keys and
    values with the rows that sampled it (same outputs and gradients as the full forward;
    prompt compute / G). Used with eager or sdpa attention; other implementations fall back to
    the full forward."""
    cpu_threads: int | None = None
    """Threads torch may use on CPU; null = torch's default. Tiny models run fastest on 1, and
    several threads on a busy machine can be many times slower than one."""


@dataclass
class CheckpointConfig:
    """Saving checkpoints into output_dir."""

    every: int = 0
    """Save every this many training steps; 0 = only at the end."""
    keep: int = 2
    """Newest complete checkpoints kept; older ones are deleted."""


@dataclass
class DivergenceConfig:
    """Guards that stop (or warn about) a run whose policy has broken down."""

    entropy_max: float | None = 0.95
    """Explosion: the mean token entropy of the update (policy/entropy) above this fraction of
    the uniform distribution's entropy (ln of the vocabulary size), in a run whose first step was
    below it, means the policy has turned to noise (a learning rate far too high); null = off."""
    entropy_min: float | None = None
    """Collapse: policy/entropy below this many nats means the policy samples one sequence
    whatever the prompt; null = off (a policy that has learned its task is legitimately sure)."""
    patience: int = 2
    """Consecutive training steps out of bounds before the action is taken."""
    action: Literal["warn", "stop"] = "stop"
    """What a guard does: log a warning each time, or stop the run (exit code 3; the checkpoints
    written before are kept, so it can resume with other settings)."""


@dataclass
class HarnessConfig:
    """Measurement and experiment tracking."""

    peak_tflops: float | None = None
    """Peak TFLOP/s used for MFU; null = look the device up."""
    report_to: list[str] = field(default_factory=list)
    """Trackers to log to through accelerate, e.g. ["tensorboard", "wandb"]; each needs its
    package (pip install 'grpo_lab[tensorboard]', '[wandb]', '[trackio]'), checked at start-up."""
    sample_every: int = 10
    """Write completion samples to samples.jsonl (and as a table to the trackers) every this many
    training steps and at the last step; 0 = the last step only."""
    sample_prompts: int = 2
    """Prompts per sample, each with all its rollout.group_size completions; 0 = no samples."""


@dataclass
class Config:
    """Everything one run needs; see the module docstring for how it is assembled."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    """RL algorithm: grpo (group-relative advantages, no value model) or ppo (learned value)."""
    seed: int = 0
    """Random seed for data, initialisation and sampling."""
    output_dir: str = "runs/default"
    """Run folder: resolved config, metrics and checkpoints are written here."""
    resume: str | None = None
    """Resume from "auto" (newest complete checkpoint in output_dir) or a checkpoint path; null = fresh."""
    overwrite: bool = False
    """A fresh run (resume null) into an output_dir that holds another run deletes that run's
    files first; false = refuse, naming resume=auto and overwrite=true."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task and prompts."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward scoring."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy loss and regularisers."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage estimation."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Value function (algorithm ppo)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Optimisation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """Divergence guards."""
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    """Measurement."""

    def resolved_estimator(self) -> str:
        """The advantage estimator in effect: advantage.estimator, or the algorithm's default."""
        if self.advantage.estimator is not None:
            return self.advantage.estimator
        return "gae" if self.algorithm == "ppo" else "grpo"

    def resolved_whiten(self) -> bool:
        """Whether advantages are whitened: advantage.whiten, or true exactly for gae."""
        if self.advantage.whiten is not None:
            return self.advantage.whiten
        return self.resolved_estimator() == "gae"

    def validate(self, num_processes: int = 1) -> None:
        """Check ranges and relations between fields; raise :class:`ConfigError` on the first problem.

        ``num_processes`` adds the checks that depend on how a step is split across processes
        (the trainer passes its world size; 1 checks what holds for any world size).
        """
        _check_finite(self, Config, "")
        _check_bounds(self)
        _check_relations(self, num_processes)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}

# (dotted key, comparison, bound). Optional fields set to null are not checked.
_BOUNDS: tuple[tuple[str, str, float], ...] = (
    ("seed", ">=", 0),
    ("model.lora.r", ">=", 0),
    ("model.lora.alpha", ">", 0),
    ("model.lora.dropout", ">=", 0),
    ("model.lora.dropout", "<", 1),
    ("data.max_value", ">=", 1),
    ("data.num_operands", ">=", 2),
    ("data.num_eval", ">=", 0),
    ("rollout.group_size", ">=", 1),
    ("rollout.prompts_per_step", ">=", 1),
    ("rollout.max_new_tokens", ">=", 1),
    ("rollout.temperature", ">", 0),
    ("rollout.top_p", ">", 0),
    ("rollout.top_p", "<=", 1),
    ("rollout.top_k", ">=", 1),
    ("rollout.batch_size", ">=", 1),
    ("reward.timeout_s", ">", 0),
    ("reward.num_workers", ">=", 1),
    ("reward.overlong_buffer", ">=", 0),
    ("reward.overlong_penalty", ">=", 0),
    ("rollout.max_extra_rounds", ">=", 0),
    ("loss.rollout_is_cap", ">=", 1),
    ("loss.clip_low", ">", 0),
    ("loss.clip_high", ">", 0),
    ("loss.dual_clip", ">", 1),
    ("loss.kl_coef", ">=", 0),
    ("loss.entropy_coef", ">=", 0),
    ("advantage.gamma", ">=", 0),
    ("advantage.gamma", "<=", 1),
    ("advantage.lam", ">=", 0),
    ("advantage.lam", "<=", 1),
    ("ppo.vf_coef", ">=", 0),
    ("ppo.value_clip", ">", 0),
    ("ppo.critic_lr", ">", 0),
    ("trainer.max_steps", ">=", 1),
    ("trainer.max_time_s", ">", 0),
    ("trainer.lr", ">", 0),
    ("trainer.weight_decay", ">=", 0),
    ("trainer.warmup_steps", ">=", 0),
    ("trainer.epochs", ">=", 1),
    ("trainer.num_minibatches", ">=", 1),
    ("trainer.micro_batch_size", ">=", 1),
    ("trainer.cpu_threads", ">=", 1),
    ("trainer.max_logit_elements", ">=", 1),
    ("trainer.max_grad_norm", ">", 0),
    ("trainer.max_skipped_steps", ">=", 0),
    ("trainer.log_every", ">=", 1),
    ("trainer.eval_every", ">=", 0),
    ("checkpoint.every", ">=", 0),
    ("checkpoint.keep", ">=", 1),
    ("harness.peak_tflops", ">", 0),
    ("data.max_prompt_tokens", ">=", 1),
    ("divergence.entropy_max", ">", 0),
    ("divergence.entropy_max", "<=", 1),
    ("divergence.entropy_min", ">=", 0),
    ("divergence.patience", ">=", 1),
    ("harness.sample_every", ">=", 0),
    ("harness.sample_prompts", ">=", 0),
)


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_finite(obj: Any, cls: type, prefix: str) -> None:
    for name, tp in _field_types(cls).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(tp):
            _check_finite(value, tp, f"{prefix}{name}.")
            continue
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{prefix}{name}: must be finite, got {value!r}", [prefix + name])


def _check_bounds(config: Config) -> None:
    for key, op, bound in _BOUNDS:
        value = _get(config, key)
        if value is not None and not _OPS[op](value, bound):
            raise ConfigError(f"{key}: must be {op} {bound}, got {value!r}", [key])
    for key in ("output_dir", "model.name_or_path", "loss.policy_loss"):
        if not _get(config, key):
            raise ConfigError(f"{key}: must not be empty", [key])
    if not config.data.ops:
        raise ConfigError("data.ops: must not be empty", ["data.ops"])
    betas = config.trainer.adam_betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(
            f"trainer.adam_betas: must be two numbers in [0, 1), got {betas!r}",
            ["trainer.adam_betas"],
        )


def _registry_names(name: str) -> set[str] | None:
    """Names registered in ``grpo_lab.algos.<name>``, or None when that registry is not there.

    Imported lazily so that reading a config does not import torch.
    """
    try:
        registry = getattr(importlib.import_module("grpo_lab.algos"), name)
    except (ImportError, AttributeError):
        return None
    return set(registry.keys() if hasattr(registry, "keys") else registry)


def _check_registered(key: str, value: str, registry: str) -> None:
    names = _registry_names(registry)
    if names is not None and value not in names:
        raise ConfigError(
            f"{key}: must be one of {sorted(names)!r}, got {value!r}{did_you_mean(value, names)}",
            [key],
        )


def _check_relations(cfg: Config, num_processes: int) -> None:
    estimator = cfg.resolved_estimator()
    est_name = (
        f"advantage.estimator {estimator!r}"
        if cfg.advantage.estimator is not None
        else f"advantage.estimator {estimator!r} (the default for algorithm {cfg.algorithm!r})"
    )
    _check_registered("loss.policy_loss", cfg.loss.policy_loss, "POLICY_LOSSES")
    _check_registered("advantage.estimator", estimator, "ADVANTAGE_ESTIMATORS")

    if estimator in GROUP_ESTIMATORS and cfg.rollout.group_size < 2:
        raise ConfigError(
            f"{est_name} needs rollout.group_size >= 2, got {cfg.rollout.group_size}: "
            "its baseline comes from the other completions of the same prompt",
            ["advantage.estimator", "rollout.group_size"],
        )
    if estimator == "gae" and cfg.algorithm != "ppo":
        raise ConfigError(
            f"{est_name} needs algorithm 'ppo' (a learned value), got algorithm {cfg.algorithm!r}",
            ["advantage.estimator", "algorithm"],
        )
    for key in ("ppo.critic_model", "ppo.critic_lr"):
        if _get(cfg, key) is not None and cfg.ppo.value != "critic":
            raise ConfigError(
                f"{key} is set but ppo.value is {cfg.ppo.value!r}; it only applies to 'critic'",
                [key, "ppo.value"],
            )
    if cfg.rollout.sampler != "multinomial" and cfg.rollout.backend == "hf":
        raise ConfigError(
            f"rollout.sampler {cfg.rollout.sampler!r} needs one of grpo_lab's own engines "
            "(rollout.backend shared_prefix, static or compiled); 'hf' samples as generate does",
            ["rollout.sampler", "rollout.backend"],
        )
    if cfg.rollout.dynamic_sampling and estimator not in GROUP_ESTIMATORS:
        raise ConfigError(
            f"rollout.dynamic_sampling needs a group estimator ({sorted(GROUP_ESTIMATORS)}), "
            f"got {est_name}: only group-relative advantages vanish when a group's rewards agree",
            ["rollout.dynamic_sampling", "advantage.estimator"],
        )
    if cfg.loss.mask_truncated and cfg.rollout.ignore_eos:
        raise ConfigError(
            "loss.mask_truncated with rollout.ignore_eos would mask every completion out of the "
            "loss (each one runs to max_new_tokens); turn one of them off",
            ["loss.mask_truncated", "rollout.ignore_eos"],
        )
    if cfg.reward.overlong_buffer > cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"reward.overlong_buffer ({cfg.reward.overlong_buffer}) must be <= "
            f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens})",
            ["reward.overlong_buffer", "rollout.max_new_tokens"],
        )
    if cfg.model.lora.r > 0 and not cfg.model.lora.target_modules:
        raise ConfigError(
            "model.lora.target_modules: must not be empty when model.lora.r > 0",
            ["model.lora.target_modules", "model.lora.r"],
        )
    _check_batch_split(cfg, num_processes)


def _check_batch_split(cfg: Config, num_processes: int) -> None:
    """Each process must get whole prompts and equal minibatches.

    With P processes a step's B * G sequences split into B / P prompts per process, then into
    num_minibatches minibatches of B * G / (P * num_minibatches) sequences, each accumulated from
    micro-batches of at most micro_batch_size (the last may be smaller: losses are normalised by
    global counts, so a ragged split changes nothing but memory). A short run may have
    warmup_steps > max_steps: the learning rate then simply never reaches its peak.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    prompts, group = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    minibatches = cfg.trainer.num_minibatches
    if prompts % num_processes:
        raise ConfigError(
            f"rollout.prompts_per_step ({prompts}) must be divisible by the number of "
            f"processes ({num_processes})",
            ["rollout.prompts_per_step"],
        )
    per_process = prompts * group // num_processes
    if per_process % minibatches:
        raise ConfigError(
            "rollout.prompts_per_step * rollout.group_size / processes "
            f"({prompts} * {group} / {num_processes} = {per_process}) must be divisible by "
            f"trainer.num_minibatches ({minibatches})",
            ["rollout.prompts_per_step", "rollout.group_size", "trainer.num_minibatches"],
        )


# ---------------------------------------------------------------------------------------------
# Types and coercion
# ---------------------------------------------------------------------------------------------


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of every dataclass field of ``cls``, in declaration order."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_str(tp: Any) -> str:
    """Readable type: ``int``, ``float | None``, ``list[str]``, ``{grpo,ppo}`` for a Literal."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if _is_union(tp):
        return " | ".join(_type_str(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_str(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


_EXPECTED = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to annotation ``tp``; a ConfigError names ``key`` when it does not fit."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                if len(options) == 1:
                    raise
        expected = " or ".join(_type_str(a) for a in options)
        raise ConfigError(f"{key}: expected {expected}, got {value!r}", [key])
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        choices = list(args)
        hint = did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: must be one of {choices!r}, got {value!r}{hint}", [key])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif tp is float:
        number = _as_number(value)
        if number is not None:
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
        hint = "" if value is None else " (quote it in YAML)"
        raise ConfigError(f"{key}: expected a string, got {value!r}{hint}", [key])
    elif origin is list or tp is list:
        if isinstance(value, list | tuple):
            item = args[0] if args else Any
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{key}: expected a list, got {value!r}", [key])
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            key_tp, value_tp = args if args else (Any, Any)
            return {
                _coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}")
                for k, v in value.items()
            }
        raise ConfigError(f"{key}: expected a mapping, got {value!r}", [key])
    elif dataclasses.is_dataclass(tp):
        instance = tp()
        _merge(instance, value, f"{key}.", {}, "")
        return instance
    else:
        raise TypeError(f"{key}: unsupported annotation {tp!r}")
    raise ConfigError(f"{key}: expected {_EXPECTED[tp]}, got {value!r}", [key])


def _as_number(value: Any) -> int | float | None:
    """An int or float read from ``value`` (numbers, numeric strings), or None. Bools are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _accepts_str(tp: Any) -> bool:
    if _is_union(tp):
        return any(_accepts_str(a) for a in get_args(tp))
    return tp is str


# ---------------------------------------------------------------------------------------------
# Keys, suggestions, merging
# ---------------------------------------------------------------------------------------------


@functools.cache
def _known_keys(cls: type) -> tuple[str, ...]:
    """Every dotted key of ``cls``: sections and leaves, in declaration order."""
    keys: list[str] = []
    for name, tp in _field_types(cls).items():
        keys.append(name)
        if dataclasses.is_dataclass(tp):
            keys.extend(f"{name}.{sub}" for sub in _known_keys(tp))
    return tuple(keys)


def did_you_mean(word: str, candidates: Sequence[str] | set[str]) -> str:
    """' (did you mean X?)' with the closest of ``candidates``, or '' when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown_key(key: str) -> ConfigError:
    """Error for an unknown dotted key, suggesting the closest known key.

    A right name in the wrong section (``lr``, ``trainer.group_size``) is suggested in its
    section; otherwise the whole dotted key, then its last part, is matched with difflib.
    """
    known = _known_keys(Config)
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
    if leaf in by_leaf:
        hint = f" (did you mean {by_leaf[leaf]!r}?)"
    else:
        hint = did_you_mean(key, known)
    if not hint:
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1)
        hint = f" (did you mean {by_leaf[near[0]]!r}?)" if near else ""
    return ConfigError(f"unknown key {key!r}{hint}", [key])


def _merge(obj: Any, mapping: Any, prefix: str, origins: dict[str, str], source: str) -> None:
    """Merge ``mapping`` into dataclass instance ``obj`` in place, coercing every value.

    ``prefix`` is the dotted path of ``obj`` ("" or "trainer."); ``origins`` records ``source``
    for every leaf key set.
    """
    if mapping is None:
        return
    if not isinstance(mapping, Mapping):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping, got {mapping!r}", [prefix.rstrip(".")])
    fields = _field_types(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key)
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            _merge(getattr(obj, name), value, f"{key}.", origins, source)
        else:
            setattr(obj, name, _coerce(value, tp, key))
            origins[key] = source


def _override_to_mapping(text: str) -> dict[str, Any]:
    """``"a.b.c=value"`` as the nested mapping ``{"a": {"b": {"c": value}}}``, value parsed."""
    key, _, raw = text.partition("=")
    key = key.strip()
    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp) or part not in _field_types(tp):
            if dataclasses.is_dataclass(tp):
                raise _unknown_key(key)
            section = ".".join(parts[:i])
            raise ConfigError(
                f"unknown key {key!r}: {section!r} is a value of type {_type_str(tp)}, "
                "not a section",
                [key],
            )
        tp = _field_types(tp)[part]
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if not _accepts_str(tp):
            raise ConfigError(f"{key}: cannot parse {raw!r} as YAML ({exc})", [key]) from None
        value = raw
    if _accepts_str(tp) and value is not None and not isinstance(value, str):
        value = raw
    for part in reversed(parts):
        value = {part: value}
    return value


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _with_source(error: ConfigError, source: str) -> ConfigError:
    return ConfigError(f"{source}: {error}", error.keys)


def _apply_overrides(config: Config, overrides: Sequence[str], origins: dict[str, str]) -> None:
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    for text in overrides:
        if "=" not in text or not text.partition("=")[0].strip():
            raise ConfigError(
                f"malformed override {text!r}: expected key=value, e.g. trainer.lr=1e-6", [text]
            )
        source = f"override {text!r}"
        try:
            _merge(config, _override_to_mapping(text), "", origins, source)
        except ConfigError as exc:
            raise _with_source(exc, source) from None


def _validate(config: Config, origins: Mapping[str, str]) -> None:
    """Validate, adding to the message where the keys involved were set."""
    try:
        config.validate()
    except ConfigError as exc:
        sources = list(dict.fromkeys(origins[k] for k in exc.keys if k in origins))
        if not sources:
            raise
        raise ConfigError(f"{exc} (set in {', '.join(sources)})", exc.keys) from None


def from_dict(data: Mapping[str, Any] | None, source: str = "config") -> Config:
    """A validated Config from a nested mapping merged onto the defaults.

    ``source`` names where the mapping came from in error messages.
    """
    config, origins = Config(), {}
    try:
        _merge(config, data, "", origins, source)
    except ConfigError as exc:
        raise _with_source(exc, source) from None
    _validate(config, origins)
    return config


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A validated copy of ``config`` with ``key=value`` overrides applied; ``config`` is unchanged."""
    result, origins = copy.deepcopy(config), {}
    _apply_overrides(result, overrides, origins)
    _validate(result, origins)
    return result


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated.

    Raises :class:`ConfigError` naming the file for a missing or malformed file.
    """
    config, origins = Config(), {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if data is not None and not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {data!r}")
        try:
            _merge(config, data, "", origins, str(path))
        except ConfigError as exc:
            raise _with_source(exc, str(path)) from None
    _apply_overrides(config, overrides, origins)
    _validate(config, origins)
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """``config`` as nested plain dicts and lists (a deep copy), ready for YAML or JSON."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML; ``load_config(path)`` gives back an equal Config."""
    text = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)
    # Written aside and renamed, so a full disk never leaves a run with half a config.
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls``: the string literal written right after each field.

    Read from the source with ``ast``; empty when the source is not available.
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _walk(cls: type, obj: Any, prefix: str = ""):
    """Yield ``(dotted_key, annotation, value, doc)`` for sections and leaves, in order."""
    docs = _field_docs(cls)
    for name, tp in _field_types(cls).items():
        value = getattr(obj, name)
        yield prefix + name, tp, value, docs.get(name, "")
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, value, f"{prefix}{name}.")


def describe(config: type[Config] | Config = Config) -> list[tuple[str, str, Any, str]]:
    """One ``(dotted_key, type_str, value, help)`` per leaf field, in declaration order.

    Given the class, ``value`` is the default; given an instance, it is that instance's value.
    """
    instance = config() if isinstance(config, type) else config
    return [
        (key, _type_str(tp), value, doc)
        for key, tp, value, doc in _walk(type(instance), instance)
        if not dataclasses.is_dataclass(tp)
    ]


def _render(value: Any) -> str:
    """``value`` written the way it would be typed in YAML or an override."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n...\n").strip()


def format_help(config: type[Config] | Config = Config) -> str:
    """Every key with its type, value (default, or the instance's) and documentation, as text."""
    instance = config() if isinstance(config, type) else config
    lines: list[str] = []
    for key, tp, value, doc in _walk(type(instance), instance):
        indent = "  " * key.count(".")
        if dataclasses.is_dataclass(tp):
            lines += ["", f"{indent}{key}:  {doc}"]
            continue
        lines.append(f"{indent}{key}: {_type_str(tp)} = {_render(value)}")
        lines += [f"{indent}    {line}" for line in doc.splitlines()]
    return "\n".join(lines).lstrip("\n") + "\n"
