"""Tests for grpo_lab.models.shared_prompt: shared_prompt_completion_forward's outputs and
gradients equal completion_forward's full forward over prompt + completion (tiny random Qwen2 and Llama, sdpa
and eager), for a causal LM, the policy with value head, the critic, LoRA, and under gradient
checkpointing; the prompt pass really runs once per distinct prompt; clear errors."""

import functools

import pytest
import tiny_models
import torch
from tiny_models import assert_same_outputs
from transformers import GPT2Config, GPT2LMHeadModel

from grpo_lab.models import (
    Critic,
    PolicyWithValueHead,
    completion_forward,
    enable_gradient_checkpointing,
    shared_prompt,
    shared_prompt_completion_forward,
)

VOCAB = 24
PAD, EOS = 0, 1
ARCHS = ("qwen2", "llama")
ATTNS = ("sdpa", "eager")


def tiny_lm(arch: str = "qwen2", attn: str = "sdpa", seed: int = 0):
    return tiny_models.tiny_lm(
        arch,
        seed=seed,
        attn=attn,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )


def make_batch(prompts, rows, completion_lens, completion_len, seed=0):
    return tiny_models.split_batch(
        prompts, rows, completion_lens, completion_len, vocab_size=VOCAB, pad_id=PAD,
        eos_id=EOS, seed=seed,
    )  # fmt: skip


PROMPTS = [[5, 6, 7, 8], [9], [10, 11], [12, 13, 14]]
# Duplicates of the same prompt are scattered (not adjacent, groups of different sizes) and
# completions are ragged: some end with EOS and are padded after it.
SHUFFLED = dict(rows=[2, 0, 1, 0, 3, 2, 0, 1], completion_lens=[5, 2, 5, 4, 5, 3, 5, 1])
DISTINCT = dict(rows=[3, 1, 0, 2], completion_lens=[3, 5, 5, 2])


def both(model, batch, **kwargs):
    """(completion_forward on the concatenated batch, shared_prompt_completion_forward)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    full = completion_forward(
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([prompt_mask, completion_mask], dim=1),
        completion_ids.shape[1],
        **kwargs,
    )
    shared = shared_prompt_completion_forward(model, *batch, **kwargs)
    return full, shared


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize(
    "case, temperature",
    [(SHUFFLED, 1.0), (DISTINCT, 1.0), (SHUFFLED, 0.7)],
    ids=["shuffled-duplicates", "all-distinct", "temperature-0.7"],
)
def test_outputs_equal_completion_forward(arch, attn, case, temperature):
    # Every position is compared, including those after EOS: both functions see the same
    # tokens, masks and positions there.
    batch = make_batch(PROMPTS, completion_len=5, **case)
    policy = PolicyWithValueHead(tiny_lm(arch, attn)).eval()
    with torch.no_grad():
        full, shared = both(policy, batch, temperature=temperature, compute_entropy=True)
    assert_same_outputs(full, shared)
    assert shared.logp.shape == (len(case["rows"]), 5)


@pytest.mark.parametrize("completion_len", [1, 2])
def test_short_completions(completion_len):
    """C = 1 needs the prompt pass only; C = 2 feeds a single completion token."""
    batch = make_batch(PROMPTS, SHUFFLED["rows"], [completion_len] * 8, completion_len)
    policy = PolicyWithValueHead(tiny_lm()).eval()
    with torch.no_grad():
        assert_same_outputs(*both(policy, batch, compute_entropy=True))


def test_rows_differing_only_in_padding_ids_share_a_prompt():
    """Token ids under prompt mask 0 never reach a real position, so such rows share one
    prompt pass and still match the full forward, which sees their own padding ids."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(
        PROMPTS, rows=[1, 1, 2, 2], completion_lens=[4, 4, 4, 4], completion_len=4
    )
    prompt_ids[1, :3] = torch.tensor([3, 4, 5])
    prompt_ids[3, 0] = 7
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    lm = tiny_lm()
    rows_seen = record_embedding_rows(lm)
    with torch.no_grad():
        assert_same_outputs(*both(lm, batch, compute_entropy=True))
    # completion_forward: 4 rows of P+C; shared: 2 distinct prompts of P, then 4 rows of C-1.
    assert rows_seen == [(4, 8), (2, 4), (4, 3)]


def record_embedding_rows(lm) -> list[tuple[int, int]]:
    """Shapes of the input_ids every forward of ``lm`` embeds, in call order."""
    shapes = []
    lm.get_input_embeddings().register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape))
    )
    return shapes


def test_prompt_pass_runs_once_per_distinct_prompt():
    batch = make_batch(PROMPTS, completion_len=5, **SHUFFLED)
    lm = tiny_lm()
    rows_seen = record_embedding_rows(lm)
    with torch.no_grad():
        shared_prompt_completion_forward(lm, *batch)
    # SHUFFLED uses 4 distinct prompts (P = 4) over 8 rows; completion pass feeds C-1 = 4.
    assert rows_seen == [(4, 4), (8, 4)]


def wrap(kind: str, lm):
    """The model under test; LoRA adapters get a non-zero B so they change the forward."""
    if kind == "lm":
        return lm
    if kind == "policy":
        return PolicyWithValueHead(lm)
    if kind == "critic":
        return Critic(lm.model)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        lm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return PolicyWithValueHead(lora) if kind == "lora-policy" else lora


def surrogate_loss(out, completion_mask) -> torch.Tensor:
    """A normalised PPO-shaped scalar: advantage-weighted log-probs and a squared value error
    (O(1) gradients, so float32 rounding stays far below the default tolerances)."""
    mask = completion_mask.float()
    count = mask.sum()
    gen = torch.Generator().manual_seed(3)
    advantages = torch.randn(mask.shape, generator=gen)
    returns = torch.randn(mask.shape, generator=gen)
    loss = torch.zeros(())
    if out.logp is not None:
        loss = loss - (out.logp * advantages * mask).sum() / count
    if out.values is not None:
        loss = loss + 0.5 * ((out.values - returns).pow(2) * mask).sum() / count
    return loss


def gradients(model, forward) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out, completion_mask = forward()
    surrogate_loss(out, completion_mask).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(model, batch):
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    c = completion_ids.shape[1]
    expected = gradients(model, lambda: (completion_forward(model, ids, mask, c), completion_mask))
    actual = gradients(
        model, lambda: (shared_prompt_completion_forward(model, *batch), completion_mask)
    )
    assert expected and actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, msg=name)
    return expected


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("kind", ["lm", "policy", "critic", "lora", "lora-policy"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_gradients_equal_completion_forward(arch, attn, kind, checkpointing):
    """Parameter-by-parameter gradients of the same loss. Under checkpointing the layers are
    replayed in backward with the cache still attached, so this also shows the replay neither
    appends to nor changes the cached prompt."""
    model = wrap(kind, tiny_lm(arch, attn)).train()
    if checkpointing:
        if isinstance(model, (PolicyWithValueHead, Critic)):
            model.gradient_checkpointing_enable()
        else:
            enable_gradient_checkpointing(model)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    batch = make_batch(PROMPTS, completion_len=5, **SHUFFLED)
    grads = assert_same_gradients(model, batch)
    if kind.startswith("lora"):
        assert any("lora_A" in name for name in grads)
        assert not any("lora_" not in name and "v_head" not in name for name in grads)
    if kind in ("policy", "critic", "lora-policy"):
        assert any("v_head" in name for name in grads)


def test_checkpointing_flag_is_restored_also_on_error():
    lm = tiny_lm().train()
    enable_gradient_checkpointing(lm)
    layers = [m for m in lm.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    prompt_ids, prompt_mask, completion_ids, completion_mask = make_batch(
        PROMPTS, completion_len=4, **DISTINCT
    )
    shared_prompt_completion_forward(lm, prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert layers and all("_can_checkpoint_with_cache" not in m.__dict__ for m in layers)
    completion_ids[0, 0] = VOCAB + 5  # the completion pass's embedding lookup fails
    with pytest.raises(IndexError):
        shared_prompt_completion_forward(
            lm, prompt_ids, prompt_mask, completion_ids, completion_mask
        )
    assert all("_can_checkpoint_with_cache" not in m.__dict__ for m in layers)
    assert all(m._can_checkpoint_with_cache is False for m in layers)


def test_absolute_position_model_without_checkpointing():
    """GPT-2 adds learned position embeddings: equality shows the completion pass continues
    the prompt's mask-derived positions."""
    lm = tiny_models.tiny_lm("gpt2", vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS)
    batch = make_batch(PROMPTS, completion_len=5, **SHUFFLED)
    with torch.no_grad():
        assert_same_outputs(*both(lm, batch, compute_entropy=True))


def test_model_that_drops_the_cache_is_refused():
    """GPT-2 drops ``cache`` for every block under checkpointing: a clear error, not wrong
    numbers."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=64)
    lm = GPT2LMHeadModel(config).train()
    enable_gradient_checkpointing(lm)
    with pytest.raises(ValueError, match="did not write keys/values into `cache`"):
        shared_prompt_completion_forward(lm, *make_batch(PROMPTS, completion_len=3, **DISTINCT))


def test_reentrant_checkpointing_is_refused():
    lm = tiny_lm().train()
    enable_gradient_checkpointing(lm, {"use_reentrant": True})
    batch = make_batch(PROMPTS, completion_len=3, **DISTINCT)
    with pytest.raises(ValueError, match="non-reentrant"):
        shared_prompt_completion_forward(lm, *batch)
    # Without autograd nothing is checkpointed, so the same model is accepted.
    with torch.no_grad():
        assert_same_outputs(*both(lm, batch))


def test_unsupported_attention_implementation_is_refused():
    lm = tiny_lm()
    lm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2'"):
        shared_prompt_completion_forward(lm, *make_batch(PROMPTS, completion_len=3, **DISTINCT))


def test_prompt_learning_adapter_is_refused():
    peft = pytest.importorskip("peft")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = peft.get_peft_model(tiny_lm(), config)
    with pytest.raises(ValueError, match="prompt-learning peft adapter"):
        shared_prompt_completion_forward(model, *make_batch(PROMPTS, completion_len=3, **DISTINCT))


@pytest.mark.parametrize(
    "field, change",
    [
        ("prompt_mask", lambda b: (b[0], b[1][:, 1:], b[2], b[3])),
        ("completion_mask", lambda b: (b[0], b[1], b[2], b[3][:, 1:])),
        ("completion_ids", lambda b: (b[0], b[1], b[2][1:], b[3][1:])),
        ("prompt_ids", lambda b: (b[0][:, :0], b[1][:, :0], b[2], b[3])),
    ],
)
def test_bad_shapes_name_the_field(field, change):
    batch = change(make_batch(PROMPTS, completion_len=3, **DISTINCT))
    with pytest.raises(ValueError, match=field):
        shared_prompt_completion_forward(tiny_lm(), *batch)


def test_non_reentrant_detection():
    checkpoint = torch.utils.checkpoint.checkpoint
    assert shared_prompt._is_non_reentrant(functools.partial(checkpoint, use_reentrant=False))
    assert not shared_prompt._is_non_reentrant(functools.partial(checkpoint, use_reentrant=True))
    # torch's default for a missing use_reentrant is the reentrant variant.
    assert not shared_prompt._is_non_reentrant(functools.partial(checkpoint))
    assert not shared_prompt._is_non_reentrant(checkpoint)
