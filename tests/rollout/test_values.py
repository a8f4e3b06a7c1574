"""Tests for values read during the rollout (generate's ``value_head``,
grpo_lab.rollout.base.ValueReadout): equal to a full forward, refused by engines that cannot
read them, gathered with the model under ZeRO-3."""

import pytest
import torch

from grpo_lab.models import PolicyWithValueHead, completion_forward
from grpo_lab.rollout import generate, reads_values
from grpo_lab.rollout.shared_prefix import SharedPrefixBackend
from grpo_lab.rollout.static import StaticCacheBackend
from tests.rollout.mocks import (
    IDS_TOKENIZER,
    LIVELY,
    PAD,
    RAGGED_PROMPTS,
    assert_same_rollout,
    fake_deepspeed,
    tiny_qwen,
)


@pytest.mark.parametrize(
    "engine",
    [
        "shared_prefix",
        pytest.param(SharedPrefixBackend(compact_below=1.0), id="shared_prefix-compact"),
        "static",
    ],
)
@pytest.mark.parametrize("batch_size", [None, 6])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_rollout_values_equal_a_full_forward(arch, batch_size, engine):
    """The value head read off the sampling forwards (prefill, then one cached forward per token,
    rows dropped mid-way) gives, at every completion token, what one full no-grad forward of
    the policy gives: fp32, tight tolerance. The tokens are those of a rollout without it."""
    make_model, eos = LIVELY[arch]
    policy = PolicyWithValueHead(make_model(initializer_range=0.5))
    kwargs = dict(group_size=3, max_new_tokens=10, eos_token_id=eos, batch_size=batch_size)
    torch.manual_seed(0)
    plain = generate(policy, IDS_TOKENIZER, RAGGED_PROMPTS, backend=engine, **kwargs)
    torch.manual_seed(0)
    batch = generate(
        policy, IDS_TOKENIZER, RAGGED_PROMPTS, backend=engine, value_head=policy.v_head, **kwargs
    )
    assert plain.values is None
    assert_same_rollout(plain, batch)
    assert batch.truncated.any() and not batch.truncated.all()
    with torch.no_grad():
        full = completion_forward(
            policy, batch.input_ids, batch.attention_mask, batch.completion_len
        ).values
    assert batch.values.dtype == torch.float32 and batch.values.shape == full.shape
    assert batch.values.abs().sum() > 0
    # torch's fp32 defaults (rtol 1.3e-6, atol 1e-5), as for the sampling log-probs above
    torch.testing.assert_close(batch.values, full * batch.completion_mask)
    # Padding the completions (several ranks) pads the values with zeros.
    padded = batch.pad_completions(batch.completion_len + 2, PAD)
    assert torch.equal(padded.values[:, : batch.completion_len], batch.values)
    assert not padded.values[:, batch.completion_len :].any()


@pytest.mark.parametrize("engine", ["hf", StaticCacheBackend(compile=True)])
def test_engines_without_a_value_readout_refuse_a_value_head(engine):
    policy = PolicyWithValueHead(tiny_qwen())
    assert not reads_values(engine)
    with pytest.raises(ValueError, match="value_head"):
        generate(
            policy, IDS_TOKENIZER, [[3]], group_size=2, max_new_tokens=2, eos_token_id=1,
            backend=engine, value_head=policy.v_head,
        )  # fmt: skip
    assert reads_values("shared_prefix") and reads_values("static")


def test_zero3_value_head_joins_the_one_rollout_gather(monkeypatch):
    """Under ZeRO-3 the head read during the rollout is gathered with the model, in the same
    single collective: nothing is gathered per decode step."""
    policy = PolicyWithValueHead(tiny_qwen())
    for param in policy.parameters():
        param.ds_id, param.ds_status = 0, "NOT_AVAILABLE"
    with fake_deepspeed(monkeypatch) as calls:
        generate(
            policy, IDS_TOKENIZER, [[3], [4], [5]], group_size=2, max_new_tokens=6,
            eos_token_id=1, batch_size=2, backend="shared_prefix", value_head=policy.v_head,
        )  # fmt: skip
    assert len(calls) == 1
    assert calls[0] == [*policy.lm.parameters(), *policy.v_head.parameters()]
