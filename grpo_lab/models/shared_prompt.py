"""Policy, value head on the shared trunk, separate critic, reference, and the shared forward.

Shape legend: N sequences, T = P + C tokens (left-padded prompt of P, completion of C), K kept
positions, H hidden size, V vocabulary size.

Alignment convention: the logits and the hidden state at position P-1+t predict completion token
t, so ``logp[:, t]`` is log pi(token t | prefix) and ``values[:, t]`` is V(s_t), the value of the
state just before token t is emitted. Position ids are always derived from the attention mask
(``cumsum - 1`` clamped at 0), exactly as transformers ``generate`` does, so left padding does not
shift positions between rollout and training.

Every model kind answers ``model(input_ids=, attention_mask=, position_ids=, logits_to_keep=)``
with an object carrying ``logits`` and/or ``values``; :func:`completion_forward` calls the
outermost wrapper (DDP, accelerate, DeepSpeed) so that its hooks run.
:func:`shared_prompt_completion_forward` gives the same outputs and gradients from split inputs,
running the prompt once per distinct prompt and the completions against its cached keys/values.

Chunked LM head: where the logits the model would materialise (N x K x V) exceed
``max_logit_elements``, both forwards ask the model for none of them (``logits_to_keep`` = an
empty index tensor, ``output_hidden_states=True``) and apply the LM head module themselves to
the last hidden state a chunk of positions at a time, together with the float32 log-softmax;
under autograd each chunk is checkpointed, so only one chunk of logits exists at once, also in
backward. This is only sound where ``lm_head(hidden_states[-1])`` IS the model's logits; see
:func:`_chunkable_head` for the rule that decides it (a config check, then a one-time numeric
check per model and train/eval mode).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_layers import GradientCheckpointingLayer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VALUE_HEAD_FILE = "value_head.safetensors"


def resolve_dtype(name: str) -> torch.dtype:
    """Map a dtype name to torch; an unknown name raises listing the valid ones."""
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:*`` names map to the embedded tiny models' cached folder; a local folder or a
    hub name is checked by :func:`grpo_lab.hub.resolve_model_source` (a missing folder, a folder
    without a model, or a hub name while offline and not cached is a one-line error)."""
    if name_or_path.startswith("builtin:"):
        from grpo_lab.tiny import resolve_model_path as resolve_builtin

        return resolve_builtin(name_or_path)
    from grpo_lab.hub import resolve_model_source

    return resolve_model_source(name_or_path)


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """AutoTokenizer with left padding; a missing pad token is set to the EOS token.

    NOTE: with pad == EOS a padded position and a real EOS share an id, so masks (never token
    ids) must decide what is padding.
    """
    path = resolve_model_path(name_or_path)
    with _loading(name_or_path):
        tokenizer = _load_tokenizer(path, trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            from grpo_lab.errors import ModelSourceError

            raise ModelSourceError(
                f"tokenizer {name_or_path!r}: has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _load_tokenizer(path: str, trust_remote_code: bool):
    if _declares_generic_fast_tokenizer(path):
        # NOTE: transformers 5.x AutoTokenizer picks the tokenizer class from the model type
        # (e.g. Qwen2Tokenizer for a qwen2 model), which re-runs that model's pre-tokenizer over
        # a custom tokenizer.json (the embedded model's character tokenizer loses its spaces).
        # A folder that declares the generic class gets its tokenizer.json exactly as saved.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return tokenizer


def _declares_generic_fast_tokenizer(path: str) -> bool:
    config = Path(path) / "tokenizer_config.json"
    if not (config.is_file() and (Path(path) / "tokenizer.json").is_file()):
        return False
    try:
        declared = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, json.JSONDecodeError):
        return False
    return declared in ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a hub name, a local folder or a ``builtin:`` name, set up for training.

    ``config.use_cache`` is turned off because training forwards never reuse a KV cache;
    :mod:`grpo_lab.rollout` asks for the cache explicitly when generating.
    """
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name_or_path)
    with _loading(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    return _prepare_for_training(model, gradient_checkpointing)


@contextlib.contextmanager
def _loading(name_or_path: str) -> Iterator[None]:
    """A model or tokenizer that cannot be loaded (bad config.json, truncated weights, missing
    files, remote code not allowed) as one line naming it."""
    from grpo_lab.errors import ModelSourceError, UserError, one_line

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(
            f"cannot load {name_or_path!r} (model.name_or_path): {type(e).__name__}: "
            f"{one_line(str(e))[:300]}"
        ) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelSourceError(
            f"cannot load {name_or_path!r} (model.name_or_path): its weights are unreadable "
            f"({one_line(str(e))[:200]})"
        ) from e


def random_init_causal_lm(
    config: PretrainedConfig, *, dtype: str = "float32", attn_implementation: str | None = None
) -> PreTrainedModel:
    """A randomly initialised causal LM of ``config``'s architecture (benchmark shapes, no hub)."""
    model = AutoModelForCausalLM.from_config(
        config, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    return _prepare_for_training(model, gradient_checkpointing=False)


def apply_lora(
    model: PreTrainedModel, *, r: int, alpha: int, dropout: float, target_modules: list[str]
) -> nn.Module:
    """Wrap `model` with LoRA adapters (peft); only the adapters (and any head added later) train.

    The base weights stay frozen, so the reference policy is this same model with its adapters
    disabled (``model.disable_adapter()``): KL needs no second copy in memory.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_reference(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The frozen reference policy: a causal LM in eval mode with ``requires_grad_(False)``."""
    model = load_causal_lm(
        name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return model.eval().requires_grad_(False)


def enable_gradient_checkpointing(model: nn.Module, checkpoint_kwargs: dict | None = None) -> None:
    """Checkpoint every decoder layer (non-reentrant unless ``checkpoint_kwargs`` says so).

    transformers 5.x renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable``; the new name is used where it exists.
    """
    kwargs = {"use_reentrant": False} if checkpoint_kwargs is None else checkpoint_kwargs
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _prepare_for_training(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


class ValueHead(nn.Module):
    """Linear(H, 1) on a hidden state, computed in float32.

    Initialised with weight ~ N(0, init_std^2) and zero bias; the default
    ``init_std = 1/sqrt(H+1)`` keeps initial values O(1) for unit-scale hidden states, and
    ``init_std=0`` gives an all-zero head. NOTE: if a wrapper casts the whole model (e.g.
    DeepSpeed bf16) the head follows; its output is still returned as float32.
    """

    def __init__(self, hidden_size: int, init_std: float | None = None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        std = 1.0 / math.sqrt(hidden_size + 1) if init_std is None else init_std
        if std > 0:
            nn.init.normal_(self.linear.weight, std=std)
        else:
            nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:  # [..., H] -> [...] float32
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


@dataclass
class ValueModelOutput:
    """What :class:`PolicyWithValueHead` and :class:`Critic` return.

    NOTE: deliberately not a transformers ``ModelOutput``: that is a dict, whose ``values``
    method a ``values`` field would shadow (DDP walks outputs with ``dict.values()``). DDP and
    accelerate handle plain dataclasses.
    """

    logits: Tensor | None = None  # [N, K, V]
    values: Tensor | None = None  # [N, K] float32
    hidden_states: tuple[Tensor, ...] | None = None  # each [N, T, H]; only when asked


def _keep_positions(hidden: Tensor, keep: int | Tensor) -> Tensor:  # [N, T, H] -> [N, K, H]
    """The positions ``logits_to_keep`` selects: an int keeps the last K (all T when 0), a 1-D
    index tensor keeps those positions (transformers' own convention)."""
    if isinstance(keep, Tensor):
        return hidden[:, keep]
    return hidden[:, -keep:] if keep > 0 else hidden


def _hidden_size(config: PretrainedConfig) -> int:
    return config.get_text_config().hidden_size


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a :class:`ValueHead` on its last hidden state (the shared trunk).

    One forward gives logits and a value per position; a value loss therefore trains the head
    and the trunk. ``lm`` may be peft-wrapped. NOTE: values come from
    ``output_hidden_states=True``, which keeps every layer's output until the forward returns;
    that is free under autograd (those activations are saved anyway) but costs memory in no-grad
    passes.
    """

    def __init__(self, lm: PreTrainedModel, v_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        self.v_head = v_head if v_head is not None else ValueHead(_hidden_size(lm.config))

    @property
    def config(self) -> PretrainedConfig:
        return self.lm.config

    @property
    def generation_model(self) -> PreTrainedModel:
        """The module :func:`grpo_lab.rollout.generate` samples from."""
        return self.lm

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        enable_gradient_checkpointing(self.lm, gradient_checkpointing_kwargs)

    def forward(
        self,
        input_ids: Tensor,  # [N, T]
        attention_mask: Tensor | None = None,  # [N, T]
        position_ids: Tensor | None = None,  # [N, T]
        logits_to_keep: int | Tensor = 0,  # int, or [K] long positions
        values_to_keep: int | Tensor | None = None,  # int, or [K'] long positions
        output_hidden_states: bool = False,
        **kwargs,
    ) -> ValueModelOutput:
        """Logits [N, K, V] for the positions ``logits_to_keep`` selects (an int: the last K,
        all T when 0; a 1-D index tensor: those positions, none when empty) and values [N, K']
        for those ``values_to_keep`` selects, by default the same ones as the logits.

        ``output_hidden_states=True`` also returns the lm's hidden states (each [N, T, H], the
        last one post final norm), as :func:`completion_forward`'s chunked LM head needs.
        """
        keep, name = (
            (logits_to_keep, "logits_to_keep")
            if values_to_keep is None
            else (values_to_keep, "values_to_keep")
        )
        if isinstance(keep, Tensor) and keep.dim() != 1:
            raise ValueError(f"{name}: expected an int or a 1-D index tensor, got {keep.dim()}-D")
        kwargs.setdefault("use_cache", False)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            output_hidden_states=True,
            **kwargs,
        )
        hidden = _keep_positions(out.hidden_states[-1], keep)  # [N, K', H]
        return ValueModelOutput(
            logits=out.logits,
            values=self.v_head(hidden),
            hidden_states=out.hidden_states if output_hidden_states else None,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """The lm via its own ``save_pretrained`` (a peft model writes its adapter) plus
        ``value_head.safetensors``."""
        self.lm.save_pretrained(path)
        _save_head(self.v_head, path)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> PolicyWithValueHead:
        """Load the lm; the head from ``value_head.safetensors`` if present, else freshly
        initialised (so a plain causal-LM checkpoint starts PPO)."""
        lm = load_causal_lm(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
        )
        return cls(lm, _load_head(name_or_path, _hidden_size(lm.config)))


class Critic(nn.Module):
    """A separate value model: its own transformer trunk plus a :class:`ValueHead`.

    The trunk is the base model without the LM head (``AutoModel``), so an untied LM head is
    neither stored nor left as an unused parameter under DDP; it loads from a causal-LM
    checkpoint such as the policy's. The forward returns values only.
    """

    def __init__(self, backbone: PreTrainedModel, v_head: ValueHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.v_head = v_head if v_head is not None else ValueHead(_hidden_size(backbone.config))

    @property
    def config(self) -> PretrainedConfig:
        return self.backbone.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        enable_gradient_checkpointing(self.backbone, gradient_checkpointing_kwargs)

    def forward(
        self,
        input_ids: Tensor,  # [N, T]
        attention_mask: Tensor | None = None,  # [N, T]
        position_ids: Tensor | None = None,  # [N, T]
        logits_to_keep: int = 0,
        **kwargs,
    ) -> ValueModelOutput:
        """Values [N, K] for the last K = ``logits_to_keep`` positions (all T when 0)."""
        kwargs.setdefault("use_cache", False)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        hidden = _keep_positions(out.last_hidden_state, logits_to_keep)
        return ValueModelOutput(values=self.v_head(hidden))

    def save_pretrained(self, path: str | Path) -> None:
        """The trunk via its own ``save_pretrained`` plus ``value_head.safetensors``."""
        self.backbone.save_pretrained(path)
        _save_head(self.v_head, path)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> Critic:
        """Trunk from any causal-LM or critic folder; head from ``value_head.safetensors`` if
        present, else freshly initialised."""
        backbone = AutoModel.from_pretrained(
            resolve_model_path(name_or_path),
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        backbone = _prepare_for_training(backbone, gradient_checkpointing)
        return cls(backbone, _load_head(name_or_path, _hidden_size(backbone.config)))


def load_critic(
    name_or_path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
) -> Critic:
    """:meth:`Critic.from_pretrained`; pass the policy's checkpoint for the usual PPO setup."""
    return Critic.from_pretrained(
        name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        gradient_checkpointing=gradient_checkpointing,
        trust_remote_code=trust_remote_code,
    )


def _save_head(head: ValueHead, path: str | Path) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(Path(path) / VALUE_HEAD_FILE))


def _load_head(name_or_path: str, hidden_size: int) -> ValueHead:
    head = ValueHead(hidden_size)
    file = Path(resolve_model_path(name_or_path)) / VALUE_HEAD_FILE
    if file.is_file():
        head.load_state_dict(load_file(str(file)))
    return head


@dataclass
class CompletionOutputs:
    """Per-completion-token outputs of :func:`completion_forward` (None when not produced)."""

    logp: Tensor | None  # [N, C] float32 log-prob of each completion token under softmax(z / T)
    entropy: Tensor | None  # [N, C] float32 entropy of that distribution (only when asked)
    values: Tensor | None  # [N, C] float32 V(s_t) for predicting completion token t


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:  # [N, T] -> [N, T] long
    """Positions counting real tokens only (``cumsum - 1``, 0 on left padding), as in generate."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


MAX_LOGIT_ELEMENTS = 2**26
# Config fields under which a transformers causal LM changes its logits after the LM head (or
# the hidden state between the final norm and the head), as found in transformers 5.24:
# Gemma 2/3/4, nanochat, Beam (softcapping), RecurrentGemma, Cohere, Granite, HyperCLOVA X,
# MiniCPM3, Falcon-H1, Inkling, Muse. A value other than None means the transform applies.
LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "logits_mup_width_multiplier",
    "output_multiplier",
)


def completion_forward(
    model: nn.Module,
    input_ids: Tensor,  # [N, P+C]
    attention_mask: Tensor,  # [N, P+C]
    completion_len: int,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = 1024,
    max_logit_elements: int | None = MAX_LOGIT_ELEMENTS,
) -> CompletionOutputs:
    """One forward of ``model`` over prompt + completion, reduced to the C completion tokens.

    ``model`` is a causal LM (-> logp, entropy), a :class:`PolicyWithValueHead` (-> logp,
    entropy, values) or a :class:`Critic` (-> values), possibly wrapped by DDP / accelerate /
    DeepSpeed / peft; it is called once, through its outermost wrapper.

    Logits of K = C+1 positions are needed (the last one is dropped: it predicts past the end).
    While N * K * V <= ``max_logit_elements`` (or it is None) the model materialises them itself
    (``logits_to_keep=K``) and :func:`token_logprobs` reduces them ``chunk_size`` positions at
    a time. Above it, where the LM head qualifies (:func:`_chunkable_head`), the model returns
    no logits and the head is applied to its last hidden state in chunks of at most
    ``max_logit_elements`` logits (and ``chunk_size`` positions), each checkpointed under
    autograd; outputs and gradients are the same up to float rounding.
    """
    seq_len = input_ids.shape[1]
    if not 0 < completion_len < seq_len:
        raise ValueError(f"completion_len must be in [1, {seq_len - 1}], got {completion_len}")
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return _kept_positions_forward(
        model,
        inputs,
        completion_len + 1,
        input_ids[:, -completion_len:],
        temperature=temperature,
        compute_entropy=compute_entropy,
        chunk_size=chunk_size,
        max_logit_elements=max_logit_elements,
    )


def _kept_positions_forward(
    model: nn.Module,
    inputs: dict,
    keep: int,
    targets: Tensor,  # [N, C'] long, predicted by the first C' of the K kept positions
    *,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int,
    max_logit_elements: int | None,
) -> CompletionOutputs:
    """One ``model(**inputs)`` call keeping the last K = ``keep`` positions, reduced to the
    log-probs (entropy, values) of ``targets`` ([N, C'] each).

    Three ways, decided per call: the model's own logits (below the threshold, or where the
    head does not qualify or failed its check); the chunked head; or, on the first call for
    this model and train/eval mode, the one-time head check: the model is asked for the logits
    of its last position only, which are compared with the head applied to that position's
    hidden state. If they agree the same call continues on the chunked path, so the full
    logits are never materialised; if not, a second call takes the model's own logits.

    NOTE: on the chunked path the model still calls its head, on the empty selection (or the
    checked position), so the head's parameters (and any adapter on it) are reachable from the
    model's outputs: DDP with ``find_unused_parameters`` does not mark them unused before the
    chunks use them.
    """
    # Of the K kept positions the first C' predict targets; slicing from the end also covers a
    # model that ignored logits_to_keep.
    window = slice(-keep, (targets.shape[1] - keep) or None)
    head = _chunkable_head(model, targets.shape[0] * keep, max_logit_elements)
    verdict = None if head is None else _HEAD_CHECKS.get(head.lm, {}).get(head.lm.training)
    if head is not None and verdict is not False:
        extra = {"values_to_keep": keep} if head.with_values else {}
        length = inputs["input_ids"].shape[1]
        # [1] the last position for the check, else [0]: no logits at all
        selected = torch.arange(length - 1 if verdict is None else length, length)
        selected = selected.to(targets.device)
        out = model(**inputs, logits_to_keep=selected, output_hidden_states=True, **extra)
        if verdict is None:
            verdict = _check_head(head, out.hidden_states[-1][:, -1:], out.logits[:, -1:])
        if verdict:
            logp, entropy = _head_logprobs(
                head,
                out.hidden_states[-1][:, window],  # [N, C', H]
                targets,
                temperature=temperature,
                compute_entropy=compute_entropy,
                chunk_size=chunk_size,
                max_logit_elements=max_logit_elements,
            )
            values = out.values[:, window].float() if isinstance(out, ValueModelOutput) else None
            return CompletionOutputs(logp=logp, entropy=entropy, values=values)

    out = model(**inputs, logits_to_keep=keep)
    logp = entropy = values = None
    if out.logits is not None:
        logp, entropy = token_logprobs(
            out.logits[:, window],
            targets,
            temperature=temperature,
            compute_entropy=compute_entropy,
            chunk_size=chunk_size,
        )
    if isinstance(out, ValueModelOutput) and out.values is not None:
        values = out.values[:, window].float()
    return CompletionOutputs(logp=logp, entropy=entropy, values=values)


@dataclass
class _LMHead:
    """An LM head that :func:`completion_forward` may apply itself."""

    module: nn.Module  # [..., H] -> [..., V], the lm's get_output_embeddings()
    lm: PreTrainedModel  # the causal LM owning it, under every wrapper
    with_values: bool  # the model is a PolicyWithValueHead (values come from the same call)


# Outcome of the one-time head check, per causal LM and training flag (see _chunkable_head).
_HEAD_CHECKS: weakref.WeakKeyDictionary[PreTrainedModel, dict[bool, bool]] = (
    weakref.WeakKeyDictionary()
)
# assert_close's default (rtol, atol) per dtype, for the head check.
_CHECK_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
}


def _chunkable_head(
    model: nn.Module, positions: int, max_logit_elements: int | None
) -> _LMHead | None:
    """The LM head to apply chunk by chunk for a pass keeping ``positions`` = N * K positions,
    or None where the model's own logits are to be used.

    None unless N * K * V exceeds ``max_logit_elements`` (never when that is None). Then the
    rule that ``lm_head(hidden_states[-1])`` is the model's logits:

    1. Unwrapping (DDP / DeepSpeed ``.module``, ``torch.compile``'s ``_orig_mod``, peft
       ``get_base_model()``, ``PolicyWithValueHead.lm``) must reach a transformers
       ``PreTrainedModel`` with ``get_output_embeddings()`` (a :class:`Critic` has none).
    2. Its config (and text config) sets none of ``LOGIT_TRANSFORM_FIELDS`` and does not
       untie ``hidden_states[-1]`` from the final-norm output (``tie_last_hidden_states``).
    3. Not FSDP (the head's parameters are sharded outside its root forward), and not a head
       partitioned by ZeRO-3 over several processes: each head call is then a collective
       gather and the number of chunks, which follows each process's own N and C, would
       differ between processes.
    4. The one-time check (:func:`_check_head`, run by the first call that passes 1-3, per
       causal LM and train/eval mode) found the head reproducing the model's own logits.
       That call still uses the model's logits, so a failed check only costs the saving.
    """
    if max_logit_elements is None:
        return None
    if max_logit_elements < 1:
        raise ValueError(f"max_logit_elements must be >= 1 or None, got {max_logit_elements}")
    head = _find_lm_head(model)
    if head is None:
        return None
    if positions * head.lm.config.get_text_config().vocab_size <= max_logit_elements:
        return None
    configs = (head.lm.config, head.lm.config.get_text_config())
    if any(getattr(c, "tie_last_hidden_states", None) is False for c in configs) or any(
        getattr(c, field, None) is not None for c in configs for field in LOGIT_TRANSFORM_FIELDS
    ):
        return None
    if any(hasattr(p, "ds_id") for p in head.module.parameters()) and _world_size() > 1:
        return None
    return head


def _find_lm_head(model: nn.Module) -> _LMHead | None:
    """The output embeddings under ``model``'s wrappers (None: a critic, FSDP, unknown)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    inner, with_values = model, False
    while not isinstance(inner, PreTrainedModel):
        if isinstance(inner, (FullyShardedDataParallel, FSDPModule, Critic)):
            return None
        if isinstance(inner, PolicyWithValueHead):
            inner, with_values = inner.lm, True
        elif callable(getattr(inner, "get_base_model", None)):
            inner = inner.get_base_model()  # peft
        elif isinstance(getattr(inner, "module", None), nn.Module):
            inner = inner.module  # DDP, DeepSpeed
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):
            inner = inner._orig_mod  # torch.compile
        else:
            return None
    head = inner.get_output_embeddings()
    if head is None or isinstance(inner, FSDPModule):
        return None
    return _LMHead(module=head, lm=inner, with_values=with_values)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_head(
    head: _LMHead,
    hidden: Tensor,  # [N, 1, H] the model's last hidden state at its last position
    logits: Tensor,  # [N, 1, V] the model's own logits there
) -> bool:
    """Record and return whether the head module applied to ``hidden`` gives ``logits``
    (assert_close's default tolerances of the coarser dtype; NaN matches NaN), warning when it
    does not.

    NOTE: the check runs once per causal LM and train/eval mode, on one position. It catches
    a transform the config fields do not name, but one that is numerically invisible at that
    position (e.g. a softcap far above these logits) would pass; the config rule is the
    primary guard. Stochastic layers in train mode (e.g. LoRA dropout on the head) fail it.
    """
    with torch.no_grad():
        ours = head.module(hidden.detach())  # [N, 1, V]
    coarse = max((ours.dtype, logits.dtype), key=lambda d: torch.finfo(d).eps)
    rtol, atol = _CHECK_TOLERANCES.get(coarse, (1.3e-6, 1e-5))
    ok = ours.shape == logits.shape and torch.allclose(
        ours.float(), logits.float(), rtol=rtol, atol=atol, equal_nan=True
    )
    _HEAD_CHECKS.setdefault(head.lm, {})[head.lm.training] = ok
    if not ok:
        warnings.warn(
            f"{type(head.lm).__name__}: its output embeddings applied to the last hidden state "
            "do not reproduce its logits; the chunked LM head is not used for this model in "
            f"{'train' if head.lm.training else 'eval'} mode",
            stacklevel=4,
        )
    return ok


def _head_logprobs(
    head: _LMHead,
    hidden: Tensor,  # [N, C, H] last hidden state at the positions predicting targets
    targets: Tensor,  # [N, C] long
    *,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int,
    max_logit_elements: int,
) -> tuple[Tensor, Tensor | None]:
    """:func:`token_logprobs` of ``head.module(hidden)`` without ever holding more than one
    chunk's logits: at most ``chunk_size`` positions and ``max_logit_elements`` logits (at
    least one position). Under autograd each chunk (head, float32 log-softmax, gather,
    entropy) is checkpointed, so backward recomputes its logits instead of keeping them; the
    head's weight (tied or not) gets the sum of the chunks' gradients.

    Returns (logp [N, C] float32, entropy [N, C] float32 or None).
    """
    _check_logprob_args(temperature, chunk_size)

    def chunk_fn(h: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # [N, c, H], [N, c]
        return _chunk_logprobs(head.module(h), y, temperature, compute_entropy)

    vocab = head.lm.config.get_text_config().vocab_size
    step = max(1, min(chunk_size, max_logit_elements // max(1, hidden.shape[0] * vocab)))
    recompute = torch.is_grad_enabled()
    return _over_chunks(chunk_fn, hidden, targets, step, lambda h: recompute, compute_entropy)


def _over_chunks(
    chunk_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    inputs: Tensor,  # [N, C, ...] logits or hidden states
    targets: Tensor,  # [N, C] long
    step: int,
    recompute: Callable[[Tensor], bool],
    compute_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """``chunk_fn`` over ``step`` positions at a time, checkpointed (non-reentrant) where
    ``recompute(chunk)`` says so; (logp [N, C], entropy [N, C] or None), concatenated."""
    logps, entropies = [], []
    for start in range(0, inputs.shape[1], step):
        x, y = inputs[:, start : start + step], targets[:, start : start + step]
        if recompute(x):
            logp, ent = checkpoint(chunk_fn, x, y, use_reentrant=False)
        else:
            logp, ent = chunk_fn(x, y)
        logps.append(logp)
        entropies.append(ent)
    entropy = torch.cat(entropies, dim=1) if compute_entropy else None
    return torch.cat(logps, dim=1), entropy


def _check_logprob_args(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunk_logprobs(
    z: Tensor,  # [N, c, V] logits, any float dtype
    y: Tensor,  # [N, c] long
    temperature: float,
    compute_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """(logp [N, c], entropy [N, c] or a 0-d placeholder), float32, of softmax(z / T)."""
    z_logp = torch.log_softmax(z.float() / temperature, dim=-1)  # [N, c, V]
    logp = z_logp.gather(-1, y[..., None]).squeeze(-1)
    if not compute_entropy:
        return logp, logp.new_zeros(())
    return logp, -(z_logp.exp() * z_logp).sum(-1)


def token_logprobs(
    logits: Tensor,  # [N, C, V] any float dtype
    targets: Tensor,  # [N, C] long
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = 1024,
    max_chunk_elements: int = 2**26,
    min_recompute_elements: int = 2**20,
) -> tuple[Tensor, Tensor | None]:
    """Float32 log-prob of ``targets`` (and entropy) under softmax(logits / temperature).

    Works ``chunk_size`` positions at a time, fewer when N * positions * V would exceed
    ``max_chunk_elements``. Under autograd each chunk is checkpointed, so
    only the model's own logits are kept for backward and the float32 log-softmax of a chunk is
    recomputed there; no [N, C, V] float32 tensor ever exists at once. Chunks of fewer than
    ``min_recompute_elements`` elements (4 MiB in float32 by default) are kept instead: for
    them checkpointing saves no memory worth its bookkeeping.

    Returns (logp [N, C] float32, entropy [N, C] float32 or None).
    """
    _check_logprob_args(temperature, chunk_size)

    def chunk_fn(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # [N, c, V], [N, c]
        return _chunk_logprobs(z, y, temperature, compute_entropy)

    recompute = torch.is_grad_enabled() and logits.requires_grad
    # Cap each chunk's float32 [N, c, V] block at max_chunk_elements (256 MiB by default), so a
    # 152k vocabulary over a few hundred positions never sits in float32 at once.
    n, _, vocab = logits.shape
    step = max(1, min(chunk_size, max_chunk_elements // max(1, n * vocab)))
    return _over_chunks(
        chunk_fn,
        logits,
        targets,
        step,
        lambda z: recompute and z.numel() >= min_recompute_elements,
        compute_entropy,
    )


SHARED_PROMPT_ATTENTION = ("eager", "sdpa")


def shared_prompt_completion_forward(
    model: nn.Module,
    prompt_ids: Tensor,  # [N, P] long, left-padded
    prompt_mask: Tensor,  # [N, P]
    completion_ids: Tensor,  # [N, C] long
    completion_mask: Tensor,  # [N, C]
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = 1024,
    max_logit_elements: int | None = MAX_LOGIT_ELEMENTS,
) -> CompletionOutputs:
    """:func:`completion_forward` with the prompt computed once per distinct prompt.

    In GRPO / PPO every prompt is sampled G times, so G rows of a batch carry the same prompt.
    Rows whose real prompt tokens (and padding) agree are found with ``torch.unique`` (rows need
    not be adjacent nor form complete groups); U = the number of distinct prompts.

    1. Prompt pass on [U, P] with a KV cache and ``logits_to_keep=1``: the last prompt position
       (P-1, the same for every row under left padding) predicts completion token 0, and every
       layer's keys/values [U, KVH, P, D] are recorded.
    2. Completion pass on the first C-1 completion tokens of all N rows: each layer attends to
       ``index_select(prefix, 0, inverse)`` [N, KVH, P, D] followed by its own keys/values, under
       the full [N, P+C-1] mask with positions ``position_ids_from_mask`` of that mask (so they
       continue the prompt's). Its C-1 positions P..P+C-2 predict tokens 1..C-1; the last
       completion token is never fed, as completion_forward drops its prediction anyway.
    3. Token 0's logits (and value) are ``index_select``-ed from U to N rows and put in front.

    Returns the same :class:`CompletionOutputs` (logp / entropy / values, each [N, C] float32)
    as ``completion_forward(model, cat(prompt_ids, completion_ids), cat(prompt_mask,
    completion_mask), C, ...)`` up to float rounding, and the same gradients: the only new
    operation between the shared prefix and the N rows is ``index_select``, whose backward sums
    the G rows' gradients into their prompt's row, exactly what the G identical prompt copies of
    the full forward contribute to the parameters. Log-probs reuse :func:`token_logprobs` on
    [N, 1, V] and [N, C-1, V] separately, so no [N, C, V] copy of the logits is made. Where
    N * (C-1) * V exceeds ``max_logit_elements``, the completion pass takes
    :func:`completion_forward`'s chunked LM head (same rule); the prompt pass always keeps its
    one position's logits.

    ``model`` is the outermost wrapper (DDP / accelerate / DeepSpeed / peft hooks run on both
    calls) around a transformers model that passes ``cache=`` down to its attention layers:
    a causal LM, a :class:`PolicyWithValueHead` or a :class:`Critic`. Checks, each a
    ValueError: the attention implementation is one of ``SHARED_PROMPT_ATTENTION`` (the ones
    checked against the full forward); no prompt-learning peft adapter (it
    owns the cache); gradient checkpointing, if active, is non-reentrant; and the model did
    write and read the cache on every layer.

    NOTE: gradient checkpointing replays a layer's forward in backward, and transformers drops
    ``cache`` under checkpointing unless the layer's ``_can_checkpoint_with_cache`` is set. It
    is set on the model's layers for the duration of the call only (restored on exit, also on
    error; other threads using the same model meanwhile would see it), which is sound because
    both caches used here are idempotent: the prompt cache keeps the first keys/values it is
    given and returns its input unchanged, and the prefix cache returns ``cat(prefix, new)``
    without storing anything, so a replay computes the same tensors and nothing is appended
    twice.
    """
    _check_shared_prompt_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    _check_shared_prompt_model(model)
    prompt_len = prompt_ids.shape[1]
    completion_len = completion_ids.shape[1]

    # Padding ids never reach a real position (padded keys are masked out), so rows are keyed on
    # their real tokens only; -1 (never a token id) marks padding so masks are compared too.
    key = prompt_ids.masked_fill(prompt_mask == 0, -1)  # [N, P]
    unique_keys, inverse = torch.unique(key, dim=0, return_inverse=True)  # [U, P], [N]
    num_unique = unique_keys.shape[0]
    # The distinct prompts are the keys themselves; any id fills their (masked) padding.
    unique_mask = (unique_keys >= 0).to(prompt_mask.dtype)  # [U, P]
    unique_ids = unique_keys.clamp(min=0)  # [U, P]

    recorder = Cache(layer_class_to_replicate=_RecordingLayer)
    with _cache_survives_checkpointing(model):
        head = model(
            input_ids=unique_ids,
            attention_mask=unique_mask,
            position_ids=position_ids_from_mask(unique_mask),
            logits_to_keep=1,
            cache=recorder,
            use_cache=False,
        )
        prefix = _prefix_cache(model, recorder, inverse, num_unique, prompt_len)
        tail = None
        if completion_len > 1:
            mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)  # [N, P+C-1]
            tail_inputs = dict(
                input_ids=completion_ids[:, :-1],
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask)[:, prompt_len:],
                cache=prefix,
                use_cache=False,
            )
            tail = _kept_positions_forward(  # each [N, C-1]
                model,
                tail_inputs,
                completion_len - 1,
                completion_ids[:, 1:],
                temperature=temperature,
                compute_entropy=compute_entropy,
                chunk_size=chunk_size,
                max_logit_elements=max_logit_elements,
            )
            if not all(layer.reads for layer in prefix.layers):
                raise ValueError(
                    f"{type(model).__name__}: the completion pass did not read the prompt's "
                    "keys/values from `cache` in every layer"
                )

    logp = entropy = values = None
    if head.logits is not None:
        logp, entropy = token_logprobs(
            head.logits[:, -1:].index_select(0, inverse),
            completion_ids[:, :1],
            temperature=temperature,
            compute_entropy=compute_entropy,
            chunk_size=chunk_size,
        )
        if tail is not None:
            logp = torch.cat([logp, tail.logp], dim=1)
            if compute_entropy:
                entropy = torch.cat([entropy, tail.entropy], dim=1)
    if isinstance(head, ValueModelOutput) and head.values is not None:
        values = head.values[:, -1:].float().index_select(0, inverse)  # [N, 1]
        if tail is not None:
            values = torch.cat([values, tail.values], dim=1)
    return CompletionOutputs(logp=logp, entropy=entropy, values=values)


class _RecordingLayer(CacheLayerMixin):
    """Prompt-pass cache layer: keeps the first keys/values [U, KVH, P, D] it is given and
    returns its input unchanged, so it looks empty to the mask builder and a checkpoint replay
    neither appends nor replaces anything."""

    is_sliding = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.keys, self.values = key_states, value_states
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class _SharedPrefixLayer(CacheLayerMixin):
    """Completion-pass cache layer, read-only: ``update`` returns the prompt's keys/values
    spread to the N rows (``index_select(0, inverse)``) followed by the new ones, and stores
    nothing. Spreading inside ``update`` keeps only the [U] prefix alive between the passes;
    the [N] copy is rebuilt when a checkpointed layer is replayed."""

    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, inverse: Tensor):  # [U, KVH, P, D] x2, [N]
        super().__init__()
        self.keys, self.values, self.inverse = keys, values, inverse
        self.is_initialized = True
        self.reads = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("a shared-prefix cache layer is created initialised")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        self.reads += 1
        keys = torch.cat([self.keys.index_select(0, self.inverse), key_states], dim=-2)
        values = torch.cat([self.values.index_select(0, self.inverse), value_states], dim=-2)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1


def _prefix_cache(
    model: nn.Module, recorder: Cache, inverse: Tensor, num_unique: int, prompt_len: int
) -> Cache:
    """The read-only completion-pass cache built from what the prompt pass recorded."""
    layers = recorder.layers
    if not layers or not all(layer.is_initialized for layer in layers):
        raise ValueError(
            f"{type(model).__name__}: the prompt pass did not write keys/values into `cache` in "
            "every layer (the model does not take `cache=`, or drops it, e.g. under gradient "
            "checkpointing)"
        )
    expected = (num_unique, prompt_len)
    for layer in layers:
        if (layer.keys.shape[0], layer.keys.shape[-2]) != expected:
            raise ValueError(
                f"{type(model).__name__}: cached keys of shape {tuple(layer.keys.shape)} do not "
                f"hold {num_unique} prompts of {prompt_len} positions"
            )
    return Cache(layers=[_SharedPrefixLayer(lay.keys, lay.values, inverse) for lay in layers])


@contextlib.contextmanager
def _cache_survives_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let checkpointed layers keep ``cache=`` for the duration (both caches are idempotent)."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    missing = object()
    saved = [layer.__dict__.get("_can_checkpoint_with_cache", missing) for layer in layers]
    try:
        for layer in layers:
            layer._can_checkpoint_with_cache = True
        yield
    finally:
        for layer, value in zip(layers, saved):
            if value is missing:
                del layer._can_checkpoint_with_cache
            else:
                layer._can_checkpoint_with_cache = value


def _check_shared_prompt_inputs(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor
) -> None:
    tensors = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
    }
    for name, tensor in tensors.items():
        if tensor.dim() != 2 or tensor.shape[1] == 0:
            raise ValueError(f"{name}: expected a [N, length>0] tensor, got {tuple(tensor.shape)}")
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask: shape {tuple(prompt_mask.shape)} != prompt_ids'")
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(f"completion_mask: shape {tuple(completion_mask.shape)} != ids'")
    if completion_ids.shape[0] != prompt_ids.shape[0]:
        raise ValueError(
            f"completion_ids: {completion_ids.shape[0]} rows != prompt_ids' {prompt_ids.shape[0]}"
        )


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation of the first transformers model inside ``model`` (under
    any wrappers); None when it holds none."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return None if inner is None else inner.config._attn_implementation


def _check_shared_prompt_model(model: nn.Module) -> None:
    """ValueError unless the model's cache, masks and checkpointing suit the shared prefix."""
    attn = attention_implementation(model)
    if attn is None:
        raise ValueError(f"{type(model).__name__}: holds no transformers PreTrainedModel")
    if attn not in SHARED_PROMPT_ATTENTION:
        raise ValueError(
            f"{type(model).__name__}: attention implementation {attn!r} is not supported by the "
            f"shared-prompt forward (one of {SHARED_PROMPT_ATTENTION}); use completion_forward"
        )
    for module in model.modules():
        peft_config = getattr(module, "active_peft_config", None)
        if getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(
                f"{type(model).__name__}: a prompt-learning peft adapter uses the KV cache itself; "
                "use completion_forward"
            )
        checkpointing = (
            isinstance(module, GradientCheckpointingLayer)
            and module.gradient_checkpointing
            and module.training
            and torch.is_grad_enabled()
        )
        if checkpointing and not _is_non_reentrant(module._gradient_checkpointing_func):
            raise ValueError(
                f"{type(model).__name__}: gradient checkpointing of {type(module).__name__} must be "
                "non-reentrant (use_reentrant=False): a reentrant checkpoint runs the layer without "
                "autograd, so the prompt's cached keys/values would carry no gradient"
            )


def _is_non_reentrant(checkpoint_fn) -> bool:
    # transformers wraps torch's checkpoint in functools.partial(..., use_reentrant=...); torch's
    # own default for a missing use_reentrant is the reentrant variant.
    return (
        isinstance(checkpoint_fn, functools.partial)
        and checkpoint_fn.keywords.get("use_reentrant", True) is False
    )
