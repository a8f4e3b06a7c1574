"""Value models: the value head, the policy with a value head on its trunk, the separate critic.

- :class:`ValueHead`: Linear(H, 1) in float32 on a hidden state.
- :class:`PolicyWithValueHead`: a causal LM whose last hidden state also feeds a value head
  (PPO with a shared trunk); one forward gives logits and values.
- :class:`Critic`: its own trunk (``AutoModel``, no LM head) plus a value head (PPO with a
  separate critic); its forward gives values only.

Both answer ``model(input_ids=, attention_mask=, position_ids=, logits_to_keep=)`` like a causal
LM, returning a :class:`ValueModelOutput`, so :mod:`grpo_lab.models.forward` calls every model
kind the same way. Both save their trunk with ``save_pretrained`` plus ``value_head.safetensors``
and load from a plain causal-LM folder too (the head then starts fresh).

Alignment: ``values[:, t]`` at position P-1+t is V(s_t), the value of the state just before
completion token t is emitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from grpo_lab.hub import resolve_model_path
from grpo_lab.models.loading import (
    _load_pretrained,
    enable_gradient_checkpointing,
    load_causal_lm,
)

VALUE_HEAD_FILE = "value_head.safetensors"


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


class _TrunkWithHead(nn.Module):
    """What :class:`PolicyWithValueHead` and :class:`Critic` share: a transformers trunk plus a
    :class:`ValueHead`, the trunk's config and checkpointing, and saving / loading both.

    A subclass names its trunk's attribute in ``_trunk_name`` (``lm``, ``backbone``: parameter
    names, hence checkpoints, depend on it) and how the trunk loads in ``_load_trunk``.
    """

    _trunk_name: str
    v_head: ValueHead

    @property
    def trunk(self) -> PreTrainedModel:
        return getattr(self, self._trunk_name)

    @property
    def config(self) -> PretrainedConfig:
        return self.trunk.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        enable_gradient_checkpointing(self.trunk, gradient_checkpointing_kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """The trunk via its own ``save_pretrained`` (a peft model writes its adapter) plus
        ``value_head.safetensors``."""
        self.trunk.save_pretrained(path)
        _save_head(self.v_head, path)

    @classmethod
    def _load_trunk(cls, name_or_path: str, **load_kwargs) -> PreTrainedModel:
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> Self:
        """The trunk from any causal-LM folder or one this class saved; the head from
        ``value_head.safetensors`` if present, else freshly initialised (so a plain causal-LM
        checkpoint starts PPO)."""
        trunk = cls._load_trunk(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
        )
        return cls(trunk, _load_head(name_or_path, _hidden_size(trunk.config)))


class PolicyWithValueHead(_TrunkWithHead):
    """A causal LM plus a :class:`ValueHead` on its last hidden state (the shared trunk).

    One forward gives logits and a value per position; a value loss therefore trains the head
    and the trunk. ``lm`` may be peft-wrapped. NOTE: values come from
    ``output_hidden_states=True``, which keeps every layer's output until the forward returns;
    that is free under autograd (those activations are saved anyway) but costs memory in no-grad
    passes.
    """

    _trunk_name = "lm"

    def __init__(self, lm: PreTrainedModel, v_head: ValueHead | None = None):
        super().__init__()
        self.lm = lm
        self.v_head = v_head if v_head is not None else ValueHead(_hidden_size(lm.config))

    @property
    def generation_model(self) -> PreTrainedModel:
        """The module :func:`grpo_lab.rollout.generate` samples from."""
        return self.lm

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

    @classmethod
    def _load_trunk(cls, name_or_path: str, **load_kwargs) -> PreTrainedModel:
        return load_causal_lm(name_or_path, **load_kwargs)


class Critic(_TrunkWithHead):
    """A separate value model: its own transformer trunk plus a :class:`ValueHead`.

    The trunk is the base model without the LM head (``AutoModel``), so an untied LM head is
    neither stored nor left as an unused parameter under DDP; it loads from a causal-LM
    checkpoint such as the policy's. The forward returns values only (``logits`` is None).
    """

    _trunk_name = "backbone"

    def __init__(self, backbone: PreTrainedModel, v_head: ValueHead | None = None):
        super().__init__()
        self.backbone = backbone
        self.v_head = v_head if v_head is not None else ValueHead(_hidden_size(backbone.config))

    def forward(
        self,
        input_ids: Tensor,  # [N, T]
        attention_mask: Tensor | None = None,  # [N, T]
        position_ids: Tensor | None = None,  # [N, T]
        logits_to_keep: int | Tensor = 0,  # int, or [K] long positions
        values_to_keep: int | Tensor | None = None,  # int, or [K] long positions
        **kwargs,
    ) -> ValueModelOutput:
        """Values [N, K] for the positions ``values_to_keep`` selects (an int: the last K, all T
        when 0; a 1-D index tensor: those positions); ``logits`` is always None.

        A critic has no LM head and computes no logits. It takes ``logits_to_keep`` so that the
        forwards can call every model kind alike: without ``values_to_keep`` the values are for
        the positions ``logits_to_keep`` selects, the same rule as :class:`PolicyWithValueHead`.
        """
        keep = logits_to_keep if values_to_keep is None else values_to_keep
        kwargs.setdefault("use_cache", False)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        hidden = _keep_positions(out.last_hidden_state, keep)  # [N, K, H]
        return ValueModelOutput(values=self.v_head(hidden))

    @classmethod
    def _load_trunk(cls, name_or_path: str, **load_kwargs) -> PreTrainedModel:
        return _load_pretrained(
            AutoModel, name_or_path, key="ppo.critic_model or model.name_or_path", **load_kwargs
        )


def load_critic(name_or_path: str, **load_kwargs) -> Critic:
    """:meth:`Critic.from_pretrained` (the same keyword arguments: ``dtype``,
    ``attn_implementation``, ``gradient_checkpointing``, ``trust_remote_code``); pass the
    policy's checkpoint for the usual PPO setup."""
    return Critic.from_pretrained(name_or_path, **load_kwargs)


def _save_head(head: ValueHead, path: str | Path) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(Path(path) / VALUE_HEAD_FILE))


def _load_head(name_or_path: str, hidden_size: int) -> ValueHead:
    head = ValueHead(hidden_size)
    file = Path(resolve_model_path(name_or_path)) / VALUE_HEAD_FILE
    if file.is_file():
        head.load_state_dict(load_file(str(file)))
    return head
