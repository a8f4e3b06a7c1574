"""Tests for grpo_lab.models: the shared completion forward against plain full-forward
references, value alignment, gradient paths, critic independence, save/load, loaders, LoRA."""

import math

import pytest
import tiny_models
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from grpo_lab import models
from grpo_lab.algos import entropy_from_logits
from grpo_lab.models import (
    Critic,
    PolicyWithValueHead,
    ValueHead,
    completion_forward,
    token_logprobs,
)

VOCAB = 20
PAD = 0


def tiny_lm(seed: int = 0) -> PreTrainedModel:
    return tiny_models.tiny_lm("qwen2", seed=seed)


def tiny_gpt2(seed: int = 0) -> PreTrainedModel:
    return tiny_models.tiny_lm("gpt2", seed=seed)


def ragged_batch(completion_len: int = 4):
    """Three sequences with prompts of 3, 1 and 2 real tokens left-padded to P=3, then
    completions of C tokens whose second row ends early (mask 0 on its last two tokens)."""
    prompts = [[5, 6, 7], [8], [9, 10]]
    p = 3
    gen = torch.Generator().manual_seed(1)
    completions = torch.randint(2, VOCAB, (3, completion_len), generator=gen)
    ids = torch.full((3, p + completion_len), PAD)
    mask = torch.zeros((3, p + completion_len), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, p - len(prompt) : p] = torch.tensor(prompt)
        mask[row, p - len(prompt) :] = 1
    ids[:, p:] = completions
    mask[1, -2:] = 0
    ids[1, -2:] = PAD
    return ids, mask


def loop_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions by counting real tokens one at a time; left padding gets 0."""
    positions = torch.zeros_like(mask)
    for row in range(mask.shape[0]):
        count = 0
        for col in range(mask.shape[1]):
            if mask[row, col]:
                positions[row, col] = count
                count += 1
    return positions


def plain_reference(lm, ids, mask, completion_len, temperature=1.0):
    """Full forward (all positions), log_softmax over everything, gather token by token."""
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=loop_positions(mask)).logits
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, T, V]
    start = ids.shape[1] - completion_len
    logp = torch.zeros(ids.shape[0], completion_len)
    entropy = torch.zeros(ids.shape[0], completion_len)
    for row in range(ids.shape[0]):
        for t in range(completion_len):
            dist = logp_all[row, start - 1 + t]
            logp[row, t] = dist[ids[row, start + t]]
            entropy[row, t] = -(dist.exp() * dist).sum()
    return logp, entropy


def real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the completion positions whose token is padding: nothing is defined there (the
    positions of trailing padding follow no convention) and losses never read them."""
    return x * mask[:, -x.shape[1] :]


def hidden_reference(lm, ids, mask):
    """Last hidden state over all positions from a full forward."""
    out = lm(
        input_ids=ids,
        attention_mask=mask,
        position_ids=loop_positions(mask),
        output_hidden_states=True,
    )
    return out.hidden_states[-1]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("make_lm", [tiny_lm, tiny_gpt2])
def test_logp_and_entropy_match_plain_reference(make_lm, temperature):
    lm = make_lm()
    ids, mask = ragged_batch()
    with torch.no_grad():
        out = completion_forward(lm, ids, mask, 4, temperature=temperature, compute_entropy=True)
        ref_logp, ref_entropy = plain_reference(lm, ids, mask, 4, temperature)
    torch.testing.assert_close(real(out.logp, mask), real(ref_logp, mask))
    torch.testing.assert_close(real(out.entropy, mask), real(ref_entropy, mask))
    assert out.values is None
    assert out.logp.dtype == torch.float32


def test_temperature_changes_logp():
    lm = tiny_lm()
    ids, mask = ragged_batch()
    with torch.no_grad():
        hot = completion_forward(lm, ids, mask, 4, temperature=2.0).logp
        cold = completion_forward(lm, ids, mask, 4, temperature=1.0).logp
    assert not torch.allclose(hot, cold)


def test_entropy_only_when_asked():
    lm = tiny_lm()
    ids, mask = ragged_batch()
    with torch.no_grad():
        assert completion_forward(lm, ids, mask, 4).entropy is None


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_chunked_equals_unchunked(chunk_size):
    lm = tiny_lm()
    ids, mask = ragged_batch(completion_len=5)
    with torch.no_grad():
        whole = completion_forward(lm, ids, mask, 5, compute_entropy=True, chunk_size=1024)
        chunked = completion_forward(lm, ids, mask, 5, compute_entropy=True, chunk_size=chunk_size)
    torch.testing.assert_close(chunked.logp, whole.logp)
    torch.testing.assert_close(chunked.entropy, whole.entropy)


@pytest.mark.parametrize("min_recompute_elements", [0, 2**20])  # checkpointed / kept chunks
def test_token_logprobs_gradient_matches_plain_autograd(min_recompute_elements):
    """The chunked path, checkpointed or not, must give the same gradient as plain autograd."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 7, (2, 5))
    logp, entropy = token_logprobs(
        logits,
        targets,
        temperature=0.7,
        compute_entropy=True,
        chunk_size=2,
        min_recompute_elements=min_recompute_elements,
    )
    (logp.sum() + entropy.sum()).backward()
    chunked_grad = logits.grad.clone()

    logits.grad = None
    ref = torch.log_softmax(logits.float() / 0.7, dim=-1)
    ref_logp = ref.gather(-1, targets[..., None]).squeeze(-1)
    ref_entropy = -(ref.exp() * ref).sum(-1)
    (ref_logp.sum() + ref_entropy.sum()).backward()
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(chunked_grad, logits.grad)


@pytest.mark.parametrize("min_recompute_elements", [0, 2**20])  # checkpointed / kept chunks
def test_token_logprobs_entropy_is_algos_entropy(min_recompute_elements):
    """The forwards' entropy is algos.entropy_from_logits of the float32 logits / T, bit for bit;
    a -inf logit (a banned token) adds 0 to it, and its gradient stays finite."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7).to(torch.bfloat16)
    logits[0, 1, 3] = -math.inf
    logits.requires_grad_()
    targets = torch.randint(0, 3, (2, 5))
    kwargs = dict(temperature=0.7, chunk_size=2, min_recompute_elements=min_recompute_elements)
    _, entropy = token_logprobs(logits, targets, compute_entropy=True, **kwargs)
    assert torch.equal(entropy, entropy_from_logits(logits.float() / 0.7))
    assert torch.isfinite(entropy).all()
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_bf16_logits_give_float32_logp():
    logits = torch.randn(2, 3, 7).to(torch.bfloat16)
    targets = torch.randint(0, 7, (2, 3))
    logp, _ = token_logprobs(logits, targets)
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref)


def test_bad_arguments_raise():
    lm = tiny_lm()
    ids, mask = ragged_batch()
    with pytest.raises(ValueError, match="completion_len"):
        completion_forward(lm, ids, mask, ids.shape[1])
    with pytest.raises(ValueError, match="temperature"):
        completion_forward(lm, ids, mask, 2, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        completion_forward(lm, ids, mask, 2, chunk_size=0)


def test_policy_values_aligned_with_hidden_state_before_each_token():
    policy = PolicyWithValueHead(tiny_lm())
    ids, mask = ragged_batch()
    c, p = 4, ids.shape[1] - 4
    with torch.no_grad():
        out = completion_forward(policy, ids, mask, c, compute_entropy=True)
        hidden = hidden_reference(policy.lm, ids, mask)
        ref_logp, ref_entropy = plain_reference(policy.lm, ids, mask, c)
    expected = torch.stack([policy.v_head(hidden[:, p - 1 + t]) for t in range(c)], dim=1)
    torch.testing.assert_close(real(out.values, mask), real(expected, mask))
    torch.testing.assert_close(real(out.logp, mask), real(ref_logp, mask))
    torch.testing.assert_close(real(out.entropy, mask), real(ref_entropy, mask))


def test_critic_values_aligned_and_no_logits():
    critic = Critic(tiny_lm(seed=3).model)
    ids, mask = ragged_batch()
    c, p = 4, ids.shape[1] - 4
    with torch.no_grad():
        out = completion_forward(critic, ids, mask, c)
        hidden = critic.backbone(
            input_ids=ids, attention_mask=mask, position_ids=loop_positions(mask)
        ).last_hidden_state
    expected = torch.stack([critic.v_head(hidden[:, p - 1 + t]) for t in range(c)], dim=1)
    assert out.logp is None and out.entropy is None
    torch.testing.assert_close(real(out.values, mask), real(expected, mask))


def test_critic_values_to_keep_defaults_to_logits_to_keep():
    """A critic computes no logits: values_to_keep selects its value positions (int or index
    tensor), and without it logits_to_keep does, as for the policy with value head."""
    critic = Critic(tiny_lm(seed=3).model)
    ids, mask = ragged_batch()
    with torch.no_grad():
        every = critic(input_ids=ids, attention_mask=mask).values  # [N, T]
        by_logits = critic(input_ids=ids, attention_mask=mask, logits_to_keep=3)
        by_values = critic(input_ids=ids, attention_mask=mask, values_to_keep=3)
        index = torch.tensor([0, 2])
        by_index = critic(
            input_ids=ids, attention_mask=mask, logits_to_keep=1, values_to_keep=index
        )
    assert by_logits.logits is None and by_values.logits is None
    assert torch.equal(by_values.values, by_logits.values)
    torch.testing.assert_close(by_values.values, every[:, -3:])
    torch.testing.assert_close(by_index.values, every[:, index])


def test_one_model_name_resolver():
    from grpo_lab import hub

    assert models.resolve_model_path is hub.resolve_model_path


def test_value_loss_trains_head_and_shared_trunk():
    policy = PolicyWithValueHead(tiny_lm())
    ids, mask = ragged_batch()
    out = completion_forward(policy, ids, mask, 4)
    out.values.pow(2).sum().backward()
    assert policy.v_head.linear.weight.grad.abs().sum() > 0
    assert policy.lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_value_head_init_and_float32_output():
    head = ValueHead(32)
    # Default std = 1/sqrt(32+1) ~= 0.174; 32 draws give a sample std well within 0.08..0.3.
    assert 0.08 < head.linear.weight.std() < 0.3
    assert torch.all(head.linear.bias == 0)
    assert torch.all(ValueHead(32, init_std=0.0).linear.weight == 0)
    assert head(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.float32


def checkpointed(module: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


def test_gradient_checkpointing_keeps_gradients():
    ids, mask = ragged_batch()
    grads = []
    for use_checkpointing in (False, True):
        policy = PolicyWithValueHead(tiny_lm()).train()
        if use_checkpointing:
            policy.gradient_checkpointing_enable()
        assert checkpointed(policy) == use_checkpointing
        out = completion_forward(policy, ids, mask, 4)
        (real(out.values, mask).sum() + real(out.logp, mask).sum()).backward()
        grads.append(policy.lm.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0])


def save_tiny(path, seed=0):
    tiny_lm(seed).save_pretrained(path)
    return str(path)


def test_critic_has_its_own_parameters(tmp_path):
    folder = save_tiny(tmp_path / "lm")
    policy = PolicyWithValueHead.from_pretrained(folder)
    critic = models.load_critic(folder)
    policy_ptrs = {p.data_ptr() for p in policy.parameters()}
    critic_ptrs = {p.data_ptr() for p in critic.parameters()}
    assert not policy_ptrs & critic_ptrs
    # Same starting trunk weights, loaded from the policy's checkpoint.
    torch.testing.assert_close(
        critic.backbone.layers[0].mlp.up_proj.weight, policy.lm.model.layers[0].mlp.up_proj.weight
    )
    # The critic trunk has no LM head parameters.
    assert not any("lm_head" in name for name, _ in critic.named_parameters())


def test_policy_save_load_roundtrip(tmp_path):
    policy = PolicyWithValueHead(tiny_lm())
    ids, mask = ragged_batch()
    policy.save_pretrained(tmp_path)
    assert (tmp_path / models.VALUE_HEAD_FILE).is_file()
    loaded = PolicyWithValueHead.from_pretrained(str(tmp_path))
    with torch.no_grad():
        before = completion_forward(policy, ids, mask, 4)
        after = completion_forward(loaded, ids, mask, 4)
    torch.testing.assert_close(after.values, before.values)
    torch.testing.assert_close(after.logp, before.logp)


def test_critic_save_load_roundtrip(tmp_path):
    critic = models.load_critic(save_tiny(tmp_path / "lm"))
    ids, mask = ragged_batch()
    critic.save_pretrained(tmp_path / "critic")
    loaded = models.load_critic(str(tmp_path / "critic"))
    with torch.no_grad():
        before = completion_forward(critic, ids, mask, 4).values
        after = completion_forward(loaded, ids, mask, 4).values
    torch.testing.assert_close(after, before)


def test_unreadable_critic_folder_is_one_line_naming_its_key(tmp_path):
    """The critic's trunk loads through the same loader as the policy, so an unreadable
    folder is one ModelSourceError naming the config keys it can come from."""
    from grpo_lab.errors import ModelSourceError

    folder = save_tiny(tmp_path / "lm")
    (tmp_path / "lm" / "config.json").write_text("{ not json")
    with pytest.raises(ModelSourceError, match=r"cannot load .*\(ppo.critic_model or model"):
        models.load_critic(folder)


def test_head_is_fresh_when_checkpoint_has_none(tmp_path):
    folder = save_tiny(tmp_path / "lm")
    policy = PolicyWithValueHead.from_pretrained(folder)
    assert policy.v_head.linear.weight.abs().sum() > 0


def test_load_causal_lm_bf16_and_training_setup(tmp_path):
    folder = save_tiny(tmp_path / "lm")
    lm = models.load_causal_lm(folder, dtype="bfloat16", gradient_checkpointing=True)
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert lm.config.use_cache is False
    assert checkpointed(lm)


def test_invalid_dtype_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"dtype.*\['bfloat16', 'float16', 'float32'\]"):
        models.load_causal_lm(str(tmp_path), dtype="fp8")


def test_load_reference_is_frozen_eval(tmp_path):
    ref = models.load_reference(save_tiny(tmp_path / "lm"))
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())


def test_random_init_causal_lm_dtype():
    lm = models.random_init_causal_lm(tiny_models.tiny_config(), dtype="bfloat16")
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert lm.config.vocab_size == VOCAB


def test_load_tokenizer_sets_pad_and_left_padding(tmp_path):
    chars = "abc"
    vocab = {"<eos>": 0, **{ch: i + 1 for i, ch in enumerate(chars)}}
    raw = Tokenizer(WordLevel(vocab, unk_token="<eos>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    raw.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>").save_pretrained(tmp_path)
    tokenizer = models.load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "<eos>"
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["abc", "a"], padding=True)
    assert batch["input_ids"] == [[1, 2, 3], [0, 0, 1]]


def test_lora_wrapped_lm_through_policy_and_completion_forward():
    peft = pytest.importorskip("peft")
    lm = peft.get_peft_model(
        tiny_lm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    # Make the adapter non-trivial so the check below sees LoRA in the forward.
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    policy = PolicyWithValueHead(lm)
    ids, mask = ragged_batch()
    out = completion_forward(policy, ids, mask, 4, compute_entropy=True)
    with torch.no_grad():
        ref_logp, _ = plain_reference(lm, ids, mask, 4)
        with lm.disable_adapter():
            base_logp, _ = plain_reference(lm, ids, mask, 4)
    torch.testing.assert_close(real(out.logp, mask), real(ref_logp, mask))
    assert not torch.allclose(out.logp, base_logp)
    (out.values.sum() + out.logp.sum()).backward()
    lora_grads = [p.grad for n, p in lm.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert policy.v_head.linear.weight.grad is not None
    assert all(p.grad is None for n, p in lm.named_parameters() if "lora_" not in n)


def test_embedded_character_tokenizer_keeps_its_spaces(tmp_path):
    """A saved generic tokenizer.json is loaded as saved, not re-typed by the model type."""

    from grpo_lab.models import load_tokenizer
    from grpo_lab.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=32)).save_pretrained(tmp_path)  # fmt: skip
    loaded = load_tokenizer(str(tmp_path))
    text = "(1-2)= 3"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.padding_side == "left" and loaded.pad_token == "<pad>"


def test_float32_chunks_stay_under_the_element_budget(monkeypatch):
    """N=2, V=7: a budget of 28 elements allows 2 positions per chunk, so 5 positions take 3
    float32 log-softmax calls, and the result equals the one-chunk result."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    whole, whole_entropy = token_logprobs(logits, targets, compute_entropy=True)
    calls = []
    real = torch.log_softmax

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch, "log_softmax", counting)
    logp, entropy = token_logprobs(logits, targets, compute_entropy=True, max_chunk_elements=28)
    assert calls == [(2, 2, 7), (2, 2, 7), (2, 1, 7)]
    torch.testing.assert_close(logp, whole)
    torch.testing.assert_close(entropy, whole_entropy)


# Every name importable from grpo_lab.models when it was one file: the package keeps them all.
PUBLIC_NAMES = """CompletionOutputs Critic DTYPES LOGIT_TRANSFORM_FIELDS MAX_LOGIT_ELEMENTS
PolicyWithValueHead SHARED_PROMPT_ATTENTION VALUE_HEAD_FILE ValueHead ValueModelOutput apply_lora
attention_implementation completion_forward enable_gradient_checkpointing load_causal_lm
load_critic load_reference load_tokenizer position_ids_from_mask random_init_causal_lm
resolve_dtype resolve_model_path shared_prompt_completion_forward token_logprobs""".split()


def test_package_keeps_every_public_name():
    assert sorted(models.__all__) == sorted(PUBLIC_NAMES)
    assert all(
        hasattr(models, name) for name in [*PUBLIC_NAMES, "_HEAD_CHECKS", "_is_non_reentrant"]
    )
