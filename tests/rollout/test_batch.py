"""Tests for grpo_lab.rollout.batch: the RolloutBatch record (select, to, pad_completions),
masks through the first EOS, and decoding completions to text."""

import pytest
import torch

from grpo_lab.rollout import RolloutBatch, completion_masks, decode_completions, generate
from tests.rollout.mocks import IDS_TOKENIZER, PAD, chain_model, char_tokenizer


def test_decode_keeps_truncated_tail():
    tokenizer = char_tokenizer()
    batch = RolloutBatch(
        prompt_ids=torch.tensor([[2], [2]]),
        prompt_mask=torch.ones(2, 1, dtype=torch.long),
        completion_ids=torch.tensor([[3, 4, 5], [3, 1, 0]]),
        completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
        sampling_logp=torch.zeros(2, 3),
        truncated=torch.tensor([True, False]),
        group_size=2,
    )
    assert decode_completions(tokenizer, batch) == ["bcd", "b"]


def test_completion_masks_match_a_loop():
    ids = torch.tensor([[3, 7, 4, 7], [7, 2, 2, 2], [1, 2, 3, 4], [5, 6, 5, 9]])
    eos = [7, 9]
    out_ids, mask, truncated = completion_masks(ids, eos, pad_id=0)
    for row in range(ids.shape[0]):
        seen = False
        for t in range(ids.shape[1]):
            assert mask[row, t] == int(not seen)
            assert out_ids[row, t] == (0 if seen else ids[row, t])
            seen = seen or int(ids[row, t]) in eos
        assert bool(truncated[row]) == (not seen)


def test_select_and_to():
    batch = generate(chain_model(), IDS_TOKENIZER, [[1], [4], [6]], group_size=2, max_new_tokens=8)
    sub = batch.select(slice(2, 4))
    assert sub.group_size == 2 and sub.num_sequences == 2
    assert torch.equal(sub.completion_ids, batch.completion_ids[2:4])
    picked = batch.select(torch.tensor([5, 0]))
    assert torch.equal(picked.prompt_ids, batch.prompt_ids[[5, 0]])
    assert torch.equal(picked.truncated, batch.truncated[[5, 0]])
    moved = batch.to("cpu")
    assert torch.equal(moved.sampling_logp, batch.sampling_logp)


def test_pad_completions_adds_masked_pad_columns():
    torch.manual_seed(0)
    batch = generate(chain_model(), IDS_TOKENIZER, [[1, 2], [4]], group_size=2, max_new_tokens=8)
    padded = batch.pad_completions(batch.completion_len + 3, PAD)
    assert padded.completion_len == batch.completion_len + 3
    assert torch.equal(padded.completion_ids[:, : batch.completion_len], batch.completion_ids)
    assert (padded.completion_ids[:, batch.completion_len :] == PAD).all()
    assert torch.equal(padded.completion_lengths, batch.completion_lengths)
    assert torch.equal(padded.sampling_logp[:, : batch.completion_len], batch.sampling_logp)
    assert (padded.sampling_logp[:, batch.completion_len :] == 0).all()
    assert torch.equal(padded.truncated, batch.truncated)
    assert batch.pad_completions(batch.completion_len, PAD) is batch
    with pytest.raises(ValueError, match="shorter than the completions"):
        batch.pad_completions(batch.completion_len - 1, PAD)
