"""The controlled benchmark reward: seeded group rewards, the same for grpo_lab and TRL."""

import random

import pytest

from grpo_lab.rewards import ControlledReward
from grpo_lab.rewards.controlled import zero_std_fraction

G = 8


def test_every_group_has_signal_by_default():
    reward = ControlledReward(G, seed=0)
    for key in map(str, range(500)):
        group = reward.group_rewards(key)
        assert len(group) == G and set(group) <= {0.0, 1.0}
        assert 1 <= sum(group) <= G - 1  # k successes, k in 1..G-1: never all equal


def test_success_counts_cover_one_to_g_minus_one_uniformly():
    reward = ControlledReward(G, seed=1)
    counts = [int(sum(reward.group_rewards(str(i)))) for i in range(7000)]
    # k uniform on 1..7: 1000 expected per value, binomial sd ~ 29; 6 sd = 175.
    for k in range(1, G):
        assert abs(counts.count(k) - 1000) < 175


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_stated_fraction_of_groups_has_no_signal(fraction):
    reward = ControlledReward(G, zero_std_fraction=fraction, seed=2)
    n = 4000
    equal = sum(len(set(reward.group_rewards(f"p{i}"))) == 1 for i in range(n))
    # Bernoulli(fraction) per group: sd <= sqrt(n / 4) ~ 32; allow 6 sd.
    assert abs(equal - fraction * n) <= 190
    if fraction in (0.0, 1.0):
        assert equal == fraction * n


def test_rewards_depend_on_seed_and_key_only_not_on_order_or_completions():
    reward = ControlledReward(G, seed=3)
    keys = ["a"] * G + ["b"] * G
    first = reward.scores(keys)
    assert first[:G] == reward.group_rewards("a") and first[G:] == reward.group_rewards("b")
    # The other group first, and a fresh object: the same rewards per (key, position).
    swapped = ControlledReward(G, seed=3).scores(["b"] * G + ["a"] * G)
    assert swapped[:G] == first[G:] and swapped[G:] == first[:G]
    results = reward(["x"] * (2 * G), keys)
    assert [r.score for r in results] == first
    assert {r.status for r in results} <= {"correct", "wrong"}
    assert ControlledReward(G, seed=4).scores(keys) != first


def test_trl_adapter_gives_the_same_rewards_and_records_the_zero_std_fraction():
    reward = ControlledReward(G, zero_std_fraction=0.5, seed=5)
    keys = [str(k) for k in random.Random(0).sample(range(1000), 6) for _ in range(G)]
    trl_reward = reward.for_trl("answer")
    # Called as TRL 1.16's GRPOTrainer._calculate_rewards calls a reward function.
    got = trl_reward(
        prompts=["p"] * len(keys),
        completions=["c"] * len(keys),
        completion_ids=[[1]] * len(keys),
        answer=keys,
        trainer_state=None,
    )
    assert got == reward.scores(keys)
    assert trl_reward.zero_std_fractions == [zero_std_fraction(got, G)]
    assert trl_reward.__name__ == "controlled_reward"
    with pytest.raises(KeyError, match="answer"):
        trl_reward(prompts=["p"], completions=["c"], solution=["1"])


def test_zero_std_fraction_counts_groups_with_all_equal_rewards():
    # Groups [1,1], [0,1], [0,0]: two of three are all equal.
    assert zero_std_fraction([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], 2) == 2 / 3


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(group_size=1), "group_size"), (dict(group_size=4, zero_std_fraction=1.5), "zero_std")],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ControlledReward(**kwargs)
