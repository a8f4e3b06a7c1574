"""Tests for grpo_lab.models.chunked_head, the chunked LM head of completion_forward and
shared_prompt_completion_forward: outputs and parameter gradients equal the model's own logits
path (tiny random Qwen2 / Llama, tied and untied embeddings, the policy with value head, LoRA,
gradient checkpointing), the path is really taken exactly above the threshold, a model whose
logits are transformed after the head is refused, and the critic is unaffected."""

import pytest
import tiny_models
import torch
from tiny_models import assert_same_outputs
from transformers import AutoModelForCausalLM, Gemma2Config

from grpo_lab.models import (
    Critic,
    PolicyWithValueHead,
    chunked_head,
    completion_forward,
    enable_gradient_checkpointing,
    shared_prompt_completion_forward,
)

VOCAB = 24
PAD, EOS = 0, 1
# Left-padded prompts of 4, 1, 2 and 3 tokens; rows 0/3 and 2/5 share a prompt.
PROMPTS = [[5, 6, 7, 8], [9], [10, 11], [12, 13, 14]]
ROWS = [2, 0, 1, 2, 3, 0]
# Completions of C = 5: rows 1, 3, 5 end with EOS and are padded after it.
COMPLETION_LENS = [5, 2, 5, 4, 5, 3]
C = 5
N = len(ROWS)
# Two positions per chunk: chunks of N * 2 * V logits, below N * K * V for every pass here.
SMALL = N * 2 * VOCAB


def tiny_lm(arch: str = "qwen2", tied: bool = True, seed: int = 0):
    return tiny_models.tiny_lm(
        arch,
        seed=seed,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        tie_word_embeddings=tied,
    )


def make_batch(seed: int = 0):
    """prompt_ids, prompt_mask [N, P] (left-padded) and completion_ids, completion_mask [N, C]
    (right-padded after EOS) for ROWS / COMPLETION_LENS."""
    return tiny_models.split_batch(
        PROMPTS, ROWS, COMPLETION_LENS, C, vocab_size=VOCAB, pad_id=PAD, eos_id=EOS, seed=seed
    )


def run(forward: str, model, batch, max_logit_elements, temperature=0.7, **kwargs):
    """One call of ``forward`` ("full": completion_forward on prompt + completion, "shared":
    shared_prompt_completion_forward) with entropy."""
    kwargs = dict(
        temperature=temperature,
        compute_entropy=True,
        max_logit_elements=max_logit_elements,
        **kwargs,
    )
    if forward == "shared":
        return shared_prompt_completion_forward(model, *batch, **kwargs)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return completion_forward(model, ids, mask, C, **kwargs)


def lm_of(model):
    """The transformers causal LM under the value head and peft wrappers."""
    if isinstance(model, PolicyWithValueHead):
        model = model.lm
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Recorder:
    """Shapes of every input the LM head sees and of the logits the causal LM returns."""

    def __init__(self, model):
        self.head_inputs, self.model_logits = [], []
        lm = lm_of(model)
        lm.get_output_embeddings().register_forward_hook(
            lambda module, args, out: self.head_inputs.append(tuple(args[0].shape))
        )
        lm.register_forward_hook(
            lambda module, args, out: self.model_logits.append(tuple(out.logits.shape))
        )

    def clear(self):
        self.head_inputs.clear()
        self.model_logits.clear()


def make_model(kind: str, arch: str = "qwen2", tied: bool = True):
    """The model under test; LoRA adapters (on attention and, untied, on the LM head) get a
    non-zero B so that they change the forward."""
    lm = tiny_lm(arch, tied)
    if kind == "lm":
        return lm
    if kind == "policy":
        return PolicyWithValueHead(lm)
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj"] + ([] if tied else ["lm_head"])
    lora = peft.get_peft_model(lm, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return PolicyWithValueHead(lora) if kind == "lora-policy" else lora


MODELS = [
    ("lm", "qwen2", True),
    ("lm", "qwen2", False),
    ("lm", "llama", True),
    ("lm", "llama", False),
    ("policy", "qwen2", True),
    ("lora", "qwen2", False),
    ("lora-policy", "llama", True),
]
MODEL_IDS = [f"{kind}-{arch}-{'tied' if tied else 'untied'}" for kind, arch, tied in MODELS]
# GPT-2 (learned absolute positions, no checkpointing with the shared forward's cache) for
# outputs only.
OUTPUT_MODELS = [*MODELS, ("lm", "gpt2", True)]
OUTPUT_MODEL_IDS = [*MODEL_IDS, "lm-gpt2-tied"]
FORWARDS = ("full", "shared")


def chunked_run(forward, model, batch, recorder, **kwargs):
    """The chunked path's outputs: a first call without autograd runs the one-time head check,
    the second is asserted to use the chunked head (the model returns no logits; the head
    sees chunks of at most 2 positions)."""
    with torch.no_grad():
        run(forward, model, batch, SMALL, **kwargs)
    recorder.clear()
    out = run(forward, model, batch, SMALL, **kwargs)
    assert recorder.model_logits[-1][1] == 0
    chunks = [shape for shape in recorder.head_inputs if shape[1] != 0]
    # full: C positions (of the C+1 kept, the last is dropped); shared: C-1 tail positions and
    # the prompt pass's own 1-position head call.
    expected = [2, 2, 1] if forward == "full" else [1, 2, 2]
    assert [shape[1] for shape in chunks] == expected
    return out


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind, arch, tied", OUTPUT_MODELS, ids=OUTPUT_MODEL_IDS)
def test_outputs_equal_model_logits_path(kind, arch, tied, forward):
    model = make_model(kind, arch, tied).eval()
    recorder = Recorder(model)
    batch = make_batch()
    with torch.no_grad():
        expected = run(forward, model, batch, None)
        actual = chunked_run(forward, model, batch, recorder)
    assert_same_outputs(expected, actual)
    assert (actual.values is not None) == kind.endswith("policy")


def surrogate_loss(out, completion_mask) -> torch.Tensor:
    """Advantage-weighted log-probs, an entropy bonus and a squared value error, normalised
    (O(1) gradients, so float32 rounding stays far below the default tolerances)."""
    mask = completion_mask.float()
    count = mask.sum()
    gen = torch.Generator().manual_seed(3)
    advantages = torch.randn(mask.shape, generator=gen)
    returns = torch.randn(mask.shape, generator=gen)
    loss = -(out.logp * advantages * mask).sum() / count
    loss = loss - 0.1 * (out.entropy * mask).sum() / count
    if out.values is not None:
        loss = loss + 0.5 * ((out.values - returns).pow(2) * mask).sum() / count
    return loss


def gradients(model, forward_fn, completion_mask) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    surrogate_loss(forward_fn(), completion_mask).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind, arch, tied", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_gradients_equal_model_logits_path(kind, arch, tied, forward, checkpointing):
    model = make_model(kind, arch, tied).train()
    if checkpointing:
        enable_gradient_checkpointing(lm_of(model))
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    recorder = Recorder(model)
    batch = make_batch()
    mask = batch[3]
    expected = gradients(model, lambda: run(forward, model, batch, None), mask)
    actual = gradients(model, lambda: chunked_run(forward, model, batch, recorder), mask)
    assert expected and actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, msg=name)
    if kind.startswith("lora"):
        assert all("lora_" in n or "v_head" in n for n in expected)
        # Untied: LoRA on the head itself, whose adapter is trained through the chunks.
        assert tied or any("lm_head.lora_A" in n for n in expected)
    else:
        # Tied: one parameter, the embedding, carries the head's gradient too.
        assert any(n.endswith("embed_tokens.weight") for n in expected)
        assert tied != any(n.endswith("lm_head.weight") for n in expected)


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", ["lm", "policy"])
def test_checking_call_under_autograd_has_the_same_gradients(kind, forward):
    """The first call checks the head on one position and goes on in chunks from the same
    forward: under autograd its gradients are those of the model's own logits."""
    model = make_model(kind).train()
    recorder = Recorder(model)
    batch = make_batch()
    expected = gradients(model, lambda: run(forward, model, batch, None), batch[3])
    recorder.clear()
    actual = gradients(model, lambda: run(forward, model, batch, SMALL), batch[3])
    assert recorder.model_logits[-1][1] == 1  # this was the checking call
    assert chunked_head._HEAD_CHECKS[lm_of(model)] == {True: True}
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, msg=name)


@pytest.mark.parametrize("forward, kept", [("full", C + 1), ("shared", C - 1)])
def test_threshold(forward, kept):
    """The chunked head is used only while N * K * V > max_logit_elements, K the positions the
    model would keep (C+1 in completion_forward, C-1 in the shared completion pass)."""
    lm = tiny_lm()
    recorder = Recorder(lm)
    batch = make_batch()
    at_threshold = N * kept * VOCAB
    with torch.no_grad():
        for limit in (at_threshold, None, chunked_head.MAX_LOGIT_ELEMENTS):
            recorder.clear()
            run(forward, lm, batch, limit)
            assert recorder.model_logits[-1] == (N, kept, VOCAB)
            assert (N, kept, 32) in recorder.head_inputs and len(recorder.head_inputs) <= 2
        # Chunks of K-1 positions: completion_forward reduces its C = K-1, the shared
        # completion pass its C-1 = K (the prompt pass's own head call comes first).
        chunks = [C] if forward == "full" else [kept - 1, 1]
        prompt_head = [] if forward == "full" else [1]
        recorder.clear()
        # The one-time check: the model's own logits of its last position only, the head on
        # that position's hidden state, then the same call goes on in chunks.
        run(forward, lm, batch, at_threshold - 1)
        assert recorder.model_logits[-1] == (N, 1, VOCAB)
        positions = [shape[1] for shape in recorder.head_inputs if shape[1] != 0]
        assert positions == prompt_head + [1, 1] + chunks
        recorder.clear()
        run(forward, lm, batch, at_threshold - 1)
        assert recorder.model_logits[-1] == (N, 0, VOCAB)
        positions = [shape[1] for shape in recorder.head_inputs if shape[1] != 0]
        assert positions == prompt_head + chunks


@pytest.mark.parametrize("forward", FORWARDS)
def test_no_logits_are_saved_for_backward(forward):
    """Under autograd the chunked path saves nothing of the vocabulary's width outside its
    checkpointed chunks (their logits are recomputed in backward); the model's own logits path
    does (at this size token_logprobs keeps its small float32 chunks)."""
    lm = tiny_lm().train()
    batch = make_batch()

    def saved_vocab_tensors(max_logit_elements) -> list[tuple[int, ...]]:
        shapes = []

        def pack(tensor):
            shapes.append(tuple(tensor.shape))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run(forward, lm, batch, max_logit_elements)
        return [s for s in shapes if len(s) == 3 and s[1] > 1 and s[-1] == VOCAB]

    assert saved_vocab_tensors(None)
    with torch.no_grad():
        run(forward, lm, batch, SMALL)  # the one-time check
    assert saved_vocab_tensors(SMALL) == []


def test_check_runs_once_per_train_and_eval_mode():
    lm = tiny_lm()
    recorder = Recorder(lm)
    batch = make_batch()

    def model_logit_positions():
        recorder.clear()
        with torch.no_grad():
            run("full", lm, batch, SMALL)
        return recorder.model_logits[-1][1]

    lm.eval()  # the checking call asks the model for its last position's logits only
    assert [model_logit_positions() for _ in range(3)] == [1, 0, 0]
    lm.train()
    assert [model_logit_positions() for _ in range(2)] == [1, 0]
    lm.eval()
    assert model_logit_positions() == 0


def model_path_head_inputs(forward: str) -> list[tuple[int, int, int]]:
    """The LM head inputs [rows, positions, H] of one call on the model's own logits path:
    completion_forward keeps C+1 positions; the shared forward keeps 1 per distinct prompt
    (4 of them), then C-1."""
    if forward == "full":
        return [(N, C + 1, 32)]
    return [(4, 1, 32), (N, C - 1, 32)]


def tiny_gemma2(**overrides):
    config = Gemma2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        bos_token_id=EOS,
        eos_token_id=EOS,
        **overrides,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("forward", FORWARDS)
def test_softcapped_logits_are_refused_by_the_config_rule(forward):
    """Gemma2 soft-caps its logits after the head (cap 0.5 against logits up to ~0.4 changes
    them by ~0.06): its config field alone keeps the model's own logits, with no check pass."""
    lm = tiny_gemma2(final_logit_softcapping=0.5)
    recorder = Recorder(lm)
    batch = make_batch()
    with torch.no_grad():
        expected = run(forward, lm, batch, None)
        for _ in range(2):
            recorder.clear()
            assert_same_outputs(expected, run(forward, lm, batch, SMALL))
            assert recorder.head_inputs == model_path_head_inputs(forward)
    assert lm not in chunked_head._HEAD_CHECKS


@pytest.mark.parametrize("forward", FORWARDS)
def test_unlisted_logit_transform_fails_the_check(forward, monkeypatch):
    """With the config rule emptied the same soft-capped model reaches the numeric check,
    which fails (with a warning); that call and every later one use the model's own logits."""
    monkeypatch.setattr(chunked_head, "LOGIT_TRANSFORM_FIELDS", ())
    lm = tiny_gemma2(final_logit_softcapping=0.5)
    recorder = Recorder(lm)
    batch = make_batch()
    with torch.no_grad():
        expected = run(forward, lm, batch, None)
        with pytest.warns(UserWarning, match="do not reproduce its logits"):
            assert_same_outputs(expected, run(forward, lm, batch, SMALL))
        recorder.clear()
        assert_same_outputs(expected, run(forward, lm, batch, SMALL))
        assert recorder.head_inputs == model_path_head_inputs(forward)
    assert chunked_head._HEAD_CHECKS[lm] == {False: False}


def test_check_passes_for_an_uncapped_gemma2():
    """The same architecture without soft-capping passes the check, and gives the same
    outputs chunked (so the failures above are the transform's)."""
    lm = tiny_gemma2(final_logit_softcapping=None)
    recorder = Recorder(lm)
    batch = make_batch()
    with torch.no_grad():
        expected = run("full", lm, batch, None)
        assert_same_outputs(expected, chunked_run("full", lm, batch, recorder))


def test_hidden_states_untied_from_the_final_norm_are_refused():
    lm = tiny_lm()
    lm.config.tie_last_hidden_states = False
    recorder = Recorder(lm)
    with torch.no_grad():
        for _ in range(2):
            run("full", lm, make_batch(), SMALL)
    assert all(shape[1] == C + 1 for shape in recorder.model_logits)


@pytest.mark.parametrize("forward", FORWARDS)
def test_critic_is_unaffected(forward):
    """A critic has no LM head: values only, from one plain call, whatever the threshold."""
    critic = Critic(tiny_lm().model).train()
    batch = make_batch()
    calls = []
    critic.backbone.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True
    )
    expected = run(forward, critic, batch, None)
    for _ in range(2):
        actual = run(forward, critic, batch, 1)
        assert actual.logp is None and actual.entropy is None
        torch.testing.assert_close(actual.values, expected.values)
    assert not any("output_hidden_states" in kwargs for kwargs in calls)
    assert len(calls) == 3 * (1 if forward == "full" else 2)


def test_value_positions_of_the_policy():
    """values_to_keep (int or index tensor) selects the value positions independently of
    logits_to_keep; by default they follow logits_to_keep, as before."""
    policy = PolicyWithValueHead(tiny_lm()).eval()
    ids = make_batch()[0]
    with torch.no_grad():
        every = policy(input_ids=ids)
        index = torch.tensor([0, 2, 3])
        by_index = policy(input_ids=ids, logits_to_keep=index)
        no_logits = policy(
            input_ids=ids, logits_to_keep=index[:0], values_to_keep=2, output_hidden_states=True
        )
    torch.testing.assert_close(by_index.values, every.values[:, index])
    torch.testing.assert_close(by_index.logits, every.logits[:, index])
    assert no_logits.logits.shape == (N, 0, VOCAB)
    torch.testing.assert_close(no_logits.values, every.values[:, -2:])
    assert every.hidden_states is None and len(no_logits.hidden_states) == 3
    with pytest.raises(ValueError, match="logits_to_keep: expected an int or a 1-D"):
        policy(input_ids=ids, logits_to_keep=index[None])
    with pytest.raises(ValueError, match="values_to_keep: expected an int or a 1-D"):
        policy(input_ids=ids, values_to_keep=index[None])


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="max_logit_elements"):
        run("full", tiny_lm(), make_batch(), 0)
