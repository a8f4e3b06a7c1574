"""The ``"hf"`` engine: rollouts with transformers ``generate`` (dynamic KV cache).

Each prompt is repeated G times before ``generate``, so its prefill runs G times; use it as
the reference the other engines are tested against, or for models whose forward grpo_lab's own
engines do not support. It takes only the ``"multinomial"`` sampler (``generate``'s own) and
cannot read a value head during the rollout.

Owns: :class:`HFGenerateBackend`, the logits processor that records ``sampling_logp`` without
keeping [N, C, V] logits, and the ``GenerationConfig`` that switches off every setting the
model's own ``generation_config`` could bring in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from grpo_lab.rollout.base import ChunkedBackend, finish_chunk
from grpo_lab.rollout.batch import RolloutBatch, left_pad
from grpo_lab.rollout.sampling import Decoding


class HFGenerateBackend(ChunkedBackend):
    """Rollouts with transformers ``generate`` (dynamic KV cache, one chunk at a time).

    Each prompt is repeated G times before ``generate``, so its prefill runs G times.
    """

    def generate_chunk(
        self, lm: nn.Module, prompt_tokens: list[list[int]], decoding: Decoding
    ) -> RolloutBatch:
        d = decoding
        device = next(lm.parameters()).device
        ids, mask = left_pad(prompt_tokens, d.pad_id)  # [b, P]
        ids = ids.repeat_interleave(d.group_size, dim=0).to(device)  # [n, P], prompt-major
        mask = mask.repeat_interleave(d.group_size, dim=0).to(device)
        recorder = _SampledLogProbRecorder(d.logp_temperature)
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=_generation_config(d),
            logits_processor=LogitsProcessorList([recorder]),
            # The parameters are gathered for the whole rollout (ZeRO-3 hooks paused): a rank
            # stops when its own rows finish, with no per-token all-reduce to wait for the others.
            synced_gpus=False,
        )
        completion = out.sequences[:, ids.shape[1] :]  # [n, C]
        return finish_chunk(ids, mask, completion, recorder.finish(completion), d)


class _SampledLogProbRecorder(LogitsProcessor):
    """Records log-softmax(logits / T) of each sampled token without keeping [N, C, V] logits.

    transformers calls custom processors with the raw logits of step t after the built-in
    processors (only the EOS suppression of ``min_new_tokens``, given the config we pass) and
    before the temperature / top-k / top-p warpers. At that call ``input_ids`` ends with the
    token sampled at step t-1, so the previous step's distribution can be gathered and dropped;
    only one [N, V] float32 tensor is held at a time (``output_logits=True`` would keep C of them).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.step_logp: list[Tensor] = []  # each [N]
        self._pending: Tensor | None = None  # [N, V]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self._pending is not None:
            self.step_logp.append(self._gather(input_ids[:, -1]))
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _gather(self, tokens: Tensor) -> Tensor:  # tokens [N] -> [N]
        return self._pending.gather(1, tokens[:, None]).squeeze(1)

    def finish(self, completion_ids: Tensor) -> Tensor:  # [N, C] -> [N, C] float32
        # NOTE: transformers may run a step past the stop and then undo it, so more steps than
        # kept tokens can have been recorded; the first C are the kept ones.
        c = completion_ids.shape[1]
        logp = self.step_logp[:c]
        if len(logp) < c:
            logp.append(self._gather(completion_ids[:, len(logp)]))
        if len(logp) != c:
            raise RuntimeError(f"recorded {len(logp)} sampling steps for {c} completion tokens")
        return torch.stack(logp, dim=1)


def _generation_config(d: Decoding) -> GenerationConfig:
    # NOTE: transformers fills every None field from the model's generation_config and then from
    # global defaults (top_k=50), so "off" must be spelled out: top_k=0, top_p=1.0, penalties 1.0.
    sample = d.temperature > 0
    return GenerationConfig(
        max_new_tokens=d.max_new_tokens,
        min_new_tokens=d.max_new_tokens if d.ignore_eos else None,
        do_sample=sample,
        temperature=d.temperature if sample else 1.0,
        top_p=d.top_p if sample else 1.0,
        top_k=(d.top_k or 0) if sample else None,  # greedy never applies top-k
        typical_p=1.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=None if d.ignore_eos else 0,  # min_new_tokens overrides it
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=list(d.eos_ids) or None,
        pad_token_id=d.pad_id,
        use_cache=True,
        return_dict_in_generate=True,
    )
