"""Tests for grpo_lab.rollout.sampling: top-k / top-p truncation against transformers'
warpers, the sampled distribution against hand-derived sets, the inverse-CDF draw, and the
warper order every engine shares (same seed, same tokens as generate on exact logits)."""

import pytest
import torch

from grpo_lab.rollout import generate
from grpo_lab.rollout.sampling import sample_inverse_cdf, truncate_logits
from grpo_lab.rollout.shared_prefix import SharedPrefixBackend
from tests.rollout.mocks import (
    EOS,
    FORCE,
    IDS_TOKENIZER,
    V,
    assert_same_rollout,
    both_backends,
    markov,
)


@pytest.mark.parametrize("top_k", [None, 1, 3, 8, 20])
@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5, 0.05])
def test_truncate_logits_matches_transformers_warpers(top_k, top_p):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    scores = torch.randn(64, 12)
    scores[:8, :4] = 1.5  # ties, at and around the k-th score
    expected = scores
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    got = truncate_logits(scores, top_k=top_k, top_p=top_p)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).any(dim=1).all()  # at least one token always survives


# One fixed next-token distribution, whatever the previous token (every table row equal):
#   logits  = [1.0, 2.0, 0.5, 1.5, 0.0, -0.5, 0.8, -FORCE]  (EOS, token 7, never survives)
# At T=1, exp(logits) = [2.718, 7.389, 1.649, 4.482, 1.000, 0.607, 2.226, 0], sum 20.071:
#   p = [.1354, .3681, .0822, .2233, .0498, .0302, .1109, 0]
# - top_k=3 keeps the three largest: {1, 3, 0}.
# - top_p=0.8: ascending cumulative mass 5: .0302, 4: .0800, 2: .1622, 6: .2731, ...; tokens with
#   mass <= 0.2 go, so {1, 3, 0, 6} stays (margins .04 and .07 from the threshold).
# - top_k=3 then top_p=0.6: renormalised top-3 = [0: .1863, 3: .3072, 1: .5065]; mass
#   <= 0.4 goes: token 0 (.1863), leaving {1, 3}. (top-p first would keep token 0 as well.)
# At T=0.5 the weights are exp(2 * logits) = [7.389, 54.60, 2.718, 20.09, 1, .368, 4.953], sum
#   91.11: ascending mass 5: .0040, 4: .0150, 2: .0448, 6: .0992, 0: .1803; top_p=0.85 drops
#   mass <= 0.15, leaving {1, 3, 0}.
KNOWN_ROW = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.0, -0.5, 0.8, -FORCE])


TRUNCATION_CASES = [
    (dict(temperature=1.0, top_k=3), [0, 1, 3]),
    (dict(temperature=1.0, top_p=0.8), [0, 1, 3, 6]),
    (dict(temperature=1.0, top_k=3, top_p=0.6), [1, 3]),
    (dict(temperature=0.5, top_p=0.85), [0, 1, 3]),
]


@pytest.mark.parametrize("sampling, allowed", TRUNCATION_CASES)
def test_truncated_sampling_distribution(sampling, allowed, backend):
    """Every sampled token lies in the hand-derived allowed set, and the empirical frequencies
    match softmax(logits / T) renormalised over that set."""
    torch.manual_seed(0)
    batch = generate(
        markov(KNOWN_ROW.expand(V, V)),
        IDS_TOKENIZER,
        [[1]],
        group_size=2500,
        max_new_tokens=8,
        backend=backend,
        **sampling,
    )
    tokens = batch.completion_ids.flatten()  # all full length: EOS has probability 0
    assert tokens.numel() == 20_000
    assert set(tokens.unique().tolist()) == set(allowed)
    empirical = torch.bincount(tokens, minlength=V).float() / tokens.numel()
    expected = torch.zeros(V)
    expected[allowed] = torch.softmax(KNOWN_ROW[allowed] / sampling["temperature"], dim=0)
    # Tokens are i.i.d. here (every row of the table is the same), so each frequency has
    # standard deviation sqrt(p(1-p)/20000) <= 0.0036. 0.02 is more than 5.5 sigma (a false
    # failure below 1e-7 per token), yet smaller than any error of a wrong set or order above
    # (each moves some frequency by >= 0.08).
    assert (empirical - expected).abs().max() < 0.02


@pytest.mark.parametrize("fast", ["shared_prefix", "static"])
@pytest.mark.parametrize("ignore_eos", [False, True])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_backends_sample_identical_tokens_on_exact_logits(batch_size, ignore_eos, fast):
    """A Markov model's logits are a table lookup, bitwise equal in both backends, and both
    consume the RNG in the same order (one multinomial draw over all rows per step), so the
    same seed must give the same tokens: this pins the warper order temperature -> top-k ->
    top-p, the EOS ban of ignore_eos, pad feeding after EOS and the early stop."""
    torch.manual_seed(3)
    table = torch.randn(V, V)
    table[:, EOS] = 0.0  # with seed 3: 6 of 16 rows truncated, the others stop at steps 1-11
    hf, fast = both_backends(
        markov(table),
        [[1, 2, 3], [4], [5, 6], [2]],
        fast,
        group_size=4,
        max_new_tokens=12,
        temperature=0.8,
        top_k=5,
        top_p=0.9,
        ignore_eos=ignore_eos,
        batch_size=batch_size,
    )
    assert_same_rollout(hf, fast)
    if not ignore_eos:
        assert fast.truncated.any() and not fast.truncated.all()


def test_inverse_cdf_matches_a_loop():
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 10), dim=-1)
    probs[:, 4] = 0.0  # a zero-probability token in the middle is never drawn
    probs[:50, -3:] = 0.0  # nor a zero tail
    torch.manual_seed(1)
    tokens = sample_inverse_cdf(probs)
    torch.manual_seed(1)
    uniforms = torch.rand(200, 1).squeeze(1)
    for row in range(200):
        target = float(uniforms[row]) * float(probs[row].double().sum())
        running, expected = 0.0, None
        for token in range(10):
            running += float(probs[row, token])
            if running > target:
                expected = token
                break
        # float32 cumsum vs this float64 loop can disagree only within rounding of a boundary
        boundary = abs(running - target) < 1e-6 or expected is None
        assert boundary or int(tokens[row]) == expected, row
    assert not (tokens == 4).any() and not (tokens[:50] >= 7).any()


def test_inverse_cdf_draw_at_the_total_takes_last_positive_token(monkeypatch):
    # u = 1.0 * total: no cumulative value exceeds it (searchsorted would return V = 4), so the
    # draw is capped just below the total, where the last token of positive probability lies.
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.ones(*shape))
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    assert sample_inverse_cdf(probs).tolist() == [1, 3]


def test_unknown_sampler_lists_valid_ones():
    with pytest.raises(ValueError, match=r"sampler: 'gumbel' is not one of \['inverse_cdf'"):
        SharedPrefixBackend(sampler="gumbel")
