"""Models: loading them, the value models, and the training forwards that score completions.

Which file owns what (every name below is importable from ``grpo_lab.models`` itself):

- :mod:`~grpo_lab.models.loading`: model names to loaded models. Dtypes, tokenizers
  (left padding), :func:`load_causal_lm` (policy), :func:`load_reference` (frozen),
  :func:`random_init_causal_lm`, :func:`apply_lora` (peft), gradient checkpointing. Names
  resolve through :func:`grpo_lab.hub.resolve_model_path`.
- :mod:`~grpo_lab.models.value`: :class:`ValueHead`, :class:`PolicyWithValueHead` (value head
  on the policy's trunk), :class:`Critic` (separate trunk, values only), :func:`load_critic`,
  and the ``value_head.safetensors`` file they save beside their trunk.
- :mod:`~grpo_lab.models.forward`: :func:`completion_forward`, one model call over prompt +
  completion reduced to per-completion-token :class:`CompletionOutputs` (log-prob, entropy,
  value); the alignment and position-id conventions.
- :mod:`~grpo_lab.models.shared_prompt`: :func:`shared_prompt_completion_forward`, the same
  outputs with each distinct prompt computed once and its G completions read its KV cache.
- :mod:`~grpo_lab.models.chunked_head`: applying the LM head to the last hidden state a chunk
  of positions at a time when the full logits would be too large, and the rule deciding when
  that is exact.
- :mod:`~grpo_lab.models.logprobs`: :func:`token_logprobs`, float32 log-probs and entropy
  (:func:`grpo_lab.algos.entropy_from_logprobs`) from logits, chunk by chunk.

Imports run one way, each file using only those before it: loading, value, logprobs,
chunked_head, forward, shared_prompt.
"""

from grpo_lab.hub import resolve_model_path
from grpo_lab.models.chunked_head import _HEAD_CHECKS as _HEAD_CHECKS  # tests read it
from grpo_lab.models.chunked_head import LOGIT_TRANSFORM_FIELDS, MAX_LOGIT_ELEMENTS
from grpo_lab.models.forward import CompletionOutputs, completion_forward, position_ids_from_mask
from grpo_lab.models.loading import (
    DTYPES,
    apply_lora,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_reference,
    load_tokenizer,
    random_init_causal_lm,
    resolve_dtype,
)
from grpo_lab.models.logprobs import token_logprobs
from grpo_lab.models.shared_prompt import (
    SHARED_PROMPT_ATTENTION,
    attention_implementation,
    shared_prompt_completion_forward,
)
from grpo_lab.models.shared_prompt import _is_non_reentrant as _is_non_reentrant  # tests use it
from grpo_lab.models.value import (
    VALUE_HEAD_FILE,
    Critic,
    PolicyWithValueHead,
    ValueHead,
    ValueModelOutput,
    load_critic,
)

__all__ = [
    "DTYPES",
    "LOGIT_TRANSFORM_FIELDS",
    "MAX_LOGIT_ELEMENTS",
    "SHARED_PROMPT_ATTENTION",
    "VALUE_HEAD_FILE",
    "CompletionOutputs",
    "Critic",
    "PolicyWithValueHead",
    "ValueHead",
    "ValueModelOutput",
    "apply_lora",
    "attention_implementation",
    "completion_forward",
    "enable_gradient_checkpointing",
    "load_causal_lm",
    "load_critic",
    "load_reference",
    "load_tokenizer",
    "position_ids_from_mask",
    "random_init_causal_lm",
    "resolve_dtype",
    "resolve_model_path",
    "shared_prompt_completion_forward",
    "token_logprobs",
]
