"""DAPO dynamic sampling with refill: which groups a step keeps, how many rounds it draws, and
that the decision to draw again is global across processes."""

from __future__ import annotations

import pytest
import torch

from grpo_lab import algos
from grpo_lab.dynamic_sampling import sample_with_signal
from grpo_lab.rollout import RolloutBatch

G, PAD = 2, 0


def fake_round(tag: int, group_rewards: list[tuple[float, float]], completion_len: int):
    """A round of len(group_rewards) groups; every token id is ``tag * 100 + row`` so rows can be
    traced back to their round, and each round has its own completion length."""
    n = len(group_rewards) * G
    ids = torch.arange(n)[:, None] + 100 * tag + 1  # [n, 1]
    batch = RolloutBatch(
        prompt_ids=ids.repeat(1, 2),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=ids.repeat(1, completion_len),
        completion_mask=torch.ones(n, completion_len, dtype=torch.long),
        sampling_logp=-torch.ones(n, completion_len),
        truncated=torch.zeros(n, dtype=torch.bool),
        group_size=G,
    )
    rewards = torch.tensor([r for g in group_rewards for r in g])
    return batch, rewards, [f"r{tag}/{i}" for i in range(n)]


def drawer(rounds):
    calls = []

    def draw():
        calls.append(1)
        return rounds[len(calls) - 1]

    return draw, calls


def signal(batch, rewards):
    return algos.groups_with_signal(rewards, G)


def run(rounds, wanted, max_extra, global_sum=lambda t: t):
    draw, calls = drawer(rounds)
    out = sample_with_signal(
        draw,
        signal,
        groups_wanted=wanted,
        max_extra_rounds=max_extra,
        global_sum=global_sum,
        pad_id=PAD,
    )
    return (*out, len(calls))


def first_token(batch):
    return batch.completion_ids[:, 0].tolist()


def test_a_full_first_round_is_returned_unchanged():
    rounds = [fake_round(0, [(1, 0), (0, 1)], 3)]
    batch, rewards, results, metrics, _, n_calls = run(rounds, 2, 4)
    assert n_calls == 1
    assert first_token(batch) == [1, 2, 3, 4] and rewards.tolist() == [1, 0, 0, 1]
    assert results == ["r0/0", "r0/1", "r0/2", "r0/3"]
    assert metrics == {
        "rollout/groups_sampled": 2.0,
        "rollout/groups_filtered": 0.0,
        "rollout/groups_with_signal": 2.0,
        "rollout/extra_rounds": 0.0,
    }


def test_refill_keeps_groups_with_signal_from_later_rounds():
    # Round 0: group 1 only has signal; round 1 (longer completions): group 0 has signal.
    rounds = [
        fake_round(0, [(1, 1), (1, 0), (0, 0)], 2),
        fake_round(1, [(0, 1), (1, 1), (0, 0)], 4),
        fake_round(2, [(0, 1), (0, 1), (0, 1)], 1),  # never drawn
    ]
    batch, rewards, results, metrics, sampled, n_calls = run(rounds, 2, 4)
    assert n_calls == 2
    # Everything sampled, in round order, for the reward statistics.
    assert first_token(sampled[0]) == [1, 2, 3, 4, 5, 6, 101, 102, 103, 104, 105, 106]
    assert sampled[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0] and len(sampled[2]) == 12
    # Round 0's group 1 (rows 2, 3), then round 1's group 0 (rows 0, 1).
    assert first_token(batch) == [3, 4, 101, 102]
    assert rewards.tolist() == [1, 0, 0, 1]
    assert results == ["r0/2", "r0/3", "r1/0", "r1/1"]
    # Completions padded to the longest round (4): round 0's rows have 2 real tokens.
    assert batch.completion_ids.shape == (4, 4)
    assert batch.completion_mask.sum(1).tolist() == [2, 2, 4, 4]
    assert (batch.completion_ids[:2, 2:] == PAD).all()
    assert metrics["rollout/groups_sampled"] == 6 and metrics["rollout/groups_filtered"] == 4
    assert metrics["rollout/groups_with_signal"] == 2 and metrics["rollout/extra_rounds"] == 1


def test_the_cap_stops_refilling_and_tops_up_with_dropped_groups():
    rounds = [fake_round(k, [(0, 0), (1, 1), (0, 1) if k == 1 else (1, 1)], 2) for k in range(5)]
    batch, rewards, results, metrics, _, n_calls = run(rounds, 3, 2)
    assert n_calls == 3  # the first round and 2 extra
    # The one group with signal (round 1, group 2), then the earliest dropped: round 0's.
    assert first_token(batch) == [105, 106, 1, 2, 3, 4]
    assert metrics["rollout/groups_with_signal"] == 1 and metrics["rollout/extra_rounds"] == 2
    assert metrics["rollout/groups_filtered"] == 8
    # max_extra_rounds = 0: filter only, the batch is the first round, signal first.
    batch, *_, metrics, _, n_calls = run(rounds[1:], 3, 0)
    assert n_calls == 1 and first_token(batch) == [105, 106, 101, 102, 103, 104]


def test_another_round_runs_while_any_process_is_short():
    """This process is full after round 0, but the other one is short until round 1: both must
    draw round 1 (the rollout and its collectives are made by every process)."""
    rounds = [fake_round(k, [(1, 0), (0, 1)], 2) for k in range(3)]
    other = iter(
        [
            torch.tensor([1]),  # round 0: the other process is short
            torch.tensor([0]),  # round 1: it is full
            torch.tensor([4.0, 1.0, 2.0]),  # its sampled / filtered / with-signal counts
        ]
    )
    batch, rewards, results, metrics, _, n_calls = run(rounds, 2, 4, lambda t: t + next(other))
    assert n_calls == 2
    assert first_token(batch) == [1, 2, 3, 4]  # this process's first two groups
    assert metrics["rollout/extra_rounds"] == 1
    assert metrics["rollout/groups_sampled"] == 4 + 4 and metrics["rollout/groups_filtered"] == 1
    assert metrics["rollout/groups_with_signal"] == 2 + 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="groups_wanted"):
        run([fake_round(0, [(1, 0)], 1)], 0, 1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_refill_together(tmp_path):
    """The DAPO recipe under two CPU processes (DeepSpeed ZeRO-2, gloo): each process fills its
    own share of groups, rounds are decided globally, so the run neither hangs nor diverges. With
    2 prompts per process and 8 steps the two processes often need different numbers of rounds
    (~17 s)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from grpo_lab.harness import MetricsWriter

    root = Path(__file__).resolve().parents[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file",
           str(root / "recipes" / "accelerate" / "zero2_cpu.yaml"),
           "--main_process_port", str(_free_port()), "-m", "grpo_lab.train",
           str(root / "recipes" / "tiny_arith_dapo.yaml"), f"output_dir={tmp_path}",
           "trainer.max_steps=8", "rollout.prompts_per_step=4", "data.num_eval=8",
           "trainer.progress_bar=false"]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in MetricsWriter.read(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 8
    for r in rows:
        rounds = 1 + r["rollout/extra_rounds"]
        assert r["rollout/groups_sampled"] == 4 * rounds
        assert r["rollout/groups_with_signal"] <= 4
    assert any(r["rollout/extra_rounds"] > 0 for r in rows)
