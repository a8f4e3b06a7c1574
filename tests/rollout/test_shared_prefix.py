"""Tests for grpo_lab.rollout.shared_prefix: one prefill per prompt, finished rows leaving the
decode batch, the preallocated KV cache layer, and token-for-token agreement with transformers
``generate`` (greedy on real models, with LoRA)."""

import pytest
import torch

from grpo_lab.models import completion_forward
from grpo_lab.rollout import generate
from grpo_lab.rollout.shared_prefix import PreallocatedLayer, SharedPrefixBackend
from tests.rollout.mocks import (
    EOS,
    IDS_TOKENIZER,
    LIVELY,
    PAD,
    RAGGED_PROMPTS,
    assert_same_rollout,
    both_backends,
    chain_model,
    tiny_qwen,
)


@pytest.mark.parametrize("fast", ["shared_prefix", "static"])
@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("batch_size", [None, 6])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_greedy_fast_engines_match_generate(arch, batch_size, ignore_eos, fast):
    make_model, eos = LIVELY[arch]
    hf, fast = both_backends(
        make_model(initializer_range=0.5),
        RAGGED_PROMPTS,
        fast,
        group_size=3,
        max_new_tokens=10,
        temperature=0.0,
        eos_token_id=eos,
        ignore_eos=ignore_eos,
        batch_size=batch_size,  # 6 sequences = 2 prompts per chunk: chunks of whole groups
    )
    assert_same_rollout(hf, fast)
    if ignore_eos:
        assert fast.completion_len == 10 and not (fast.completion_ids == eos).any()
    else:
        assert fast.truncated.any() and not fast.truncated.all()
        assert fast.completion_lengths.min() < 10


# Chain model, prompts [1, 2], [4], [6] x G=4 (rows 0-3, 4-7, 8-11): completions of 5, 3 and 1
# tokens. Alive after steps 0..4: 8, 8, 4, 4, 0 rows. With compact_below=0.75 the 4 finished
# rows go after step 0 (8 <= 0.75 * 12) and 4 more after step 2 (4 <= 0.75 * 8); with 0.5 only
# after step 2 (4 <= 0.5 * 12); with 0 never.
DECODE_SHAPES = {
    0.0: [(12, 1)] * 4,
    0.5: [(12, 1), (12, 1), (4, 1), (4, 1)],
    0.75: [(8, 1), (8, 1), (4, 1), (4, 1)],
}


@pytest.mark.parametrize("compact_below", sorted(DECODE_SHAPES))
def test_prompt_is_prefilled_once_and_finished_rows_leave(compact_below):
    """The shared-prefix backend's first forward holds the b distinct prompts, then one forward
    per step of the rows still decoding; it stops once every row has emitted EOS. Dropping
    finished rows does not change any token."""
    model = chain_model()
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    batch = generate(
        model,
        IDS_TOKENIZER,
        [[1, 2], [4], [6]],
        group_size=4,
        max_new_tokens=8,
        backend=SharedPrefixBackend(compact_below=compact_below),
    )
    assert calls == [(3, 2)] + DECODE_SHAPES[compact_below]
    assert batch.completion_ids.tolist() == (
        [[3, 4, 5, 6, EOS]] * 4 + [[5, 6, EOS, PAD, PAD]] * 4 + [[EOS, PAD, PAD, PAD, PAD]] * 4
    )


@pytest.mark.parametrize("compact_below", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_dropping_finished_rows_keeps_sampled_tokens(arch, compact_below):
    """Real attention over a cache whose rows are dropped mid-way: same seed, same tokens and
    log-probs as generate (which never drops rows)."""
    make_model, eos = LIVELY[arch]
    hf, fast = both_backends(
        make_model(initializer_range=0.5),
        RAGGED_PROMPTS * 2,
        SharedPrefixBackend(compact_below=compact_below),
        group_size=3,
        max_new_tokens=10,
        eos_token_id=eos,
    )
    assert_same_rollout(hf, fast)
    assert fast.truncated.any() and not fast.truncated.all()


def test_shared_prefix_with_peft_lora():
    from grpo_lab.models import apply_lora

    model = apply_lora(
        tiny_qwen(initializer_range=0.5),
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
    )
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it matter
            param.data.normal_(std=0.5)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(model(input_ids=ids).logits, base_logits)

    hf, fast = both_backends(
        model, RAGGED_PROMPTS, group_size=2, max_new_tokens=8, temperature=0.0, eos_token_id=2
    )
    assert_same_rollout(hf, fast)
    torch.manual_seed(0)
    sampled = generate(
        model,
        IDS_TOKENIZER,
        RAGGED_PROMPTS,
        group_size=3,
        max_new_tokens=8,
        eos_token_id=2,
        backend="shared_prefix",
    )
    with torch.no_grad():
        out = completion_forward(
            model, sampled.input_ids, sampled.attention_mask, sampled.completion_len
        )
    torch.testing.assert_close(out.logp * sampled.completion_mask, sampled.sampling_logp)


def test_preallocated_layer_matches_dynamic_layer():
    """Prefill 2 rows of 3 positions, repeat each row 3 times, then 4 one-token steps: the
    preallocated layer must expose exactly the keys/values that concatenation builds."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    dynamic, preallocated = DynamicLayer(), PreallocatedLayer(capacity=7)
    updates = [torch.randn(2, 2, 3, 4)] + [torch.randn(6, 2, 1, 4) for _ in range(4)]
    for step, keys in enumerate(updates):
        expected = dynamic.update(keys, -keys)
        got = preallocated.update(keys, -keys)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        assert preallocated.get_seq_length() == dynamic.get_seq_length()
        if step == 0:
            dynamic.batch_repeat_interleave(3)
            preallocated.batch_repeat_interleave(3)
            assert torch.equal(preallocated.keys, dynamic.keys)
    assert preallocated.get_seq_length() == 7
    with pytest.raises(RuntimeError, match="7 positions cannot hold 8"):
        preallocated.update(updates[-1], updates[-1])
