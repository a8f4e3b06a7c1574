"""Time optimizer steps of grpo_lab (GRPO, PPO value head, PPO critic) against TRL's GRPOTrainer.

    python benchmarks/step_bench.py --preset tiny                      # CPU, about a minute
    python benchmarks/step_bench.py --preset tiny --rounds 3 --steps 10   # steadier on a shared CPU
    python benchmarks/step_bench.py --preset mid --rounds 3 --steps 3 --warmup 1 \
        --impls trl,grpo,ppo_head_matched,ppo_critic_matched,ppo_head,ppo_critic   # CPU, ~13 min
    python benchmarks/step_bench.py --preset w0.5b --out w.json        # one GPU, workload W
    python benchmarks/step_bench.py --preset w0.5b --impls grpo,ppo_head,ppo_critic   # no TRL

Implementations (``--impls``): ``trl`` (TRL's GRPOTrainer), the objectives of
:mod:`grpo_lab.objectives` (``grpo``, ``ppo_head``, ``ppo_critic`` as their recipes set them, and
``ppo_head_matched`` / ``ppo_critic_matched``: PPO with GRPO's one epoch over one minibatch), and
two benchmark variants: ``grpo_all_rows`` (GRPO also running the rows of zero-std groups, whose
advantage is 0: what skipping them saves) and ``ppo_head_matched_values_pass`` (PPO-head at
matched updates with a separate no-grad values pass instead of reading the values during the
rollout: what the rollout readout saves).

Every implementation runs on the same model folder, prompts, reward, group size G, completion
length, micro-batch, dtype and learning rate, each in a fresh Python process (``--in-process``:
all in this one), so its peak memory is its own. After ``--warmup`` untimed steps, ``--steps``
steps are timed; a table shows the median step time, per-phase medians, peak memory, the static
footprint and ratios to TRL's and to GRPO's, and the LAST stdout line is one JSON object with
everything.

Rewards (``--reward``): ``task`` is the math reward against the gold answers (the tiny preset's
default). ``controlled`` (the ``mid`` and ``w0.5b`` defaults, whose random models would score 0
everywhere and turn GRPO's update into a no-op) is :class:`grpo_lab.rewards.ControlledReward`:
seeded per-group rewards keyed by the prompt, with k of G successes, k uniform on 1..G-1, so
every group has signal, except an expected ``--zero-std-fraction`` of groups whose rewards are
all equal. grpo_lab (``setup(cfg, reward_fn=...)``) and TRL (a reward function) get the same
rewards for the same prompt. The measured fraction of zero-std groups is in the JSON.

JSON fields (besides the settings): ``results.<impl>`` with ``step_s`` (timed steps),
``step_s_summary``, ``phases_s`` / ``phases_median_s`` (grpo_lab: rollout, reward, old_logprob,
ref, values, update; TRL: generate, reward, rest), ``mem_gib`` (the compared memory figure, see
below), ``completion_len_mean``, ``zero_std_fraction`` (mean over timed steps of the fraction of
groups with all-equal rewards) and ``extra`` (``static_gib``: parameters, gradients and optimizer
state per trained model, from :func:`grpo_lab.harness.model_footprint`; ``ru_maxrss_gib_after``:
the process's own peak RSS on CPU; ``zero_std_groups`` and ``zero_advantage_rows_skipped`` per
step; ``values_pass``: whether a separate values forward ran; recipe and overrides).
``ratios.<impl>`` (``time``, ``time_best``, ``memory``, ``cpu_time``, ``cpu_time_mean``,
``time_by_round``, ``cpu_time_by_round``) are relative to TRL,
``ratios_vs_grpo.<impl>`` the same relative to grpo_lab's GRPO. ``reward`` holds the reward kind,
target zero-std fraction and seed.

Presets:

- ``tiny`` (CPU): the embedded tiny model, arithmetic prompts, 16 prompts x G=8, at most 6 new
  tokens (EOS allowed, so completions vary in length; the mean length of both sides is recorded),
  float32, lr 1e-4: ``recipes/tiny_arith_*.yaml`` with the overrides listed in the JSON.
- ``mid`` (CPU, compute-bound): a randomly initialised Qwen2 of :data:`MID_SHAPE` (16.3 M
  parameters: 8 layers of width 256, a tied 32,000-entry vocabulary), float32, sdpa, 4 prompts
  of 32 random words x G=8, exactly 32 new tokens, micro-batches of 16 sequences, one torch
  thread, the controlled reward: ``recipes/gsm8k_qwen2.5-0.5b_*.yaml`` with the overrides in the
  JSON. A few seconds per step on 2 cores.
- ``w0.5b`` (GPU, workload W): a randomly initialised model of Qwen2.5-0.5B's shape, bf16, sdpa,
  gradient checkpointing, 8 prompts of 64 random words x G=8, exactly 256 new tokens (EOS
  suppressed), micro-batches of 16 sequences: ``recipes/gsm8k_qwen2.5-0.5b_*.yaml`` with local
  data. The model and a 151,936-entry byte-level BPE tokenizer (133,399 four-letter words, each
  one token) are built locally (no hub) into a temporary folder that both grpo_lab and TRL load.

What one "step" is:

- grpo_lab: one ``grpo_lab.trainer.step(run)`` (sample prompts, rollout, reward, scoring passes, the update).
  GRPO makes one optimizer update per step; the PPO recipes make ``epochs x num_minibatches``
  updates per step (their design), so their step is one rollout batch, not one update.
- TRL: one optimizer step of ``GRPOTrainer``, timed by a callback from ``on_step_begin`` to
  ``on_step_end``. That window holds generation, reward, the forward/backward passes, clipping and
  the optimizer step; it leaves out fetching the prompt batch and the logging hook.

TRL settings chosen to match grpo_lab (and why):

- ``loss_type="dapo"``: the per-token loss summed over the generation batch and divided by its
  number of completion tokens, however the batch is split into micro-batches. That is grpo_lab's
  ``token-mean`` with global token counts. ``bnpo`` divides per micro-batch (the same only with
  one micro-batch) and ``grpo`` averages per sequence first.
- ``scale_rewards="group"`` (group-std-scaled advantages, as ``advantage.scale: group``),
  ``beta=0.0`` (no reference model, like ``loss.kl_coef: 0``), ``num_iterations=1`` and
  ``steps_per_generation = gradient_accumulation_steps`` (one generation batch per optimizer step,
  so TRL, like grpo_lab, skips the old-log-prob pass), ``epsilon`` / ``epsilon_high`` = the
  recipe's clip range, ``optim="adamw_torch"`` (the same ``torch.optim.AdamW`` as grpo_lab),
  constant lr without warm-up, grad-norm clip 1.0, top-k/top-p off, temperature 1.
- Same batch: ``per_device_train_batch_size`` = grpo_lab's GRPO micro-batch and
  ``gradient_accumulation_steps`` = prompts x G / micro-batch.
- Overheads grpo_lab does not have are off: ``logging_strategy="no"``, ``report_to="none"``,
  ``save_strategy="no"``, ``eval_strategy="no"``, ``log_completions=False``, no progress bar.
  TRL still gathers its per-step metrics (``.item()`` calls); that cannot be turned off.
- NOTE: with bf16, TRL also runs under ``bf16=True`` autocast (its default); the weights and
  optimizer states are bf16 on both sides.

Measurement conventions:

- Time: wall clock around each step, with CUDA synchronised at both ends; the median over the
  timed steps is reported (min and max too). On a shared CPU the spread is large: compare medians
  and read the load averages recorded in the JSON. Also the CPU time of the implementation's
  process per step (``step_cpu_s``, ``time.process_time``: every thread of the process, the 5 ms
  memory sampler included): with one torch thread it is the work done, and far less sensitive
  than wall time to other jobs on the machine (still not immune: they share caches and memory
  bandwidth). ``ratios*.cpu_time`` compare its medians.
- CUDA memory: the highest per-step peak of ``torch.cuda.max_memory_allocated`` over all steps
  (warm-up included), for every implementation; weights, gradients, optimizer states and
  activations all count.
- CPU memory: the figure compared is the peak of the resident set, sampled every 5 ms while an
  implementation is built and stepped, minus the resident set just before it was built (after
  imports, so the interpreter, torch and TRL's own imports do not dilute the ratios). Short
  spikes can be missed. With one process per implementation (the default) ``ru_maxrss_gib_after``
  is that implementation's own whole-process peak too.
- Implementations run one after another in ``--impls`` order, each in its own process.
  ``--rounds R`` repeats the whole sequence R times, reversing the order every other round, with
  a fresh process each time; timed steps are pooled, and each round's ratios to TRL and to GRPO
  are reported too. On a CPU shared with other jobs this, and one torch thread (the tiny recipes'
  ``trainer.cpu_threads: 1``; OpenMP threads competing with other processes for two cores stall
  each other), is what makes the ratios repeatable.
- Torch threads: ``--threads``, else the preset's (1 for ``mid``), else the GRPO recipe's
  ``trainer.cpu_threads``, else torch's default; set for TRL too and passed to every grpo_lab recipe as ``trainer.cpu_threads``.

Reference figures for W on one H200 (measured elsewhere, printed for context only): TRL 1.16
GRPOTrainer about 6.4 s per step at about 9 GiB peak; plain transformers ``generate`` of 64 x 256
tokens (dynamic cache) about 3.8 s.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

from grpo_lab.data import Problem, make_arith  # noqa: E402
from grpo_lab.harness import peak_rss_gib, process_rss_gib  # noqa: E402
from grpo_lab.objectives import MATCHED_UPDATES, OBJECTIVES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
GIB = float(2**30)

# Benchmark-only variants, as (recipe objective, overrides) like grpo_lab.objectives' entries:
# GRPO that also runs its zero-advantage rows (what skipping them saves, (c)), and PPO-head at
# matched updates with its separate no-grad values pass (what reading the values during the
# rollout saves).
BENCH_VARIANTS: dict[str, tuple[str, dict]] = {
    "grpo_all_rows": ("grpo", {"trainer.skip_zero_advantage": False}),
    "ppo_head_matched_values_pass": (
        "ppo_head",
        {**MATCHED_UPDATES, "ppo.values_from_rollout": False},
    ),
}
GRPO_LAB_IMPLS = (*OBJECTIVES, *BENCH_VARIANTS)
IMPLS = ("trl", *GRPO_LAB_IMPLS)
DEFAULT_IMPLS = ("trl", *OBJECTIVES)
TRL_LOSS_TYPE = "dapo"
TRL_LOSS_TYPE_REASON = (
    "dapo divides the summed per-token loss by the completion-token count of the whole "
    "generation batch, independent of micro-batching: grpo_lab's token-mean with global counts "
    "(bnpo normalises per micro-batch, grpo per sequence)"
)

# Measured elsewhere (not by this script): workload W on one H200.
REFERENCE_W = {
    "device": "1x NVIDIA H200",
    "trl_1.16_grpo_step_s": 6.4,
    "trl_1.16_grpo_peak_gib": 9.0,
    "hf_generate_64x256_dynamic_cache_s": 3.8,
}


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WShape:
    """Architecture of the W model; the defaults are Qwen2.5-0.5B's."""

    vocab_size: int = 151936
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True


# The mid preset's model: Qwen2's architecture at ~16 M parameters (8.2 M of them the tied
# 32,000 x 256 embedding), so weights, gradients, optimizer state and FLOPs outweigh Python
# overhead on a CPU.
MID_SHAPE = WShape(
    vocab_size=32000,
    hidden_size=256,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=1024,
    max_position_embeddings=4096,
    rope_theta=1e4,
)
W_RECIPES = {
    "grpo": "gsm8k_qwen2.5-0.5b_grpo.yaml",
    "ppo_head": "gsm8k_qwen2.5-0.5b_ppo_head.yaml",
    "ppo_critic": "gsm8k_qwen2.5-0.5b_ppo_critic.yaml",
}


@dataclass(frozen=True)
class Preset:
    """One benchmark workload, identical for every implementation.

    ``recipes`` maps each recipe objective (``grpo``, ``ppo_head``, ``ppo_critic``) to its recipe
    file (relative to ``recipes/``); ``micro_batch_size`` is every grpo_lab implementation's
    micro-batch and TRL's per-device batch, in sequences.
    """

    name: str
    recipes: dict[str, str]
    model: str  # "tiny" (the embedded model) or "w" (Qwen2 of ``shape``, random init)
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    fixed_length: bool  # EOS suppressed: every completion has exactly max_new_tokens tokens
    dtype: str
    lr: float
    micro_batch_size: int
    gradient_checkpointing: bool
    attn_implementation: str | None
    clip_low: float
    clip_high: float | None
    prompt_words: int = 0  # "w" only: words per random prompt (one token each)
    needs_gpu: bool = False
    shape: WShape | None = None  # "w" only; None = Qwen2.5-0.5B's
    reward: str = "task"  # "task": the math reward; "controlled": ControlledReward
    threads: int | None = None  # torch threads; None = the GRPO recipe's trainer.cpu_threads

    @property
    def sequences_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        recipes={
            "grpo": "tiny_arith_grpo.yaml",
            "ppo_head": "tiny_arith_ppo_head.yaml",
            "ppo_critic": "tiny_arith_ppo_critic.yaml",
        },
        model="tiny",
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=6,
        fixed_length=False,
        dtype="float32",
        lr=1e-4,
        micro_batch_size=128,
        gradient_checkpointing=False,
        attn_implementation=None,
        clip_low=0.2,
        clip_high=None,
    ),
    "mid": Preset(
        name="mid",
        recipes=W_RECIPES,
        model="w",
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=32,
        fixed_length=True,
        dtype="float32",
        lr=1e-5,
        micro_batch_size=16,
        gradient_checkpointing=False,
        attn_implementation="sdpa",
        clip_low=0.2,
        clip_high=0.28,
        prompt_words=32,
        shape=MID_SHAPE,
        reward="controlled",
        threads=1,
    ),
    "w0.5b": Preset(
        name="w0.5b",
        recipes=W_RECIPES,
        model="w",
        prompts_per_step=8,
        group_size=8,
        max_new_tokens=256,
        fixed_length=True,
        dtype="bfloat16",
        lr=1e-6,
        micro_batch_size=16,
        gradient_checkpointing=True,
        attn_implementation="sdpa",
        clip_low=0.2,
        clip_high=0.28,
        prompt_words=64,
        needs_gpu=True,
        reward="controlled",
    ),
}


# ---------------------------------------------------------------------------------------------
# Workload W: Qwen2.5-0.5B shape, random weights, a synthetic word-level tokenizer
# ---------------------------------------------------------------------------------------------

W_SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
W_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# ByteLevel writes a leading space as this character.
SPACE_MARK = "\u0120"


def w_word_length(vocab_size: int) -> int:
    """Letters per W word: the shortest length L whose words fill the vocabulary left after the
    special tokens, the 256 byte symbols and the merge intermediates of lengths 1 .. L-1."""
    base = len(W_SPECIAL_TOKENS) + 256
    intermediates = 0
    for length in range(1, 8):
        if 0 < vocab_size - base - intermediates <= len(W_LETTERS) ** length:
            return length
        intermediates += len(W_LETTERS) ** length
    raise ValueError(f"vocab_size {vocab_size} is too small or too large for W words")


def w_words(vocab_size: int) -> list[str]:
    """The whole-word tokens of the W tokenizer (without their leading space), in id order."""
    length = w_word_length(vocab_size)
    n_intermediate = sum(len(W_LETTERS) ** k for k in range(1, length))
    n_words = vocab_size - len(W_SPECIAL_TOKENS) - 256 - n_intermediate
    words = ("".join(t) for t in itertools.product(W_LETTERS, repeat=length))
    return list(itertools.islice(words, n_words))


def build_w_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer of exactly ``vocab_size`` entries in which " " + word is ONE token
    for every word of :func:`w_words`.

    Ids: <pad>=0, <eos>=1, <unk>=2, the 256 byte symbols, then space-prefixed letter strings by
    length (" a" .. " zz.." as merge intermediates, then the words). Merges only extend a
    space-prefixed string by one letter, so " abcd" becomes one token and a prompt of n words
    written as " w1 w2 ... wn" is n tokens; no special tokens are added.

    NOTE: transformers 5 loads any folder whose config says ``qwen2`` with ``Qwen2Tokenizer``
    (byte-level BPE with Qwen's split pattern) whatever ``tokenizer_config.json`` says, keeping
    only the vocabulary and merges. A word-level tokenizer would silently lose every token there;
    this one tokenises space-separated lowercase words identically under both pipelines.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = w_words(vocab_size)
    length = w_word_length(vocab_size)
    vocab = {tok: i for i, tok in enumerate(W_SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges = []
    stems = ["".join(t) for k in range(1, length) for t in itertools.product(W_LETTERS, repeat=k)]
    for stem in [*stems, *words]:
        token = SPACE_MARK + stem
        vocab[token] = len(vocab)
        merges.append((token[:-1], token[-1]))
    if len(vocab) != vocab_size:
        raise AssertionError(f"built {len(vocab)} entries, expected {vocab_size}")
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_w_config(
    shape: WShape, tokenizer: transformers.PreTrainedTokenizerBase
) -> transformers.Qwen2Config:
    """Qwen2 config of ``shape`` with the tokenizer's special-token ids (no BOS)."""
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries, more than {shape.vocab_size}")
    return transformers.Qwen2Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_w_model(
    folder: Path, shape: WShape, *, dtype: str, attn_implementation: str | None, seed: int
) -> Path:
    """Randomly initialise the W model (seeded) and save it with its tokenizer into ``folder``."""
    from grpo_lab.models import random_init_causal_lm

    tokenizer = build_w_tokenizer(shape.vocab_size)
    config = build_w_config(shape, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = random_init_causal_lm(config, dtype=dtype, attn_implementation=attn_implementation)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_word_prompts(n: int, *, words: int, vocab_size: int, seed: int) -> list[Problem]:
    """``n`` prompts of ``words`` random W words each, every word one token (so each prompt
    starts with a space: " abcd efgh ..."). Each "gold answer" is the prompt's index, a unique
    key for :class:`grpo_lab.rewards.ControlledReward` (no model is meant to answer these)."""
    vocabulary = w_words(vocab_size)
    rng = random.Random(f"step_bench:{seed}")
    return [
        Problem(
            question="".join(" " + rng.choice(vocabulary) for _ in range(words)),
            answer=str(i),
            id=f"w:{i}",
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Shared workload
# ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """The model folder and prompt pool every implementation uses; ``prompts_path`` holds the
    pool as a MATH-style JSONL file (``problem``, ``answer``, ``id``), which grpo_lab reads as
    its dataset (``data.name=math``) and TRL as its own."""

    model_path: str
    problems: list[Problem]
    prompts_path: str


def write_prompts(problems: Sequence[Problem], path: Path) -> Path:
    """``problems`` as the MATH-style JSONL file grpo_lab's ``math`` dataset reads."""
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"problem": p.question, "answer": p.answer, "id": p.id}) + "\n")
    return path


def prepare_workload(
    preset: Preset, workdir: Path, *, total_steps: int, seed: int, w_shape: WShape | None = None
) -> Workload:
    """The preset's model folder (the tiny one is cached; W is built into ``workdir``) and
    ``prompts_per_step * total_steps`` prompts, written to ``workdir/prompts.jsonl``."""
    workdir.mkdir(parents=True, exist_ok=True)
    prompts_path = workdir / "prompts.jsonl"
    n = preset.prompts_per_step * max(1, total_steps)
    if preset.model == "tiny":
        from grpo_lab.tiny import ensure_tiny_model

        problems = make_arith(n, seed=seed, split="train")
        return Workload(
            str(ensure_tiny_model()), problems, str(write_prompts(problems, prompts_path))
        )
    if preset.model == "w":
        shape = w_shape or preset.shape or WShape()
        path = save_w_model(
            workdir / "w_model",
            shape,
            dtype=preset.dtype,
            attn_implementation=preset.attn_implementation,
            seed=seed,
        )
        prompts = random_word_prompts(
            n, words=preset.prompt_words, vocab_size=shape.vocab_size, seed=seed
        )
        # Both trainers load the tokenizer with AutoTokenizer; check what they will see.
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        lengths = {len(ids) for ids in tokenizer([p.question for p in prompts])["input_ids"]}
        if lengths != {preset.prompt_words}:
            raise RuntimeError(
                f"{path}: AutoTokenizer ({type(tokenizer).__name__}) gives prompts of {lengths} "
                f"tokens, expected {preset.prompt_words}"
            )
        return Workload(str(path), prompts, str(write_prompts(prompts, prompts_path)))
    raise ValueError(f"preset {preset.name!r}: unknown model kind {preset.model!r}")


def impl_spec(impl: str) -> tuple[str, dict]:
    """(recipe objective, overrides) of a grpo_lab implementation: an objective of
    :mod:`grpo_lab.objectives` or one of :data:`BENCH_VARIANTS`."""
    if impl in BENCH_VARIANTS:
        recipe, overrides = BENCH_VARIANTS[impl]
        return recipe, dict(overrides)
    from grpo_lab.objectives import objective

    return objective(impl)


def _override_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def grpo_lab_overrides(
    preset: Preset,
    impl: str,
    *,
    model_path: str,
    prompts_path: str,
    output_dir: str,
    max_steps: int,
    seed: int,
    threads: int,
) -> list[str]:
    """Dotted overrides that turn the impl's recipe into this preset's workload: the preset's
    settings, then the impl's own (e.g. one epoch and one minibatch for ``*_matched``). Every
    implementation runs the preset's micro-batch, so equal work means equal passes."""
    overrides = [
        f"seed={seed}",
        # The trainer applies this to the whole process; every implementation gets the same.
        f"trainer.cpu_threads={threads}",
        f"output_dir={output_dir}",
        f"model.name_or_path={model_path}",
        f"model.dtype={preset.dtype}",
        f"model.gradient_checkpointing={str(preset.gradient_checkpointing).lower()}",
        f"model.attn_implementation={preset.attn_implementation or 'null'}",
        # The workload's prompt pool; no held-out set.
        "data.name=math",
        f"data.path={prompts_path}",
        f"data.eval_path={prompts_path}",
        "data.template=plain",
        "data.use_chat_template=false",
        "data.num_eval=0",
        f"rollout.prompts_per_step={preset.prompts_per_step}",
        f"rollout.group_size={preset.group_size}",
        f"rollout.max_new_tokens={preset.max_new_tokens}",
        f"rollout.ignore_eos={str(preset.fixed_length).lower()}",
        "rollout.temperature=1.0",
        "rollout.top_p=1.0",
        "rollout.top_k=null",
        "rollout.batch_size=null",
        "loss.kl_coef=0.0",
        f"loss.clip_low={preset.clip_low}",
        f"loss.clip_high={'null' if preset.clip_high is None else preset.clip_high}",
        f"trainer.lr={preset.lr}",
        "trainer.warmup_steps=0",
        "trainer.lr_scheduler=constant",
        "trainer.max_grad_norm=1.0",
        f"trainer.max_steps={max_steps}",
        "trainer.progress_bar=false",
        "trainer.eval_every=0",
        "checkpoint.every=0",
        f"trainer.micro_batch_size={preset.micro_batch_size}",
    ]
    overrides += [f"{k}={_override_value(v)}" for k, v in impl_spec(impl)[1].items()]
    return overrides


def trl_config_kwargs(
    preset: Preset, *, output_dir: str, max_steps: int, seed: int, use_cpu: bool
) -> dict:
    """``GRPOConfig`` keyword arguments for the preset (see the module docstring for each choice)."""
    n_seq, micro = preset.sequences_per_step, preset.micro_batch_size
    if n_seq % micro:
        raise ValueError(f"prompts x G ({n_seq}) must be divisible by the micro-batch ({micro})")
    accumulation = n_seq // micro
    init_kwargs: dict = {"dtype": preset.dtype}
    if preset.attn_implementation is not None:
        init_kwargs["attn_implementation"] = preset.attn_implementation
    return {
        "output_dir": output_dir,
        "seed": seed,
        "max_steps": max_steps,
        "use_cpu": use_cpu,
        "bf16": preset.dtype == "bfloat16",
        "fp16": False,
        "model_init_kwargs": init_kwargs,
        "gradient_checkpointing": preset.gradient_checkpointing,
        "learning_rate": preset.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_grad_norm": 1.0,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accumulation,
        "steps_per_generation": accumulation,
        "num_generations": preset.group_size,
        "num_iterations": 1,
        "max_completion_length": preset.max_new_tokens,
        "generation_kwargs": (
            {"min_new_tokens": preset.max_new_tokens} if preset.fixed_length else None
        ),
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": 0.0,
        "loss_type": TRL_LOSS_TYPE,
        "scale_rewards": "group",
        "epsilon": preset.clip_low,
        "epsilon_high": preset.clip_high if preset.clip_high is not None else preset.clip_low,
        "logging_strategy": "no",
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "log_completions": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


class RssSampler:
    """Peak resident set while running, sampled by a background thread every ``interval_s``."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_gib = process_rss_gib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_gib = max(self.peak_gib, process_rss_gib())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_gib = max(self.peak_gib, process_rss_gib())


def free_memory(device: torch.device) -> None:
    """Collect garbage, give cached CUDA blocks back and free heap pages to the OS (glibc)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons so the next trainer starts from scratch.

    NOTE: TRL's trainer sets mixed precision and gradient-accumulation state on accelerate's
    shared ``AcceleratorState``/``GradientState``; left in place, it would leak into the next one.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min and max of ``values`` (NaN for an empty list)."""
    if not values:
        return {"median": math.nan, "mean": math.nan, "min": math.nan, "max": math.nan}
    return {
        "median": float(statistics.median(values)),
        "mean": float(statistics.fmean(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


@dataclass
class ImplResult:
    """Everything measured for one implementation; ``mem_gib`` is the figure compared."""

    impl: str
    step_s: list[float]  # timed steps only
    warmup_step_s: list[float]
    phases_s: dict[str, list[float]]  # phase -> per timed step
    completion_len: list[float]  # mean completion length per timed step (EOS included)
    mem_gib: float
    mem_metric: str
    extra: dict = field(default_factory=dict)
    step_cpu_s: list[float] = field(default_factory=list)  # CPU seconds of each timed step

    def to_dict(self) -> dict:
        out = asdict(self)
        out["step_s_summary"] = summarise(self.step_s)
        out["step_cpu_s_summary"] = summarise(self.step_cpu_s)
        out["phases_median_s"] = {k: summarise(v)["median"] for k, v in self.phases_s.items()}
        out["completion_len_mean"] = (
            float(statistics.fmean(self.completion_len)) if self.completion_len else math.nan
        )
        out["zero_std_fraction"] = _mean(self.extra.get("zero_std_groups", []))
        return out


def _memory_metric(device: torch.device) -> str:
    if device.type == "cuda":
        return "max per-step torch.cuda.max_memory_allocated (GiB)"
    return "sampled RSS peak minus RSS before build (GiB, process-wide, weak)"


# ``ImplResult.extra`` entries with one value per timed step, pooled over rounds.
PER_STEP_EXTRAS = (
    "harness_step_s",
    "reward_mean",
    "zero_std_groups",
    "zero_advantage_rows_skipped",
)


def round_orders(impls: Sequence[str], rounds: int) -> list[list[str]]:
    """The run order of every round: as given, then reversed, alternately, so that a machine
    getting slower or faster during the run does not favour whichever implementation runs first."""
    return [list(impls) if r % 2 == 0 else list(reversed(impls)) for r in range(rounds)]


def merge_rounds(rounds: Sequence[ImplResult]) -> ImplResult:
    """One result from several rounds of the same implementation: timed steps pooled, memory the
    highest round's, and each round's median step time and memory kept in ``extra``."""
    first = rounds[0]
    phases: dict[str, list[float]] = {}
    for r in rounds:
        for name, values in r.phases_s.items():
            phases.setdefault(name, []).extend(values)
    extra = dict(first.extra)
    for key in PER_STEP_EXTRAS:
        if key in extra:
            extra[key] = [x for r in rounds for x in r.extra.get(key, [])]
    extra["round_median_step_s"] = [summarise(r.step_s)["median"] for r in rounds]
    extra["round_median_step_cpu_s"] = [summarise(r.step_cpu_s)["median"] for r in rounds]
    extra["round_mem_gib"] = [r.mem_gib for r in rounds]
    return ImplResult(
        impl=first.impl,
        step_s=[t for r in rounds for t in r.step_s],
        warmup_step_s=[t for r in rounds for t in r.warmup_step_s],
        phases_s=phases,
        completion_len=[x for r in rounds for x in r.completion_len],
        mem_gib=max(r.mem_gib for r in rounds),
        mem_metric=first.mem_metric,
        extra=extra,
        step_cpu_s=[t for r in rounds for t in r.step_cpu_s],
    )


@dataclass(frozen=True)
class RewardSpec:
    """The reward both sides use: ``"task"`` (the math reward against the gold answer) or
    ``"controlled"`` (:class:`grpo_lab.rewards.ControlledReward`: groups with signal except a
    ``zero_std_fraction`` of them, keyed by the gold column, seeded)."""

    kind: str = "task"
    zero_std_fraction: float = 0.0
    seed: int = 0

    def controlled(self, group_size: int):
        from grpo_lab.rewards import ControlledReward

        return ControlledReward(group_size, self.zero_std_fraction, seed=self.seed)

    def for_grpo_lab(self, group_size: int):
        """``grpo_lab.trainer.setup``'s ``reward_fn`` (None: the trainer's own math reward)."""
        return self.controlled(group_size) if self.kind == "controlled" else None

    def for_trl(self, group_size: int):
        from grpo_lab.rewards import make_trl_reward

        if self.kind == "controlled":
            return self.controlled(group_size).for_trl("answer")
        return make_trl_reward("answer")


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.fmean(values)) if values else math.nan


# ---------------------------------------------------------------------------------------------
# grpo_lab
# ---------------------------------------------------------------------------------------------

_NOT_PHASES = ("time/step_s", "time/total_s")


def _static_gib(metrics: dict[str, float]) -> dict[str, float]:
    """``harness.footprint_metrics`` keys without their prefix and unit: ``policy_params``,
    ``policy_grads``, ``policy_optimizer``, ``critic_*``, ..., ``total`` (GiB)."""
    return {
        k.removeprefix("mem/static/").removesuffix("_gib"): v
        for k, v in metrics.items()
        if k.startswith("mem/static/")
    }


def run_grpo_lab(
    impl: str,
    preset: Preset,
    workload: Workload,
    *,
    steps: int,
    warmup: int,
    device: torch.device,
    workdir: Path,
    seed: int,
    threads: int,
    extra_overrides: Sequence[str] = (),
    reward: RewardSpec | None = None,
) -> ImplResult:
    """Set up a run from the impl's recipe and time ``warmup + steps`` calls of ``step(run)``.

    ``extra_overrides`` (dotted ``key=value``) go last, e.g. ``model.lora.r=16`` to measure LoRA
    against full fine-tuning on the same workload. ``reward`` defaults to the preset's kind."""
    from grpo_lab.build import static_footprint
    from grpo_lab.config import load_config
    from grpo_lab.trainer import setup, step

    reward = reward or RewardSpec(preset.reward, seed=seed)
    overrides = grpo_lab_overrides(
        preset,
        impl,
        model_path=workload.model_path,
        prompts_path=workload.prompts_path,
        output_dir=str(workdir / f"run_{impl}"),
        max_steps=warmup + steps,
        seed=seed,
        threads=threads,
    )
    recipe = preset.recipes[impl_spec(impl)[0]]
    cfg = load_config(RECIPES / recipe, [*overrides, *extra_overrides])
    torch.set_num_threads(threads)
    free_memory(device)
    rss_before = process_rss_gib()
    step_s, cpu_s, records = [], [], []
    with RssSampler() as rss:
        run = setup(cfg, reward_fn=reward.for_grpo_lab(preset.group_size))
        for _ in range(warmup + steps):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            record = step(run)
            _sync(device)
            step_s.append(time.perf_counter() - start)
            cpu_s.append(time.process_time() - cpu_start)
            records.append(record)
    timed = records[warmup:]
    phases: dict[str, list[float]] = {}
    for record in timed:
        for key, value in record.items():
            if key.startswith("time/") and key.endswith("_s") and key not in _NOT_PHASES:
                phases.setdefault(key.removeprefix("time/").removesuffix("_s"), []).append(value)
    if device.type == "cuda":
        mem = max(r.get("mem/peak_alloc_gib", math.nan) for r in records)
    else:
        mem = rss.peak_gib - rss_before
    extra = {
        "recipe": f"recipes/{recipe}",
        "overrides": overrides,
        "updates_per_step": cfg.trainer.epochs * cfg.trainer.num_minibatches,
        "micro_batch_size": cfg.trainer.micro_batch_size,
        "harness_step_s": [r["time/step_s"] for r in timed],
        "reward_mean": [r.get("reward/mean", math.nan) for r in timed],
        "zero_std_groups": [r.get("reward/zero_std_groups", math.nan) for r in timed],
        "zero_advantage_rows_skipped": [
            r.get("update/zero_advantage_rows_skipped", math.nan) for r in timed
        ],
        # PPO-head reads its old values during the rollout unless a values pass ran.
        "values_pass": "values" in phases,
        "static_gib": _static_gib(
            static_footprint(
                run.acc, run.policy, run.opt, run.critic, run.critic_opt, run.reference
            )
        ),
    }
    if device.type == "cuda":
        extra["harness_peak_reserved_gib"] = max(r.get("mem/peak_reserved_gib", 0) for r in records)
    else:
        extra["harness_rss_peak_gib"] = max(r.get("mem/rss_peak_gib", math.nan) for r in records)
        extra["ru_maxrss_gib_after"] = peak_rss_gib()
    del run
    free_memory(device)
    reset_accelerate_state()
    return ImplResult(
        impl=impl,
        step_s=step_s[warmup:],
        warmup_step_s=step_s[:warmup],
        phases_s=phases,
        completion_len=[r["rollout/completion_len_mean"] for r in timed],
        mem_gib=float(mem),
        mem_metric=_memory_metric(device),
        extra=extra,
        step_cpu_s=cpu_s[warmup:],
    )


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def _timed(fn: Callable, sink: list[float], device: torch.device) -> Callable:
    """``fn`` wrapped to append its synchronised wall time to ``sink``."""

    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _sync(device)
            sink.append(time.perf_counter() - start)

    return wrapper


class _StepTimer(transformers.TrainerCallback):
    """Wall time, CUDA peak and TRL's mean completion length of every optimizer step."""

    def __init__(self, device: torch.device, generate_s: list[float], reward_s: list[float]):
        self.device = device
        self.trainer = None  # set after the trainer exists, to read its metrics
        self.step_s: list[float] = []
        self.step_cpu_s: list[float] = []  # CPU seconds of this process per step
        self.peak_gib: list[float] = []
        self.completion_len: list[float] = []
        self.zero_std: list[float] = []  # TRL's frac_reward_zero_std per step
        self.generate_s: list[float] = []
        self.reward_s: list[float] = []
        self._generate_sink, self._reward_sink = generate_s, reward_s
        self._start = self._cpu_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._generate_sink.clear()
        self._reward_sink.clear()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.step_s.append(time.perf_counter() - self._start)
        self.step_cpu_s.append(time.process_time() - self._cpu_start)
        if self.device.type == "cuda":
            self.peak_gib.append(torch.cuda.max_memory_allocated(self.device) / GIB)
        self.generate_s.append(sum(self._generate_sink))
        self.reward_s.append(sum(self._reward_sink))
        lengths = self.trainer._metrics["train"].get("completions/mean_length", [])
        self.completion_len.append(float(lengths[-1]) if lengths else math.nan)
        zero_std = self.trainer._metrics["train"].get("frac_reward_zero_std", [])
        self.zero_std.append(float(zero_std[-1]) if zero_std else math.nan)


def run_trl(
    preset: Preset,
    workload: Workload,
    *,
    steps: int,
    warmup: int,
    device: torch.device,
    workdir: Path,
    seed: int,
    threads: int,
    reward: RewardSpec | None = None,
) -> ImplResult:
    """Time ``warmup + steps`` optimizer steps of TRL's ``GRPOTrainer`` on the same workload."""
    import trl
    from datasets import Dataset

    from grpo_lab.harness import footprint_metrics, model_footprint

    reward = reward or RewardSpec(preset.reward, seed=seed)

    kwargs = trl_config_kwargs(
        preset,
        output_dir=str(workdir / "run_trl"),
        max_steps=warmup + steps,
        seed=seed,
        use_cpu=device.type == "cpu",
    )
    torch.set_num_threads(threads)
    dataset = Dataset.from_list(
        [{"prompt": p.question, "answer": p.answer} for p in workload.problems]
    )
    # The same loader grpo_lab uses (AutoTokenizer); TRL pads on the left itself.
    tokenizer = transformers.AutoTokenizer.from_pretrained(workload.model_path)
    generate_s: list[float] = []
    reward_s: list[float] = []
    timer = _StepTimer(device, generate_s, reward_s)
    free_memory(device)
    rss_before = process_rss_gib()
    with RssSampler() as rss:
        trainer = trl.GRPOTrainer(
            model=workload.model_path,
            reward_funcs=[reward.for_trl(preset.group_size)],
            args=trl.GRPOConfig(**kwargs),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        timer.trainer = trainer
        # With the progress bar off, transformers prints every log dict to stdout; the JSON line
        # must stay last, and printing is no part of a step.
        trainer.remove_callback(transformers.PrinterCallback)
        # Instance attributes shadow the methods: phase times without touching TRL's code.
        trainer._generate_single_turn = _timed(trainer._generate_single_turn, generate_s, device)
        trainer._calculate_rewards = _timed(trainer._calculate_rewards, reward_s, device)
        trainer.train()
    if len(timer.step_s) != warmup + steps:
        raise RuntimeError(
            f"TRL ran {len(timer.step_s)} optimizer steps, expected {warmup + steps}"
        )
    if device.type == "cuda":
        mem = max(timer.peak_gib)
    else:
        mem = rss.peak_gib - rss_before
    timed = slice(warmup, None)
    phases = {"generate": timer.generate_s[timed], "reward": timer.reward_s[timed]}
    phases["rest"] = [
        s - g - r for s, g, r in zip(timer.step_s[timed], phases["generate"], phases["reward"])
    ]
    extra = {
        "trl_version": trl.__version__,
        "loss_type": TRL_LOSS_TYPE,
        "loss_type_reason": TRL_LOSS_TYPE_REASON,
        "config": {k: v for k, v in kwargs.items() if k != "output_dir"},
    }
    if device.type != "cuda":
        extra["ru_maxrss_gib_after"] = peak_rss_gib()
    extra["zero_std_groups"] = timer.zero_std[timed]
    extra["static_gib"] = _static_gib(
        footprint_metrics(
            {
                "policy": model_footprint(
                    trainer.model, getattr(trainer.optimizer, "optimizer", None)
                )
            }
        )
    )
    del trainer
    timer.trainer = None
    free_memory(device)
    reset_accelerate_state()
    return ImplResult(
        impl="trl",
        step_s=timer.step_s[timed],
        warmup_step_s=timer.step_s[:warmup],
        phases_s=phases,
        completion_len=timer.completion_len[timed],
        mem_gib=float(mem),
        mem_metric=_memory_metric(device),
        extra=extra,
        step_cpu_s=timer.step_cpu_s[timed],
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def compute_ratios(results: dict[str, dict], base: str = "trl") -> dict[str, dict[str, float]]:
    """Per impl and relative to ``base`` (empty without a ``base`` result): ``time`` (median
    step), ``time_best`` (fastest step; less sensitive to other jobs on a shared machine),
    ``memory``, ``cpu_time`` (median CPU seconds of the process per step: on a CPU shared with
    other jobs, far less sensitive to them than wall time), ``cpu_time_mean`` (the same with
    means: where steps differ in work, e.g. in their share of zero-std groups, the mean counts
    it in proportion), and with several rounds
    ``time_by_round`` / ``cpu_time_by_round`` (each round's median over the base's in that
    round)."""
    if base not in results:
        return {}
    base = results[base]
    base_t, base_m = base["step_s_summary"]["median"], base["mem_gib"]
    ratios = {}
    for impl, r in results.items():
        t, m = r["step_s_summary"]["median"], r["mem_gib"]
        best, base_best = r["step_s_summary"]["min"], base["step_s_summary"]["min"]
        ratios[impl] = {
            "time": t / base_t if base_t > 0 else math.nan,
            "time_best": best / base_best if base_best > 0 else math.nan,
            "memory": m / base_m if base_m > 0 else math.nan,
        }
        for key, stat in (("cpu_time", "median"), ("cpu_time_mean", "mean")):
            cpu, base_cpu = (x.get("step_cpu_s_summary", {}).get(stat) for x in (r, base))
            if (
                cpu is not None
                and base_cpu is not None
                and math.isfinite(base_cpu)
                and base_cpu > 0
            ):
                ratios[impl][key] = cpu / base_cpu
        mine, theirs = (x.get("extra", {}).get("round_median_step_s") for x in (r, base))
        if mine and theirs and len(mine) == len(theirs) > 1:
            ratios[impl]["time_by_round"] = [a / b for a, b in zip(mine, theirs)]
        mine, theirs = (x.get("extra", {}).get("round_median_step_cpu_s") for x in (r, base))
        if mine and theirs and len(mine) == len(theirs) > 1:
            ratios[impl]["cpu_time_by_round"] = [a / b for a, b in zip(mine, theirs)]
    return ratios


def json_safe(value):
    """``value`` with NaN and infinities replaced by None, so the JSON line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(report: dict) -> str:
    """The human-readable summary printed before the JSON line."""
    results, ratios = report["results"], report["ratios"]
    vs_grpo = report.get("ratios_vs_grpo") or {}
    w = max(11, *(len(k) + 1 for k in results))
    phase_names: list[str] = []
    for r in results.values():
        for name in r["phases_median_s"]:
            if name not in phase_names:
                phase_names.append(name)
    header = (
        f"{'impl':<{w}}{'step s':>9}{'min':>8}{'max':>8}{'xTRL':>7}{'xGRPO':>7}{'cpu s':>8}"
        f"{'xGRPO':>7}{'mem GiB':>9}"
        f"{'xTRL':>7}{'xGRPO':>7}{'static':>8}{'0-std':>7}{'len':>7}  phase medians (s)"
    )
    lines = [
        f"preset {report['preset']} on {report['device_name']} ({report['device']}), "
        f"torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
        f"trl {report['versions']['trl'] or 'not used'}; {report['torch_threads']} torch threads; "
        f"{report['rounds']} round(s) of {report['warmup']} warm-up + {report['steps']} timed "
        "steps per implementation",
        header,
        "-" * len(header),
    ]
    for impl, r in results.items():
        s, ratio, rg = r["step_s_summary"], ratios.get(impl, {}), vs_grpo.get(impl, {})
        static = r.get("extra", {}).get("static_gib", {}).get("total", math.nan)
        phases = "  ".join(
            f"{name} {_fmt(r['phases_median_s'][name])}"
            for name in phase_names
            if name in r["phases_median_s"]
        )
        lines.append(
            f"{impl:<{w}}{_fmt(s['median']):>9}{_fmt(s['min']):>8}{_fmt(s['max']):>8}"
            f"{_fmt(ratio.get('time', math.nan), '.2f'):>7}"
            f"{_fmt(rg.get('time', math.nan), '.2f'):>7}"
            f"{_fmt(r.get('step_cpu_s_summary', {}).get('median', math.nan)):>8}"
            f"{_fmt(rg.get('cpu_time', math.nan), '.2f'):>7}{_fmt(r['mem_gib']):>9}"
            f"{_fmt(ratio.get('memory', math.nan), '.2f'):>7}"
            f"{_fmt(rg.get('memory', math.nan), '.2f'):>7}{_fmt(static):>8}"
            f"{_fmt(r.get('zero_std_fraction', math.nan), '.2f'):>7}"
            f"{_fmt(r['completion_len_mean'], '.2f'):>7}  {phases}"
        )
    if ratios:
        lines.append(
            "fastest step vs TRL's fastest: "
            + "; ".join(f"{k} {_fmt(v['time_best'], '.2f')}" for k, v in ratios.items())
        )
    for (name, table), key in itertools.product(
        (("TRL", ratios), ("GRPO", vs_grpo)), ("time", "cpu_time")
    ):
        by_round = {k: v[f"{key}_by_round"] for k, v in table.items() if f"{key}_by_round" in v}
        if by_round:
            lines.append(
                f"{key} vs {name} per round: "
                + "; ".join(
                    f"{k} " + " ".join(_fmt(x, ".2f") for x in v) for k, v in by_round.items()
                )
            )
    lines.append(f"memory: {report['memory_metric']}")
    lines.append(
        "cpu s: median CPU seconds of the implementation's process per step; "
        "static: GiB of parameters + gradients + optimizer state of every trained model; "
        "0-std: mean fraction of groups whose rewards are all equal"
    )
    reward = report.get("reward") or {}
    if reward:
        lines.append(
            f"reward: {reward['kind']}"
            + (
                f" (zero-std fraction target {reward['zero_std_fraction']}, seed {reward['seed']})"
                if reward["kind"] == "controlled"
                else ""
            )
        )
    lines.append("len: mean completion tokens per sequence (EOS included)")
    if "trl" in results:
        lines.append(f"TRL loss_type={TRL_LOSS_TYPE}: {TRL_LOSS_TYPE_REASON}")
        lines.append("TRL phases: generate = _generate_single_turn, reward = _calculate_rewards")
    updates = [
        f"{impl} {r['extra']['updates_per_step']}"
        for impl, r in results.items()
        if impl in GRPO_LAB_IMPLS
    ]
    if updates:
        lines.append(f"optimizer updates per grpo_lab step: {', '.join(updates)} (TRL: 1)")
    if report.get("reference"):
        ref = report["reference"]
        lines.append(
            f"REFERENCE (not measured here, {ref['device']}): TRL 1.16 GRPOTrainer "
            f"~{ref['trl_1.16_grpo_step_s']} s/step at ~{ref['trl_1.16_grpo_peak_gib']} GiB peak; "
            f"plain transformers generate 64x256 tokens ~{ref['hf_generate_64x256_dynamic_cache_s']}"
            " s (dynamic cache)"
        )
    timed = report["steps"] * report["rounds"]
    if timed < 3:
        lines.append(f"WARNING: median of {timed} step(s); time at least 3")
    return "\n".join(lines)


def resolve_threads(preset: Preset, requested: int | None) -> int:
    """Torch threads for every implementation: ``--threads``, else the preset's, else the GRPO
    recipe's ``trainer.cpu_threads``, else torch's default."""
    if requested is not None:
        if requested < 1:
            raise SystemExit(f"--threads must be >= 1, got {requested}")
        return requested
    if preset.threads is not None:
        return preset.threads
    from grpo_lab.config import load_config

    recipe = load_config(RECIPES / preset.recipes["grpo"]).trainer.cpu_threads
    return recipe if recipe is not None else torch.get_num_threads()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def _parse_impls(text: str) -> list[str]:
    impls = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or not impls or len(set(impls)) != len(impls):
        raise argparse.ArgumentTypeError(
            f"--impls: expected distinct names from {', '.join(IMPLS)}, got {text!r}"
        )
    return impls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time optimizer steps of grpo_lab GRPO / PPO against TRL's GRPOTrainer.",
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument(
        "--impls",
        type=_parse_impls,
        default=list(DEFAULT_IMPLS),
        help=f"comma-separated, run in this order (default {','.join(DEFAULT_IMPLS)}; also "
        f"{', '.join(BENCH_VARIANTS)})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every implementation this many times, alternating the order (noisy CPUs)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for every implementation (default: the preset's, 1 for mid; "
        "else the GRPO recipe's trainer.cpu_threads, else torch's default)",
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run a GPU preset on the CPU anyway (very slow)"
    )
    parser.add_argument("--workdir", type=Path, help="folder for models and runs (default: temp)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra dotted override for grpo_lab's runs (repeatable), e.g. --set model.lora.r=16",
    )
    parser.add_argument(
        "--reward",
        choices=("task", "controlled"),
        help="task: the math reward on the gold answers; controlled: seeded group rewards with "
        "signal in every group but --zero-std-fraction of them (default: the preset's; "
        "controlled for mid and w0.5b, whose random models would score 0 everywhere)",
    )
    parser.add_argument(
        "--zero-std-fraction",
        type=float,
        default=0.0,
        help="controlled reward: expected fraction of groups whose rewards are all equal "
        "(default 0: every group has signal)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every implementation in this process (default: a fresh process each, so "
        "peak memory is its own)",
    )
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    return parser


def _worker_argv(args: argparse.Namespace, impl: str, threads: int, result: Path) -> list[str]:
    """The command line that measures ``impl`` alone in a fresh process (see :func:`main`)."""
    argv = [
        "--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--seed", str(args.seed), "--threads", str(threads), "--workdir", str(args.workdir),
        "--reward", args.reward, "--zero-std-fraction", str(args.zero_std_fraction),
        "--worker", impl, "--worker-result", str(result),
    ]  # fmt: skip
    if args.allow_cpu:
        argv.append("--allow-cpu")
    for item in args.set:
        argv += ["--set", item]
    return argv


def run_impl(
    impl: str,
    preset: Preset,
    workload: Workload,
    *,
    reward: RewardSpec,
    extra_overrides: Sequence[str],
    **common,
) -> ImplResult:
    """One implementation, in this process."""
    if impl == "trl":
        return run_trl(preset, workload, reward=reward, **common)
    return run_grpo_lab(
        impl, preset, workload, extra_overrides=extra_overrides, reward=reward, **common
    )


def run_isolated(args: argparse.Namespace, impl: str, threads: int, tag: str) -> ImplResult:
    """``impl`` measured by a fresh Python process on the prepared workload, so its memory is
    its own; its output goes to stderr (the JSON line stays this process's last)."""
    result = args.workdir / f"result_{impl}_{tag}.json"
    result.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *_worker_argv(args, impl, threads, result),
    ]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    ) as proc:
        for line in proc.stdout:  # the child's stdout and stderr, passed on as they come
            sys.stderr.write(line)
        rc = proc.wait()
    if rc != 0 or not result.exists():
        raise SystemExit(f"error: the {impl} run failed (exit code {rc}); its output is above")
    return ImplResult(**json.loads(result.read_text()))


def _load_workload(preset: Preset, workdir: Path) -> Workload:
    """The workload :func:`prepare_workload` wrote into ``workdir`` (for a worker process)."""
    from grpo_lab.data import load_math_jsonl

    saved = json.loads((workdir / "workload.json").read_text())
    return Workload(
        saved["model_path"], load_math_jsonl(saved["prompts_path"]), saved["prompts_path"]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be >= 1, --warmup >= 0")
    if not 0.0 <= args.zero_std_fraction <= 1.0:
        raise SystemExit(f"--zero-std-fraction must be in [0, 1], got {args.zero_std_fraction}")
    preset = PRESETS[args.preset]
    args.reward = args.reward or preset.reward
    reward = RewardSpec(args.reward, args.zero_std_fraction, seed=args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preset.needs_gpu and device.type != "cuda" and not args.allow_cpu:
        print(
            f"error: preset {preset.name!r} is a GPU workload and no CUDA device is available; "
            "a CPU run would take hours. Pass --allow-cpu to run it anyway.",
            file=sys.stderr,
        )
        return 2
    threads = resolve_threads(preset, args.threads)
    common = {
        "steps": args.steps,
        "warmup": args.warmup,
        "device": device,
        "seed": args.seed,
        "threads": threads,
    }
    if args.worker is not None:  # one implementation, measured for a parent process
        result = run_impl(
            args.worker,
            preset,
            _load_workload(preset, args.workdir),
            reward=reward,
            extra_overrides=args.set,
            workdir=args.workdir,
            **common,
        )
        args.worker_result.write_text(json.dumps(json_safe(asdict(result)), allow_nan=False))
        return 0
    trl_version = None
    if "trl" in args.impls:
        import trl  # fail now, not after the grpo_lab runs

        trl_version = trl.__version__

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="step_bench_") as tmp:
        args.workdir = (args.workdir or Path(tmp)).resolve()
        args.workdir.mkdir(parents=True, exist_ok=True)
        total = args.warmup + args.steps
        workload = prepare_workload(preset, args.workdir, total_steps=total, seed=args.seed)
        (args.workdir / "workload.json").write_text(
            json.dumps({"model_path": workload.model_path, "prompts_path": workload.prompts_path})
        )
        per_round: dict[str, list[ImplResult]] = {impl: [] for impl in args.impls}
        for r, order in enumerate(round_orders(args.impls, args.rounds)):
            for impl in order:
                print(
                    f"[step_bench] round {r + 1}/{args.rounds} {impl}: "
                    f"{args.warmup} warm-up + {args.steps} timed steps",
                    file=sys.stderr,
                    flush=True,
                )
                if args.in_process:
                    result = run_impl(
                        impl, preset, workload, reward=reward, extra_overrides=args.set,
                        workdir=args.workdir, **common,
                    )  # fmt: skip
                else:
                    result = run_isolated(args, impl, threads, tag=str(r))
                per_round[impl].append(result)
        results = {impl: merge_rounds(rs).to_dict() for impl, rs in per_round.items()}

    report = {
        "preset": preset.name,
        "device": str(device),
        "device_name": _device_name(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl_version,
        },
        "torch_threads": threads,
        "extra_overrides": list(args.set),
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "seed": args.seed,
        "impls": list(args.impls),
        "isolation": "one process per implementation" if not args.in_process else "one process",
        "workload": {k: v for k, v in asdict(preset).items() if k != "recipes"},
        "reward": asdict(reward),
        "memory_metric": _memory_metric(device),
        "trl_loss_type": TRL_LOSS_TYPE if "trl" in args.impls else None,
        "trl_loss_type_reason": TRL_LOSS_TYPE_REASON if "trl" in args.impls else None,
        "results": results,
        "ratios": compute_ratios(results),
        "ratios_vs_grpo": compute_ratios(results, base="grpo"),
        "reference": REFERENCE_W if preset.name == "w0.5b" else None,
        "command": "python benchmarks/step_bench.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(format_table(report), flush=True)
    report = json_safe(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    line = json.dumps(report, allow_nan=False)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
