"""Tests for grpo_lab.rollout.static: the static-cache engine samples what ``generate`` samples,
its decode steps keep one shape, its cache layer writes at a cursor, and the compiled step
matches across calls."""

import pytest
import torch

from grpo_lab.rollout import generate
from grpo_lab.rollout.static import StaticCacheBackend, StaticSlotLayer
from tests.rollout.mocks import (
    IDS_TOKENIZER,
    LIVELY,
    RAGGED_PROMPTS,
    assert_same_rollout,
    both_backends,
    tiny_qwen,
)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(LIVELY))
def test_static_cache_samples_what_generate_samples(arch, attn):
    """Real attention over a static buffer (masked empty slots, a 4D mask per implementation):
    the same seed gives the same sampled tokens as generate, log-probs to float tolerance."""
    make_model, eos = LIVELY[arch]
    model = make_model(initializer_range=0.5)
    model.config._attn_implementation = attn
    hf, fast = both_backends(
        model, RAGGED_PROMPTS, "static", group_size=3, max_new_tokens=10, eos_token_id=eos
    )
    assert_same_rollout(hf, fast)
    assert fast.truncated.any() and not fast.truncated.all()


def test_static_cache_decode_steps_have_one_shape():
    """After the prefill, every decode step sees the same input shapes: ids [n, 1], a 4D mask
    over the whole rounded-up buffer, and cache layers of that length."""
    model = tiny_qwen(initializer_range=0.5)
    shapes = []

    def record(module, args, kwargs):
        mask, cache = kwargs["attention_mask"], kwargs["cache"]
        keys = cache.layers[0].keys.shape if cache.layers[0].is_initialized else None
        shapes.append((tuple(kwargs["input_ids"].shape), tuple(mask.shape), mask.dtype, keys))

    model.register_forward_pre_hook(record, with_kwargs=True)
    generate(
        model,
        IDS_TOKENIZER,
        RAGGED_PROMPTS,
        group_size=3,
        max_new_tokens=10,
        eos_token_id=2,
        ignore_eos=True,
        backend=StaticCacheBackend(capacity_multiple=8),
    )
    # prefill: 4 prompts of P=5 with a 2D mask; then 9 steps over 16 = ceil((5+10)/8)*8 slots
    assert shapes[0][:2] == ((4, 5), (4, 5))
    step = ((12, 1), (12, 1, 1, 16), torch.bool, (12, 2, 16, 8))
    assert shapes[1:] == [step] * 9


def test_static_cache_rejects_other_attention_implementations():
    model = tiny_qwen()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"'sdpa' and 'eager'.*'flash_attention_2'"):
        generate(model, IDS_TOKENIZER, [[3, 4]], group_size=2, max_new_tokens=3, backend="static")


def test_static_slot_layer_writes_at_its_cursor():
    layer = StaticSlotLayer(2, 5, ((1, 3), (1, 3), torch.float32), "cpu")
    prefix = torch.arange(6.0).reshape(1, 1, 2, 3)  # b=1 row, 2 positions
    layer.load_prefix(prefix, -prefix, repeats=2)
    keys, values = layer.update(torch.full((2, 1, 1, 3), 9.0), torch.full((2, 1, 1, 3), -9.0))
    assert keys.shape == (2, 1, 5, 3) and int(layer.cursor) == 3
    expected = torch.zeros(2, 1, 5, 3)
    expected[:, :, :2] = prefix  # both rows got the prompt's keys
    expected[:, :, 2] = 9.0
    assert torch.equal(keys, expected) and torch.equal(values, -expected)
    assert layer.get_mask_sizes(1) == (5, 0)


@pytest.mark.slow
def test_compiled_static_step_matches_generate_across_calls():
    """torch.compile (inductor on CPU; CUDA graphs on a GPU) must not change the rollout; the
    kept cache buffers are reused by a second call with other prompts without stale state."""
    model = tiny_qwen(initializer_range=0.5)
    compiled = StaticCacheBackend(compile=True, capacity_multiple=16)
    caches = []
    # Prompts of 5 and then 4 positions: both fit one 16-slot buffer (5 + 10, 4 + 10 <= 16).
    for prompts in (RAGGED_PROMPTS, [[5, 6, 7, 8], [9], [3, 3, 3], [4, 4]]):
        hf, fast = both_backends(
            model, prompts, compiled, group_size=3, max_new_tokens=10, eos_token_id=2
        )
        assert_same_rollout(hf, fast)
        caches.append(compiled._kept[1])
    assert caches[0] is caches[1]  # the same buffers, stale from the first call
