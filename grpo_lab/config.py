"""Run configuration: the settings of one run, as pydantic models.

A run is described by one :class:`Config`, built in three layers, later ones winning::

    defaults (the models below)  <-  recipe YAML  <-  overrides "a.b.c=value"

    grpo-lab train recipes/x.yaml trainer.lr=1e-6 rollout.group_size=4 output_dir=runs/a

Each field has a type, default, bounds (``Field(ge=...)``) and a doc (the string after it, which
``grpo-lab config --explain`` prints). A choice field names the registry holding its values
(``rollout.backend``: ``grpo_lab.rollout.ROLLOUT_BACKENDS``). Rules relating several fields are
:meth:`Config._relations`. :mod:`grpo_lab.recipe` reads recipes and overrides and words errors:
one :class:`ConfigError` line naming the key and the file or override that set it (exit code 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grpo_lab import recipe
from grpo_lab.recipe import ConfigError, Float, Int, NonEmpty, registered
from grpo_lab.recipe import did_you_mean as did_you_mean

#: Estimators whose baseline comes from the other completions of the same prompt.
GROUP_ESTIMATORS = frozenset({"grpo", "rloo"})

# Choice fields: the keys of these registries (checked on load, listed by --explain).
Dtype = registered("grpo_lab.models", "DTYPES")
Dataset = registered("grpo_lab.data", "DATASETS")
PromptTemplate = registered("grpo_lab.data", "PROMPT_TEMPLATES")
Backend = registered("grpo_lab.rollout", "ROLLOUT_BACKENDS")
Sampler = registered("grpo_lab.rollout", "SAMPLERS")
PolicyLoss = registered("grpo_lab.algos", "POLICY_LOSSES")
AggMode = registered("grpo_lab.algos", "AGG_MODES")
KlEstimator = registered("grpo_lab.algos", "KL_KINDS")
RolloutIsMode = registered("grpo_lab.algos", "ROLLOUT_IS_MODES")
RolloutIsLevel = registered("grpo_lab.algos", "ROLLOUT_IS_LEVELS")
Estimator = registered("grpo_lab.algos", "ADVANTAGE_ESTIMATORS")
AdvantageScale = registered("grpo_lab.algos", "ADVANTAGE_SCALES")


class Section(BaseModel):
    """A group of settings: unknown keys are errors, values strict, docs the strings after fields."""

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class LoraConfig(Section):
    """Low-rank adapters on the policy (peft); the base weights stay frozen when enabled."""

    r: Int = Field(0, ge=0)
    """Adapter rank; 0 disables LoRA and trains every weight."""
    alpha: Int = Field(16, gt=0)
    """LoRA scaling numerator: the adapter output is multiplied by alpha / r."""
    dropout: Float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Names of the linear layers that get adapters."""


class ModelConfig(Section):
    """The policy model and how it is loaded."""

    name_or_path: NonEmpty = "builtin:tiny-arith"
    """Hub name, local checkpoint folder, or "builtin:tiny-arith" for the embedded tiny model."""
    dtype: Dtype = "float32"
    """Dtype the weights are loaded in."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers ("sdpa", "eager", "flash_attention_2"); null = its default."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint to run."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """LoRA adapters."""


class DataConfig(Section):
    """Prompts and reference answers."""

    name: Dataset = "arith"
    """Task: synthetic arithmetic, GSM8K, or MATH."""
    path: str | None = None
    """Local JSONL file of training problems; null = generate (arith) or download from the hub."""
    eval_path: str | None = None
    """Local JSONL file of evaluation problems; null = the task's default evaluation split."""
    template: PromptTemplate = "plain"
    """Name of the prompt template that wraps each question."""
    use_chat_template: bool = False
    """Render prompts with the tokenizer's chat template."""
    system_prompt: str | None = None
    """System message for chat-templated prompts; null = none."""
    max_value: Int = Field(99, ge=1)
    """Arithmetic: largest operand."""
    num_operands: Int = Field(2, ge=2)
    """Arithmetic: operands per problem."""
    ops: list[str] = Field(["+"], min_length=1)
    """Arithmetic: operators to draw from."""
    num_eval: Int = Field(512, ge=0)
    """Number of evaluation problems (the first ones of the evaluation set); 0 = no evaluation."""
    max_prompt_tokens: Int | None = Field(None, ge=1)
    """Drop problems whose prompt is longer than this many tokens (the log says how many were
    dropped); null = every prompt must fit the model's context minus rollout.max_new_tokens, and
    a longer one is an error naming its file and row."""


class RolloutConfig(Section):
    """Sampling completions from the policy."""

    group_size: Int = Field(8, ge=1)
    """G: completions sampled per prompt."""
    prompts_per_step: Int = Field(16, ge=1)
    """B: prompts per training step, across all processes; a step trains on B * G completions."""
    max_new_tokens: Int = Field(6, ge=1)
    """Longest completion, in tokens."""
    temperature: Float = Field(1.0, gt=0)
    """Sampling temperature (> 0)."""
    top_p: Float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass, in (0, 1]; 1 = off."""
    top_k: Int | None = Field(None, ge=1)
    """Sample among the k most likely tokens; null = off."""
    ignore_eos: bool = False
    """Keep generating after end-of-sequence until max_new_tokens (fixed-length benchmarks)."""
    batch_size: Int | None = Field(None, ge=1)
    """Sequences per generate call on each process; null = all at once."""
    backend: Backend = "shared_prefix"
    """Rollout engine: "shared_prefix" (each prompt prefilled once, its KV cache shared by its G
    samples, a lean decode loop; same tokens as "hf" for the same seed), "static" (the same with
    fixed-shape decode steps over a static KV cache; sdpa/eager attention), "compiled" ("static"
    with the decode step under torch.compile: CUDA graphs on a GPU; compiles on first use; not
    with ZeRO-3) or "hf" (transformers generate)."""
    sampler: Sampler = "multinomial"
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
    max_extra_rounds: Int = Field(4, ge=0)
    """Dynamic sampling: most extra rollout rounds per training step; 0 = filter only, never
    resample."""


class RewardConfig(Section):
    """Scoring completions."""

    timeout_s: Float = Field(2.0, gt=0)
    """Seconds allowed to score one completion; a completion that runs over gets reward 0."""
    num_workers: Int | None = Field(None, ge=1)
    """Symbolic-check worker processes; null = the pool's default, max(1, min(4, cpus // 2))."""
    overlong_buffer: Int = Field(0, ge=0)
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13): the last this
    many tokens before rollout.max_new_tokens, over which a penalty grows linearly from 0 to
    overlong_penalty and is subtracted from the reward (a completion's length counts its EOS);
    0 = off."""
    overlong_penalty: Float = Field(1.0, ge=0)
    """Soft overlong punishment: the penalty at rollout.max_new_tokens (the paper's is 1)."""


class LossConfig(Section):
    """Policy loss, KL penalty, entropy bonus."""

    policy_loss: PolicyLoss = "ppo"
    """Policy loss, by name in algos.POLICY_LOSSES."""
    clip_low: Float = Field(0.2, gt=0)
    """Lower clip range: the ratio is clipped below at 1 - clip_low."""
    clip_high: Float | None = Field(None, gt=0)
    """Upper clip range: the ratio is clipped above at 1 + clip_high; null = clip_low."""
    dual_clip: Float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss for negative advantages; null = off."""
    agg: AggMode = "token-mean"
    """How per-token losses are reduced to one number."""
    kl_coef: Float = Field(0.0, ge=0)
    """Weight of the KL to the reference model; 0 = no reference model is loaded."""
    kl_estimator: KlEstimator = "k3"
    """Per-token KL estimator (Schulman's k1, k2, k3)."""
    kl_mode: Literal["loss", "reward"] = "loss"
    """Where the KL goes: a loss term (GRPO) or a per-token reward penalty (classic PPO)."""
    entropy_coef: Float = Field(0.0, ge=0)
    """Entropy bonus (PPO, Schulman et al. 2017, eq. 9): this weight times the policy's entropy,
    aggregated like the policy loss (loss.agg), is subtracted from the loss; 0 = off."""
    mask_truncated: bool = False
    """DAPO overlong filtering (Yu et al. 2025, arXiv:2503.14476, section 3.4): completions cut
    off at rollout.max_new_tokens are masked out of the loss and its normaliser (they still
    count in their group's reward statistics)."""
    rollout_is: RolloutIsMode | None = None
    """Correct for the rollout engine's log-probs differing from the training forward's: weight
    each token's policy loss by rho = pi_train / pi_sampler, truncated at rollout_is_cap
    ("truncate": TIS, Yao et al. 2025) or set to 0 above it ("mask": MIS, Liu et al. 2025);
    null = off (the mismatch is still logged as rollout/logprob_*)."""
    rollout_is_level: RolloutIsLevel = "token"
    """Importance ratio per token, or per sequence (the product over its tokens)."""
    rollout_is_cap: Float = Field(2.0, ge=1)
    """Rollout correction: the cap C >= 1 on the importance ratio."""


class AdvantageConfig(Section):
    """Turning rewards into advantages."""

    estimator: Estimator | None = None
    """Estimator, by name in algos.ADVANTAGE_ESTIMATORS; null = "grpo" for algorithm grpo, "gae" for ppo."""
    scale: AdvantageScale = "group"
    """Group estimators: divide by the reward std of the group, of the whole batch (all
    processes), or not at all."""
    gamma: Float = Field(1.0, ge=0, le=1)
    """GAE discount, in [0, 1]."""
    lam: Float = Field(0.95, ge=0, le=1)
    """GAE lambda, in [0, 1]."""
    whiten: bool | None = None
    """Whiten advantages over the batch; null = true for gae, false otherwise."""


class PPOConfig(Section):
    """The learned value function (algorithm ppo only)."""

    value: Literal["head", "critic"] = "head"
    """Value head on the policy's trunk, or a separate critic model."""
    vf_coef: Float = Field(0.1, ge=0)
    """Weight of the value loss."""
    value_clip: Float | None = Field(0.2, gt=0)
    """Clip value updates to +- value_clip around the rollout values; null = off."""
    critic_model: str | None = None
    """Critic checkpoint (ppo.value=critic); null = the policy's checkpoint."""
    critic_lr: Float | None = Field(None, gt=0)
    """Critic learning rate (ppo.value=critic); null = trainer.lr."""
    values_from_rollout: bool = True
    """ppo.value=head: read the rollout-time values off the sampling forwards (engines
    shared_prefix and static) instead of a separate no-grad values pass (the same values, to
    float rounding, for a model without dropout: the rollout runs in eval mode); false = always
    the separate pass."""


class TrainerConfig(Section):
    """Optimisation schedule."""

    max_steps: Int = Field(100, ge=1)
    """Training steps; each samples one rollout batch and trains on it."""
    max_time_s: Float | None = Field(None, gt=0)
    """Wall-clock budget: stop after the first step that brings the run's cumulative step time
    (``time/total_s``, evaluation excluded) to this many seconds, or at max_steps, whichever
    comes first; null = no budget. The learning-rate schedule still spans max_steps."""
    lr: Float = Field(1e-6, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: Float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    adam_betas: list[Annotated[Float, Field(ge=0, lt=1)]] = Field(
        [0.9, 0.999], min_length=2, max_length=2
    )
    """AdamW (beta1, beta2), each in [0, 1)."""
    warmup_steps: Int = Field(0, ge=0)
    """Training steps of linear learning-rate warmup from 0."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate shape after warmup (linear and cosine decay to 0 at max_steps)."""
    epochs: Int = Field(1, ge=1)
    """mu: passes over each rollout batch."""
    num_minibatches: Int = Field(1, ge=1)
    """Optimizer updates per epoch; the rollout batch is split into this many minibatches."""
    micro_batch_size: Int = Field(8, ge=1)
    """Sequences per forward/backward on each process (gradient accumulation fills a minibatch)."""
    max_grad_norm: Float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; null = no clipping."""
    max_skipped_steps: Int = Field(5, ge=0)
    """Consecutive non-finite updates tolerated (and skipped) before training stops."""
    log_every: Int = Field(1, ge=1)
    """Log metrics every this many training steps."""
    eval_every: Int = Field(0, ge=0)
    """Evaluate every this many training steps; 0 = only at the start and the end."""
    progress_bar: bool = True
    """Show a progress bar on the main process."""
    skip_zero_advantage: bool = True
    """Do not run forward/backward for sequences whose advantage is 0 everywhere (GRPO groups
    with identical rewards): their gradient is exactly zero. Applies to GRPO with no KL-in-loss
    or entropy term; with several processes each runs as many rows as the one with the most
    signal. The update is identical either way."""
    max_logit_elements: Int | None = Field(2**26, ge=1)
    """Most logits (rows x positions x vocabulary) the training / scoring forwards let the model
    materialise; above it the LM head runs chunk by chunk on the last hidden state (same
    results, checkpointed; e.g. ~2.5 GB less on a 152k vocabulary x 16 x 256). null = never
    chunk."""
    share_prompts: bool = True
    """Run each distinct prompt once per training / scoring forward and share its keys and
    values with the rows that sampled it (same outputs and gradients as the full forward;
    prompt compute / G). Used with eager or sdpa attention; other implementations fall back to
    the full forward."""
    cpu_threads: Int | None = Field(None, ge=1)
    """Threads torch may use on CPU; null = torch's default. Tiny models run fastest on 1, and
    several threads on a busy machine can be many times slower than one."""


class CheckpointConfig(Section):
    """Saving checkpoints into output_dir."""

    every: Int = Field(0, ge=0)
    """Save every this many training steps; 0 = only at the end."""
    keep: Int = Field(2, ge=1)
    """Newest complete checkpoints kept; older ones are deleted."""


class DivergenceConfig(Section):
    """Guards that stop (or warn about) a run whose policy has broken down."""

    entropy_max: Float | None = Field(0.95, gt=0, le=1)
    """Explosion: the mean token entropy of the update (policy/entropy) above this fraction of
    the uniform distribution's entropy (ln of the vocabulary size), in a run whose first step was
    below it, means the policy has turned to noise (a learning rate far too high); null = off."""
    entropy_min: Float | None = Field(None, ge=0)
    """Collapse: policy/entropy below this many nats means the policy samples one sequence
    whatever the prompt; null = off (a policy that has learned its task is legitimately sure)."""
    patience: Int = Field(2, ge=1)
    """Consecutive training steps out of bounds before the action is taken."""
    action: Literal["warn", "stop"] = "stop"
    """What a guard does: log a warning each time, or stop the run (exit code 3; the checkpoints
    written before are kept, so it can resume with other settings)."""


class HarnessConfig(Section):
    """Measurement and experiment tracking."""

    peak_tflops: Float | None = Field(None, gt=0)
    """Peak TFLOP/s used for MFU; null = look the device up."""
    report_to: list[str] = []
    """Trackers to log to through accelerate, e.g. ["tensorboard", "wandb"]; each needs its
    package (pip install 'grpo_lab[tensorboard]', '[wandb]', '[trackio]'), checked at start-up."""
    sample_every: Int = Field(10, ge=0)
    """Write completion samples to samples.jsonl (and as a table to the trackers) every this many
    training steps and at the last step; 0 = the last step only."""
    sample_prompts: Int = Field(2, ge=0)
    """Prompts per sample, each with all its rollout.group_size completions; 0 = no samples."""


class Config(Section):
    """Everything one run needs; see the module docstring for how it is assembled."""

    algorithm: Literal["grpo", "ppo"] = "grpo"
    """RL algorithm: grpo (group-relative advantages, no value model) or ppo (learned value)."""
    seed: Int = Field(0, ge=0)
    """Random seed for data, initialisation and sampling."""
    output_dir: NonEmpty = "runs/default"
    """Run folder: resolved config, metrics and checkpoints are written here."""
    resume: str | None = None
    """Resume from "auto" (newest complete checkpoint in output_dir) or a checkpoint path; null = fresh."""
    overwrite: bool = False
    """A fresh run (resume null) into an output_dir that holds another run deletes that run's
    files first; false = refuse, naming resume=auto and overwrite=true."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Policy model."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Task and prompts."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    """Sampling."""
    reward: RewardConfig = Field(default_factory=RewardConfig)
    """Reward scoring."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """Policy loss and regularisers."""
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    """Advantage estimation."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """Value function (algorithm ppo)."""
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    """Optimisation."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpointing."""
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    """Divergence guards."""
    harness: HarnessConfig = Field(default_factory=HarnessConfig)
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

    def validate(self, num_processes: int = 1) -> None:  # type: ignore[override]
        """Check every field and rule again, and how a step splits over ``num_processes``."""
        recipe.build(Config, to_dict(self), {})
        _check_batch_split(self, num_processes)

    @model_validator(mode="after")
    def _relations(self) -> Config:
        """Rules relating several fields; a broken one raises a ConfigError naming its keys."""
        estimator = self.resolved_estimator()
        est_name = f"advantage.estimator {estimator!r}"
        if self.advantage.estimator is None:
            est_name += f" (the default for algorithm {self.algorithm!r})"
        if estimator in GROUP_ESTIMATORS and self.rollout.group_size < 2:
            raise ConfigError(
                f"{est_name} needs rollout.group_size >= 2, got {self.rollout.group_size}: "
                "its baseline comes from the other completions of the same prompt",
                ["advantage.estimator", "rollout.group_size"],
            )
        if estimator == "gae" and self.algorithm != "ppo":
            raise ConfigError(
                f"{est_name} needs algorithm 'ppo' (a learned value), "
                f"got algorithm {self.algorithm!r}",
                ["advantage.estimator", "algorithm"],
            )
        for name in ("critic_model", "critic_lr"):
            if getattr(self.ppo, name) is not None and self.ppo.value != "critic":
                raise ConfigError(
                    f"ppo.{name} is set but ppo.value is {self.ppo.value!r}; "
                    "it only applies to 'critic'",
                    [f"ppo.{name}", "ppo.value"],
                )
        if self.rollout.sampler != "multinomial" and self.rollout.backend == "hf":
            raise ConfigError(
                f"rollout.sampler {self.rollout.sampler!r} needs one of grpo_lab's own engines "
                "(rollout.backend shared_prefix, static or compiled); "
                "'hf' samples as generate does",
                ["rollout.sampler", "rollout.backend"],
            )
        if self.rollout.dynamic_sampling and estimator not in GROUP_ESTIMATORS:
            raise ConfigError(
                "rollout.dynamic_sampling needs a group estimator "
                f"({sorted(GROUP_ESTIMATORS)}), got {est_name}: only group-relative "
                "advantages vanish when a group's rewards agree",
                ["rollout.dynamic_sampling", "advantage.estimator"],
            )
        if self.loss.mask_truncated and self.rollout.ignore_eos:
            raise ConfigError(
                "loss.mask_truncated with rollout.ignore_eos would mask every completion out of "
                "the loss (each one runs to max_new_tokens); turn one of them off",
                ["loss.mask_truncated", "rollout.ignore_eos"],
            )
        if self.reward.overlong_buffer > self.rollout.max_new_tokens:
            raise ConfigError(
                f"reward.overlong_buffer ({self.reward.overlong_buffer}) must be <= "
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens})",
                ["reward.overlong_buffer", "rollout.max_new_tokens"],
            )
        if self.model.lora.r > 0 and not self.model.lora.target_modules:
            raise ConfigError(
                "model.lora.target_modules: must not be empty when model.lora.r > 0",
                ["model.lora.target_modules", "model.lora.r"],
            )
        _check_batch_split(self, 1)
        return self


def _check_batch_split(cfg: Config, num_processes: int) -> None:
    """Each of P processes must get whole prompts (B / P) and equal minibatches (B * G / (P *
    num_minibatches) sequences; micro-batches may be ragged: losses are normalised by global
    counts, so a ragged split changes nothing but memory)."""
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


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated.

    Raises :class:`ConfigError` naming the key and the file or override that set it.
    """
    return recipe.layered(Config, path, overrides)


def to_dict(config: Config) -> dict[str, Any]:
    """``config`` as nested plain dicts and lists (a deep copy), ready for YAML or JSON."""
    return config.model_dump()


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML; ``load_config(path)`` gives back an equal Config."""
    recipe.save(config, path)


def format_help(config: type[Config] | Config = Config) -> str:
    """Every key with its type, value (default, or the instance's), bounds and documentation."""
    return recipe.explain(config() if isinstance(config, type) else config)
