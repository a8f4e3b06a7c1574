"""Loading models and tokenizers: names to folders, dtypes, the policy, the frozen reference, LoRA.

Every loader takes a model name as users write it (``model.name_or_path``: a hub name, a local
folder, or ``builtin:tiny-arith``) and resolves it with :func:`grpo_lab.hub.resolve_model_path`,
so a name that cannot be loaded is one line naming it (:class:`grpo_lab.errors.ModelSourceError`),
never a traceback from the hub libraries. Loaded models are set up for training
(``config.use_cache = False``; gradient checkpointing on request). The value models (the policy
with a value head, the separate critic) load through :mod:`grpo_lab.models.value`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from grpo_lab.hub import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """Map a dtype name to torch; an unknown name raises listing the valid ones."""
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


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
    return _load_pretrained(
        AutoModelForCausalLM,
        name_or_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        gradient_checkpointing=gradient_checkpointing,
        trust_remote_code=trust_remote_code,
    )


def _load_pretrained(
    auto_class: type,
    name_or_path: str,
    *,
    dtype: str,
    attn_implementation: str | None,
    gradient_checkpointing: bool,
    trust_remote_code: bool,
    key: str = "model.name_or_path",
) -> PreTrainedModel:
    """``auto_class.from_pretrained`` (``AutoModelForCausalLM`` for a policy, ``AutoModel`` for
    a critic's trunk) of a resolved model name, set up for training; a model that cannot be
    loaded is one line naming it and the config ``key`` it came from."""
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name_or_path)
    with _loading(name_or_path, key):
        model = auto_class.from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    return _prepare_for_training(model, gradient_checkpointing)


@contextlib.contextmanager
def _loading(name_or_path: str, key: str = "model.name_or_path") -> Iterator[None]:
    """A model or tokenizer that cannot be loaded (bad config.json, truncated weights, missing
    files, remote code not allowed) as one line naming it."""
    from grpo_lab.errors import ModelSourceError, UserError, one_line

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(
            f"cannot load {name_or_path!r} ({key}): {type(e).__name__}: {one_line(str(e))[:300]}"
        ) from e
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelSourceError(
            f"cannot load {name_or_path!r} ({key}): its weights are unreadable "
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
