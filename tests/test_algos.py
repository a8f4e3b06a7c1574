"""Tests for grpo_lab.algos: hand-derived values, loop references, gradients, invariances."""

import inspect
import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from grpo_lab import algos
from grpo_lab.algos import (
    ADVANTAGE_ESTIMATORS,
    AGG_MODES,
    POLICY_LOSSES,
    aggregate,
    entropy_from_logits,
    entropy_from_logprobs,
    explained_variance,
    gae,
    get_advantage_estimator,
    get_policy_loss,
    group_advantages,
    gspo_loss,
    kl_penalty,
    masked_mean,
    masked_var,
    policy_loss,
    register_advantage_estimator,
    register_policy_loss,
    rloo_advantages,
    value_loss,
    whiten,
)

F64 = torch.float64


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


def ragged_mask(n: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Right-padded [n, T] bool mask; row 0 is empty and row 1 full, the rest random lengths."""
    lengths = torch.randint(0, T + 1, (n,), generator=gen)
    lengths[0], lengths[1] = 0, T
    return torch.arange(T)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------- loop references
def gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE per sequence over its real tokens only, value 0 after the last one."""
    out = []
    for r, v, n in zip(rewards, values, lengths):
        adv, running = [0.0] * len(r), 0.0
        for step in reversed(range(n)):
            next_value = v[step + 1] if step + 1 < n else 0.0
            running = r[step] + gamma * next_value - v[step] + gamma * lam * running
            adv[step] = running
        out.append(adv)
    return out


def group_loop(rewards, G, scale, eps):
    all_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g : g + G]
        if len(set(group)) == 1:
            out += [0.0] * G
            continue
        mean = sum(group) / G
        std = {"group": statistics.stdev(group), "batch": all_std, "none": None}[scale]
        out += [(r - mean) if std is None else (r - mean) / (std + eps) for r in group]
    return out


def rloo_loop(rewards, G):
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g : g + G]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            out.append(0.0 if len(set(group)) == 1 else r - sum(others) / len(others))
    return out


# ----------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    # Group [1, 0, 0, 1]: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
    # so A = +-0.5 / (sqrt(1/3) + 1e-6) ~= +-0.866.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert_close(group_advantages(t([1, 0, 0, 1]), 4), t([a, -a, -a, a]))
    # "none" (Dr. GRPO) only centres: +-0.5.
    assert_close(group_advantages(t([1, 0, 0, 1]), 4, scale="none"), t([0.5, -0.5, -0.5, 0.5]))
    # "batch": second group identical -> 0. All 8 rewards: mean 0.75, squared deviations
    # 6 * 0.0625 + 2 * 0.5625 = 1.5, unbiased var 1.5 / 7, so group 1 gets +-0.5 / sqrt(1.5/7).
    b = 0.5 / (math.sqrt(1.5 / 7) + 1e-6)
    out = group_advantages(t([1, 0, 0, 1, 1, 1, 1, 1]), 4, scale="batch")
    assert_close(out, t([b, -b, -b, b, 0, 0, 0, 0]))


def test_batch_scale_with_the_whole_batch_std_does_not_depend_on_the_split():
    """Two data-parallel halves, each given the std of all rewards (what the trainer passes
    from its all-reduce), reproduce the one-batch advantages; each half's own std would not."""
    rewards = t([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])  # 3 groups of 4
    whole = group_advantages(rewards, 4, scale="batch")
    std = rewards.std()  # unbiased, as group_advantages
    halves = [rewards[:4], rewards[4:]]
    split = torch.cat([group_advantages(h, 4, scale="batch", batch_std=std) for h in halves])
    assert_close(split, whole)
    own = torch.cat([group_advantages(h, 4, scale="batch") for h in halves])
    assert not torch.allclose(own, whole)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_identical_group_is_exactly_zero(scale):
    # In float32 the mean of seven 0.1s is 0.1 - 7.5e-9, which "group" would divide by eps=1e-6.
    rewards = torch.full((14,), 0.1, dtype=torch.float32)
    assert torch.equal(group_advantages(rewards, 7, scale=scale), torch.zeros(14))
    assert torch.equal(rloo_advantages(rewards, 7), torch.zeros(14))
    assert torch.equal(group_advantages(t([0.3]), 1, scale=scale), t([0.0]))


def test_rloo_by_hand():
    # Reward 1: others [0, 0, 1] average 1/3 -> 2/3. Reward 0: others [1, 0, 1] -> -2/3.
    assert_close(rloo_advantages(t([1, 0, 0, 1]), 4), t([2 / 3, -2 / 3, -2 / 3, 2 / 3]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("G", [2, 4])
def test_group_and_rloo_match_loops(seed, G):
    gen = torch.Generator().manual_seed(seed)
    # Binary rewards make some groups identical; a continuous half exercises the general path.
    binary = torch.randint(0, 2, (4 * G,), generator=gen).to(F64)
    rewards = torch.cat([binary, torch.rand(4 * G, generator=gen, dtype=F64)])
    for scale in ["group", "batch", "none"]:
        expected = group_loop(rewards.tolist(), G, scale, 1e-6)
        assert_close(group_advantages(rewards, G, scale=scale), t(expected))
    assert_close(rloo_advantages(rewards, G), t(rloo_loop(rewards.tolist(), G)))


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 4, scale="std")
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)


def test_gae_by_hand():
    # rewards [0, 0, 1], values [0.5, 0.6, 0.7], gamma 0.9, lam 0.5 (gamma*lam = 0.45):
    #   t=2: delta = 1 + 0.9*0 - 0.7 = 0.3                  A2 = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03               A1 = 0.03 + 0.45*0.3 = 0.165
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04               A0 = 0.04 + 0.45*0.165 = 0.11425
    # returns = A + V = [0.61425, 0.765, 1.0]. A 4th padded token (reward 5, value NaN) must not
    # change anything and gets 0.
    adv, ret = gae(
        t([[0, 0, 1, 5]]), t([[0.5, 0.6, 0.7, math.nan]]), t([[1, 1, 1, 0]]), gamma=0.9, lam=0.5
    )
    assert_close(adv, t([[0.11425, 0.165, 0.3, 0.0]]))
    assert_close(ret, t([[0.61425, 0.765, 1.0, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_gae_matches_loop_on_ragged_masks(seed):
    gen = torch.Generator().manual_seed(seed)
    N, T = 7, 9
    mask = ragged_mask(N, T, gen)
    rewards = torch.randn(N, T, generator=gen, dtype=F64)
    values = torch.randn(N, T, generator=gen, dtype=F64)
    gamma, lam = 0.97, 0.9
    lengths = mask.sum(-1).tolist()
    expected = t(gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam))
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close(adv, expected)
    assert_close(ret, torch.where(mask, expected + values, 0))
    assert not adv.requires_grad


def test_gae_skips_masked_positions_anywhere():
    # Masked positions are skipped, not treated as terminal: left padding and a hole in the
    # middle give the same advantages on the real tokens as the packed right-padded row.
    gen = torch.Generator().manual_seed(9)
    rewards = torch.randn(1, 4, generator=gen, dtype=F64)
    values = torch.randn(1, 4, generator=gen, dtype=F64)
    packed, _ = gae(rewards, values, torch.ones(1, 4), gamma=0.9, lam=0.8)
    spread = torch.tensor([[0, 2, 3, 5, 7]])  # real tokens placed at these columns
    mask = torch.zeros(1, 8, dtype=torch.bool).index_fill(1, spread[0, 1:], True)
    big_r = torch.full((1, 8), 9.0, dtype=F64).index_copy(1, spread[0, 1:], rewards)
    big_v = torch.full((1, 8), 9.0, dtype=F64).index_copy(1, spread[0, 1:], values)
    adv, _ = gae(big_r, big_v, mask, gamma=0.9, lam=0.8)
    assert_close(adv[:, spread[0, 1:]], packed)
    assert_close(adv[~mask], torch.zeros(4, dtype=F64))


# ----------------------------------------------------------------------------- helpers
def test_masked_helpers_and_whiten():
    x = t([[1, 2, 3], [4, 99, 99], [7, 7, 7]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert_close(masked_mean(x, mask, dim=-1), t([2.0, 4.0, 0.0]))  # empty row -> 0, not NaN
    # Valid [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    assert_close(masked_var(x, mask), t(5 / 3))
    assert_close(masked_var(x, mask, unbiased=False), t(5 / 4))
    scale = 1 / math.sqrt(5 / 3 + 1e-8)
    expected = t([[-1.5, -0.5, 0.5], [1.5, 0, 0], [0, 0, 0]]) * scale
    assert_close(whiten(x, mask), expected)
    assert_close(whiten(x, mask, shift_mean=False), torch.where(mask.bool(), expected + 2.5, 0))


def test_entropy_from_logits():
    logits = torch.randn(3, 5, 11, dtype=F64)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert_close(entropy_from_logits(logits), expected)
    assert_close(entropy_from_logits(torch.zeros(4, 7)), torch.full((4,), math.log(7)))
    banned = t([[0.0, -math.inf], [1.0, 1.0]]).requires_grad_()
    ent = entropy_from_logits(banned)
    ent.sum().backward()
    assert_close(ent.detach(), t([0.0, math.log(2)]))
    assert torch.isfinite(banned.grad).all()


def test_entropy_from_logprobs_is_the_plain_formula_and_zero_for_banned_tokens():
    """On finite log-probs exactly ``-(exp(logp) * logp).sum(-1)`` (bit for bit); a -inf
    log-prob adds 0, where the plain formula gives 0 * -inf = NaN."""
    logp = torch.log_softmax(torch.randn(2, 3, 9), dim=-1)
    assert torch.equal(entropy_from_logprobs(logp), -(logp.exp() * logp).sum(-1))
    banned = torch.log_softmax(t([[0.5, -math.inf, 0.5], [2.0, 1.0, 0.0]]), dim=-1)
    assert torch.isnan(-(banned.exp() * banned).sum(-1)[0])
    assert_close(
        entropy_from_logprobs(banned),
        entropy_from_logits(t([[0.5, -math.inf, 0.5], [2.0, 1.0, 0.0]])),
    )
    assert_close(entropy_from_logprobs(banned)[0], t(math.log(2)))


def test_explained_variance_by_hand():
    mask = t([[1, 1, 1, 1, 0]])
    returns = t([[1, 2, 3, 4, 50]])
    # R - V = [0, 0, 0, 1]: mean 0.25, unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25;
    # Var[R] = 5/3, so EV = 1 - 0.25 / (5/3) = 0.85.
    assert_close(explained_variance(t([[1, 2, 3, 3, -9]]), returns, mask), t(0.85))
    assert_close(explained_variance(returns, returns, mask), t(1.0))
    assert_close(explained_variance(torch.zeros(1, 5, dtype=F64), returns, mask), t(0.0))
    assert torch.isnan(explained_variance(returns, torch.ones(1, 5, dtype=F64), mask))


# ----------------------------------------------------------------------------- KL
def test_kl_by_hand():
    # p = 0.5, p_ref = 0.25: log-ratio ref - logp = log 0.5 = -0.6931.
    # k1 = 0.6931; k2 = 0.5 * 0.6931^2 = 0.2402; k3 = 0.5 + 0.6931 - 1 = 0.1931.
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    ln2 = math.log(2)
    assert_close(kl_penalty(logp, ref, "k1"), t([ln2]))
    assert_close(kl_penalty(logp, ref, "k2"), t([0.5 * ln2**2]))
    assert_close(kl_penalty(logp, ref, "k3"), t([0.5 + ln2 - 1]))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "low_var_kl")


def test_k3_is_nonnegative_and_clamped():
    gen = torch.Generator().manual_seed(0)
    logp = 30 * torch.randn(64, 32, generator=gen)
    ref = 30 * torch.randn(64, 32, generator=gen)
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert (kl_penalty(logp / 10, ref / 10, "k3", max_log_ratio=None) >= 0).all()


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_kl_estimators_are_unbiased(kind):
    gen = torch.Generator().manual_seed(0)
    logp_all = torch.log_softmax(torch.randn(6, generator=gen, dtype=F64), -1)
    logq_all = torch.log_softmax(torch.randn(6, generator=gen, dtype=F64), -1)
    exact = (logp_all.exp() * (logp_all - logq_all)).sum()
    M = 200_000
    x = torch.multinomial(logp_all.exp(), M, replacement=True, generator=gen)
    samples = kl_penalty(logp_all[x], logq_all[x], kind)
    # The sample mean is within 4 standard errors (std / sqrt(M)) of its expectation with
    # probability > 0.9999; a biased estimator with bias above that would fail.
    stderr = samples.std() / math.sqrt(M)
    assert abs(samples.mean() - exact) < 4 * stderr


# ----------------------------------------------------------------------------- aggregate
def test_aggregate_by_hand():
    per_token = t([[1, 2, 3], [4, 50, 50], [7, 7, 7]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # Valid tokens 1+2+3+4 = 10 over 4 tokens; sequence means 2, 4, 0 (empty row); sums 6, 4, 0.
    assert_close(aggregate(per_token, mask, "token-mean"), t(10 / 4))
    assert_close(aggregate(per_token, mask, "seq-mean-token-mean"), t((2 + 4 + 0) / 3))
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum"), t(10 / 3))
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum-norm"), t(10 / (3 * 3)))
    assert_close(aggregate(per_token, mask, "seq-mean-token-sum-norm", norm_constant=5), t(10 / 15))
    empty = torch.zeros(2, 3, dtype=F64)
    for mode in AGG_MODES:
        assert_close(aggregate(per_token[:2], empty, mode), t(0.0))
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(per_token, mask, "mean")


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_gradcheck(mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, dtype=F64, requires_grad=True)
    mask = ragged_mask(5, 4, gen)
    assert torch.autograd.gradcheck(lambda x: aggregate(x, mask, mode), (x,))


def _split_sum(fn, N, chunks):
    """Sum of ``fn(rows)`` over ``chunks`` consecutive micro-batches of the N rows."""
    size = N // chunks
    return sum(fn(slice(i * size, (i + 1) * size)) for i in range(chunks))


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_aggregate_microbatch_invariance(mode, chunks):
    gen = torch.Generator().manual_seed(1)
    N, T = 8, 6
    mask = ragged_mask(N, T, gen)
    x = torch.randn(N, T, generator=gen, dtype=F64, requires_grad=True)
    full = aggregate(x**2, mask, mode)
    (full_grad,) = torch.autograd.grad(full, x)
    counts = dict(num_tokens=mask.sum(), num_seqs=N)
    total = _split_sum(lambda s: aggregate(x[s] ** 2, mask[s], mode, **counts), N, chunks)
    (split_grad,) = torch.autograd.grad(total, x)
    assert_close(total, full)
    assert_close(split_grad, full_grad)


def test_local_counts_break_accumulation():
    # Why the global counts matter: with per-micro-batch token counts, two halves holding
    # different numbers of tokens do not sum to the full-batch token mean.
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()
    x = t([[1, 1, 1], [1, 1, 1], [4, 0, 0], [0, 0, 0]])
    full = aggregate(x, mask, "token-mean")  # 10 / 7
    local = _split_sum(lambda s: aggregate(x[s], mask[s], "token-mean"), 4, 2)  # 6/6 + 4/1
    assert_close(full, t(10 / 7))
    assert_close(local, t(5.0))


# ----------------------------------------------------------------------------- policy losses
def _ratio_case(ratios, adv, **kw):
    """Loss on single-token sequences with the given ratios (old_logp = 0)."""
    logp = torch.log(t(ratios))[:, None].requires_grad_()
    loss, metrics = policy_loss(logp, torch.zeros_like(logp), t(adv), torch.ones_like(logp), **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, metrics, grad[:, 0]


def test_ppo_clip_by_hand():
    # clip 0.2; per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2   clipped (high), no gradient
    #   r=0.5, A=+1: max(-0.5, -0.8) = -0.5   unclipped, d/dlogp = -A r = -0.5
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8   clipped (low), no gradient
    #   r=1.1, A=-1: max( 1.1,  1.1) =  1.1   inside, d/dlogp = -A r = 1.1
    # token mean = (-1.2 - 0.5 + 0.8 + 1.1) / 4 = 0.05; gradients are divided by 4 too.
    loss, m, grad = _ratio_case([1.5, 0.5, 0.5, 1.1], [1, 1, -1, -1])
    assert_close(loss, t(0.05))
    assert_close(grad, t([0, -0.5, 0, 1.1]) / 4)
    assert_close(m["clipfrac"], t(0.5))
    assert_close(m["clipfrac_low"], t(0.25))
    assert_close(m["clipfrac_high"], t(0.25))
    assert_close(m["ratio_mean"], t((1.5 + 0.5 + 0.5 + 1.1) / 4))
    # approx_kl: mean of k3 = (r - 1) - log r over the four ratios.
    kl = sum(r - 1 - math.log(r) for r in [1.5, 0.5, 0.5, 1.1]) / 4
    assert_close(m["approx_kl"], t(kl))
    assert "dual_clipfrac" not in m
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())


def test_clip_higher_by_hand():
    # r=1.25, A=+1: symmetric 0.2 clips at 1.2 (loss -1.2, no gradient); clip_high=0.28 leaves
    # it inside (loss -1.25, gradient -1.25). r=0.75, A=-1 is clipped low at 0.8 either way.
    sym, _, sym_grad = _ratio_case([1.25, 0.75], [1, -1], clip_low=0.2)
    hi, m, hi_grad = _ratio_case([1.25, 0.75], [1, -1], clip_low=0.2, clip_high=0.28)
    assert_close(sym, t((-1.2 + 0.8) / 2))
    assert_close(sym_grad, t([0.0, 0.0]))
    assert_close(hi, t((-1.25 + 0.8) / 2))
    assert_close(hi_grad, t([-1.25 / 2, 0.0]))
    assert_close(m["clipfrac_high"], t(0.0))
    assert_close(m["clipfrac_low"], t(0.5))


def test_dual_clip_by_hand():
    # c = 3: A=-1, r=5: PPO loss max(5, 1.2) = 5 is capped at -A c = 3 (no gradient);
    # A=-1, r=2: loss 2 < 3 is kept (gradient -A r = 2); A=+1, r=5: clipped -1.2, no cap.
    loss, m, grad = _ratio_case([5.0, 2.0, 5.0], [-1, -1, 1], dual_clip=3.0)
    assert_close(loss, t((3 + 2 - 1.2) / 3))
    assert_close(grad, t([0.0, 2.0, 0.0]) / 3)
    assert_close(m["dual_clipfrac"], t(1 / 3))
    plain, _, _ = _ratio_case([5.0, 2.0, 5.0], [-1, -1, 1])
    assert_close(plain, t((5 + 2 - 1.2) / 3))
    with pytest.raises(ValueError, match="dual_clip"):
        _ratio_case([1.0], [1.0], dual_clip=1.0)


def _policy_inputs(seed, N=6, T=5):
    gen = torch.Generator().manual_seed(seed)
    mask = ragged_mask(N, T, gen)
    old = -torch.rand(N, T, generator=gen, dtype=F64) * 3
    logp = (old + 0.3 * torch.randn(N, T, generator=gen, dtype=F64)).requires_grad_()
    adv = torch.randn(N, generator=gen, dtype=F64)
    return logp, old, adv, mask


@pytest.mark.parametrize("name", ["ppo", "gspo"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_losses_gradcheck(name, mode):
    fn = get_policy_loss(name)
    logp, old, adv, mask = _policy_inputs(0)
    for kw in [{}, {"clip_high": 0.28, "dual_clip": 1.5}]:
        assert torch.autograd.gradcheck(
            lambda lp, kw=kw: fn(lp, old, adv, mask, agg=mode, **kw)[0], (logp,)
        )


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_broadcast_advantages_match_per_token(name):
    fn = get_policy_loss(name)
    logp, old, adv, mask = _policy_inputs(1)
    loss_n, _ = fn(logp, old, adv, mask)
    (grad_n,) = torch.autograd.grad(loss_n, logp)
    loss_nt, _ = fn(logp, old, adv[:, None].expand_as(logp), mask)
    (grad_nt,) = torch.autograd.grad(loss_nt, logp)
    assert_close(loss_n, loss_nt)
    assert_close(grad_n, grad_nt)
    with pytest.raises(ValueError, match="advantages"):
        fn(logp, old, adv[:3], mask)


@pytest.mark.parametrize("name", ["ppo", "gspo"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_losses_microbatch_invariance(name, mode):
    fn = get_policy_loss(name)
    logp, old, adv, mask = _policy_inputs(2, N=8)
    full, _ = fn(logp, old, adv, mask, agg=mode)
    counts = dict(num_tokens=mask.sum(), num_seqs=8)
    split = _split_sum(lambda s: fn(logp[s], old[s], adv[s], mask[s], agg=mode, **counts)[0], 8, 4)
    assert_close(split, full)


def test_padding_garbage_does_not_leak():
    logp, old, adv, mask = _policy_inputs(3)
    adv_nt = adv[:, None].expand_as(logp)
    clean = [f(logp, old, adv_nt, mask)[0] for f in (policy_loss, gspo_loss)]
    clean_grads = [torch.autograd.grad(c, logp)[0] for c in clean]
    dirty_old = torch.where(mask, old, -1e4)  # exp(logp + 1e4) overflows if not masked
    dirty_adv = torch.where(mask, adv_nt, math.nan)
    for f, c, g in zip((policy_loss, gspo_loss), clean, clean_grads):
        loss, _ = f(logp, dirty_old, dirty_adv, mask)
        (grad,) = torch.autograd.grad(loss, logp)
        assert_close(loss, c)
        assert_close(grad, g)


def test_gspo_matches_sequence_level_reference():
    logp, old, adv, mask = _policy_inputs(4)
    loss, _ = gspo_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logp)
    # GSPO objective written per sequence: s_i = (prod_t pi / pi_old)^(1/|y_i|), clipped like
    # PPO, averaged over all N sequences (an empty one contributes nothing).
    terms = []
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        s = torch.exp((logp[i, :n] - old[i, :n]).sum() / n)
        terms.append(torch.maximum(-adv[i] * s, -adv[i] * s.clamp(0.8, 1.2)))
    ref = torch.stack(terms).sum() / logp.shape[0]
    (ref_grad,) = torch.autograd.grad(ref, logp)
    assert_close(loss, ref)
    assert_close(grad, ref_grad)


def test_gspo_sequence_ratio_by_hand():
    # Sequence 1: log-ratios [log 2, log 0.5] -> geometric mean 1, inside the clip: loss -A = -1.
    # Sequence 2: log-ratios [log 1.5, log 1.5] -> s = 1.5, A = +1, clipped: loss -1.2.
    # seq-mean-token-mean = (-1 - 1.2) / 2; ratio_mean over the 4 tokens = (1 + 1 + 1.5 + 1.5) / 4.
    logp = torch.log(t([[2, 0.5], [1.5, 1.5]]))
    loss, m = gspo_loss(logp, torch.zeros(2, 2, dtype=F64), t([1, 1]), torch.ones(2, 2),
                        agg="seq-mean-token-mean")  # fmt: skip
    assert_close(loss, t(-1.1))
    assert_close(m["ratio_mean"], t(1.25))
    assert_close(m["clipfrac"], t(0.5))


# ----------------------------------------------------------------------------- value loss
def test_value_loss_by_hand():
    # R = 2, V_old = 1, clip 0.2 (clipped V in [0.8, 1.2]):
    #   V=1.5: max((1.5-2)^2, (1.2-2)^2) = max(0.25, 0.64) = 0.64 -> 0.32, clipped, no gradient
    #   V=1.1: inside, (1.1-2)^2 = 0.81 -> 0.405, gradient (V - R) = -0.9
    #   V=0.5: max(2.25, (0.8-2)^2 = 1.44) = 2.25 -> 1.125, unclipped, gradient -1.5
    # token mean = (0.32 + 0.405 + 1.125) / 3; gradients / 3.
    values = t([[1.5, 1.1, 0.5, math.nan]]).requires_grad_()
    old, returns, mask = t([[1, 1, 1, 0]]), t([[2, 2, 2, math.nan]]), t([[1, 1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask)
    (grad,) = torch.autograd.grad(loss, values)
    assert_close(loss, t(1.85 / 3))
    assert_close(grad, t([[0, -0.9, -1.5, 0]]) / 3)
    assert_close(m["vf_clipfrac"], t(1 / 3))
    assert_close(m["value_mean"], t(3.1 / 3))
    # No clipping: 0.5 * (0.25 + 0.81 + 2.25) / 3.
    loss, m = value_loss(values, old, returns, mask, clip=None)
    assert_close(loss, t(0.5 * 3.31 / 3))
    assert_close(m["vf_clipfrac"], t(0.0))


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_gradcheck(clip):
    gen = torch.Generator().manual_seed(5)
    mask = ragged_mask(5, 4, gen)
    old = torch.randn(5, 4, generator=gen, dtype=F64)
    values = (old + 0.3 * torch.randn(5, 4, generator=gen, dtype=F64)).requires_grad_()
    returns = torch.randn(5, 4, generator=gen, dtype=F64)
    for mode in AGG_MODES:
        assert torch.autograd.gradcheck(
            lambda v, mode=mode: value_loss(v, old, returns, mask, clip=clip, agg=mode)[0],
            (values,),
        )


# ----------------------------------------------------------------------------- registries
def test_registry_unknown_names_list_valid_ones():
    with pytest.raises(ValueError) as err:
        get_advantage_estimator("ppo")
    assert all(name in str(err.value) for name in ["gae", "grpo", "rloo"])
    with pytest.raises(ValueError) as err:
        get_policy_loss("grpo")
    assert "ppo" in str(err.value) and "gspo" in str(err.value)


def test_registry_rejects_duplicates_and_accepts_new_names():
    original = ADVANTAGE_ESTIMATORS["grpo"]
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="already registered"):
        register_policy_loss("ppo")(lambda *a, **k: None)
    assert ADVANTAGE_ESTIMATORS["grpo"] is original and POLICY_LOSSES["ppo"] is policy_loss
    try:
        fn = register_policy_loss("test_only_loss")(policy_loss)
        assert get_policy_loss("test_only_loss") is fn
    finally:
        POLICY_LOSSES.pop("test_only_loss", None)


def _signature(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_registries_share_one_signature():
    signatures = {name: _signature(fn) for name, fn in ADVANTAGE_ESTIMATORS.items()}
    assert len({str(s) for s in signatures.values()}) == 1, signatures
    signatures = {name: _signature(fn) for name, fn in POLICY_LOSSES.items()}
    assert len({str(s) for s in signatures.values()}) == 1, signatures


def test_every_estimator_runs_with_the_one_signature():
    gen = torch.Generator().manual_seed(6)
    N, T, G = 8, 5, 4
    mask = ragged_mask(N, T, gen)
    token_rewards = torch.where(mask, torch.randn(N, T, generator=gen, dtype=F64), 0)
    values = torch.randn(N, T, generator=gen, dtype=F64)
    kw = dict(group_size=G, gamma=0.99, lam=0.9, scale="group", eps=1e-6)
    seq_rewards = token_rewards.sum(-1)
    expected_seq = {
        "grpo": group_advantages(seq_rewards, G),
        "rloo": rloo_advantages(seq_rewards, G),
    }
    assert set(ADVANTAGE_ESTIMATORS) == set(expected_seq) | {"gae"}
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        adv, ret = fn(token_rewards, mask, values, **kw)
        assert adv.shape == ret.shape == (N, T)
        if name == "gae":
            assert_close((adv, ret), gae(token_rewards, values, mask, gamma=0.99, lam=0.9))
        else:
            assert_close(adv, torch.where(mask, expected_seq[name][:, None], 0))
            assert_close(ret, adv)
            assert_close(fn(token_rewards, mask, None, **kw)[0], adv)  # values unused
    # Dr. GRPO is "grpo" with scale="none".
    dr_grpo, _ = get_advantage_estimator("grpo")(
        token_rewards, mask, None, **{**kw, "scale": "none"}
    )
    assert_close(
        dr_grpo, torch.where(mask, group_advantages(seq_rewards, G, scale="none")[:, None], 0)
    )
    with pytest.raises(ValueError, match="values"):
        get_advantage_estimator("gae")(token_rewards, mask, None, **kw)
    logp, old, adv, mask = _policy_inputs(7)
    for fn in POLICY_LOSSES.values():
        loss, metrics = fn(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                           agg="token-mean", num_tokens=None, num_seqs=None,
                           norm_constant=None)  # fmt: skip
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert {"clipfrac", "approx_kl", "ratio_mean", "dual_clipfrac"} <= set(metrics)


def test_module_has_no_item_calls():
    assert ".item()" not in inspect.getsource(algos)


# ----------------------------------------------------------------------------- DAPO shaping
def test_groups_with_signal_marks_groups_whose_rewards_differ():
    rewards = torch.tensor([1.0, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0.25])
    assert algos.groups_with_signal(rewards, 4).tolist() == [False, True, False, True]
    # G = 1: one sample never disagrees with itself.
    assert not algos.groups_with_signal(torch.tensor([0.0, 1.0]), 1).any()


def test_groups_with_signal_agrees_with_zero_group_advantages():
    torch.manual_seed(0)
    rewards = torch.randint(0, 2, (64,)).float()
    zero = (group_advantages(rewards, 4).view(-1, 4) == 0).all(-1)
    assert torch.equal(algos.groups_with_signal(rewards, 4), ~zero)


def test_overlong_penalty_hand_values():
    # L_max = 6, L_cache = 2: no penalty up to 4 tokens, then (4 - |y|) / 2, -1 beyond 6.
    lengths = torch.tensor([1, 4, 5, 6, 7])
    out = algos.overlong_penalty(lengths, max_len=6, buffer=2)
    assert out.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert algos.overlong_penalty(lengths, max_len=6, buffer=2, penalty=0.5).tolist() == [
        0.0, 0.0, -0.25, -0.5, -0.5,
    ]  # fmt: skip
    # L_cache = 4: (2 - |y|) / 4 from 3 tokens on.
    assert algos.overlong_penalty(lengths, max_len=6, buffer=4).tolist() == [
        0.0, -0.5, -0.75, -1.0, -1.0,
    ]  # fmt: skip
    assert algos.overlong_penalty(lengths, max_len=6, buffer=0).tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="buffer"):
        algos.overlong_penalty(lengths, max_len=6, buffer=7)


def test_mask_truncated_zeroes_truncated_rows_only():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    truncated = torch.tensor([False, True, False])
    out = algos.mask_truncated(mask, truncated)
    assert out.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]] and out.dtype == mask.dtype


# ----------------------------------------------------------------------------- rollout vs training
def test_logprob_mismatch_hand_values():
    train = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -3.0, -1.0]])
    sampling = torch.tensor([[-1.5, -2.0, float("inf")], [-0.5, -2.8, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = algos.logprob_mismatch(train, sampling, mask)
    # log rho = train - sampling on valid tokens: 0.5, 0, 0, -0.2 (padding ignored, even NaN/inf).
    # k3 = rho - 1 - log rho: e^0.5 - 1.5 = 0.1487213, 0, 0, e^-0.2 - 0.8 = 0.0187308.
    assert_close(out["abs_sum"], torch.tensor(0.7))
    assert_close(out["abs_max"], torch.tensor(0.5))
    assert_close(out["kl_sum"], torch.tensor(math.exp(0.5) - 1.5 + math.exp(-0.2) - 0.8))
    assert out["tokens"] == 4


def test_logprob_mismatch_is_zero_when_the_engines_agree():
    torch.manual_seed(0)
    logp = -torch.rand(4, 5) * 3
    out = algos.logprob_mismatch(logp, logp.clone(), torch.ones(4, 5))
    assert out["abs_sum"] == 0 and out["abs_max"] == 0 and out["kl_sum"] == 0


def test_rollout_is_weights_hand_values():
    # Row 0: token ratios 3, 0.5, 1.5 (product 2.25); row 1: 0.9 then padding.
    sampling = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    log_rho = torch.tensor([[math.log(3), math.log(0.5), math.log(1.5)], [math.log(0.9), 50, 50]])
    train = sampling + log_rho
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])

    def w(mode, level):
        return algos.rollout_is_weights(train, sampling, mask, mode=mode, level=level, cap=2.0)

    # TIS per token: min(rho, 2); MIS per token: rho if rho <= 2 else 0. Padding gets 0.
    assert_close(w("truncate", "token"), torch.tensor([[2.0, 0.5, 1.5], [0.9, 0, 0]]))
    assert_close(w("mask", "token"), torch.tensor([[0.0, 0.5, 1.5], [0.9, 0, 0]]))
    # Per sequence: row 0's ratio 2.25 > 2 is truncated to 2 or masked to 0; row 1's is 0.9.
    assert_close(w("truncate", "sequence"), torch.tensor([[2.0, 2.0, 2.0], [0.9, 0, 0]]))
    assert_close(w("mask", "sequence"), torch.tensor([[0.0, 0.0, 0.0], [0.9, 0, 0]]))


def test_rollout_is_weights_are_exactly_one_when_the_engines_agree():
    torch.manual_seed(0)
    logp = -torch.rand(3, 6) * 4
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    for mode in algos.ROLLOUT_IS_MODES:
        for level in algos.ROLLOUT_IS_LEVELS:
            w = algos.rollout_is_weights(logp, logp.clone(), mask, mode=mode, level=level, cap=1.0)
            assert torch.equal(w, mask.float()), (mode, level)


def test_rollout_is_weights_do_not_overflow_and_reject_bad_arguments():
    train, sampling, mask = torch.tensor([[400.0, 0]]), torch.zeros(1, 2), torch.ones(1, 2)
    for level in algos.ROLLOUT_IS_LEVELS:
        w = algos.rollout_is_weights(train, sampling, mask, level=level, cap=3.0)
        assert torch.isfinite(w).all() and w[0, 0] == 3.0
    with pytest.raises(ValueError, match="cap"):
        algos.rollout_is_weights(train, sampling, mask, cap=0.5)
    with pytest.raises(ValueError, match="mode"):
        algos.rollout_is_weights(train, sampling, mask, mode="clip")
    with pytest.raises(ValueError, match="level"):
        algos.rollout_is_weights(train, sampling, mask, level="group")


@pytest.mark.parametrize("loss_fn", [policy_loss, gspo_loss])
def test_policy_loss_weights_scale_each_token(loss_fn):
    # On-policy (ratio 1): per-token loss -A. A = [1, -2], weights [[2, 0.5], [1, 0]]:
    # token-mean = (-1*2 - 1*0.5 + 2*1 + 2*0) / 4 = -0.125; d loss / d logp = -A * w / 4.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    adv, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 2)
    weights = torch.tensor([[2.0, 0.5], [1.0, 0.0]])
    loss, _ = loss_fn(logp, logp.detach(), adv, mask, weights=weights)
    assert_close(loss, torch.tensor(-0.125))
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.5, -0.125], [0.5, 0.0]]))
    # Weights of one change nothing, bit for bit.
    ones, _ = loss_fn(logp, logp.detach() + 0.1, adv, mask, weights=torch.ones(2, 2))
    none, _ = loss_fn(logp, logp.detach() + 0.1, adv, mask)
    assert torch.equal(ones, none)


# ----------------------------------------------------------------------------- entropy bonus
def test_entropy_bonus_hand_values():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # token-mean: -0.1 * (1 + 2 + 3) / 3 = -0.2; seq-mean-token-mean: -0.1 * (1.5 + 3) / 2.
    assert_close(algos.entropy_bonus(entropy, mask, coef=0.1), torch.tensor(-0.2))
    got = algos.entropy_bonus(entropy, mask, coef=0.1, agg="seq-mean-token-mean")
    assert_close(got, torch.tensor(-0.225))
    # Global counts as for the policy loss: 6 tokens in the whole minibatch.
    assert_close(algos.entropy_bonus(entropy, mask, coef=0.1, num_tokens=6), torch.tensor(-0.1))
