"""sweep.summary: reading a run's metrics.jsonl by the one rule for bad lines."""

import json

import pytest

from grpo_lab.sweep import read_metrics


def test_read_metrics_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "reward/mean": 0.0}, {"step": 2, "eval/greedy_acc": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')
    train, evals = read_metrics(path)
    assert [r["step"] for r in train] == [1] and [r["step"] for r in evals] == [2]
    # The same torn record followed by whole ones was not cut off by a kill: an error.
    path.write_text('{"step": 1, "reward/mean": 0.0}\n{"step": 3, "rew\n{"step": 4}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_a_corrupt_run_in_a_sweep_is_a_sweep_error(tmp_path):
    from grpo_lab.sweep import SweepError
    from grpo_lab.sweep.summary import summarise_run

    run = tmp_path / "grpo" / "seed0"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(SweepError, match=r"seed0/metrics\.jsonl:2"):
        summarise_run(run, group="grpo", variant="grpo", grid={}, seed=0, target_accuracy=None)
