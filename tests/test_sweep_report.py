"""grpo_lab.sweep.summary and .report: run folders with known numbers read back into the tables."""

import csv
import json

import pytest
from sweep_helpers import write_run

from grpo_lab.sweep import SweepError, aggregate_sweep, read_metrics

T1 = 12.706204736  # t_{0.975, 1}: two seeds give half-width T1 * |a - b| / 2 (s = |a-b|/sqrt 2)


# grpo: seed0 step 2 s, accuracy from step 11; seed1 step 2.5 s, from step 13; held-out evals.
# ppo_head: seed0 step 3 s, from 11; seed1 step 3.5 s, 0.8 from 15; no evals (train accuracy).
RUNS = {
    ("grpo", 0): dict(step_s=2.0, onset=11, rss=1.0, gen_tps=100.0, eval_acc=0.6),
    ("grpo", 1): dict(step_s=2.5, onset=13, rss=1.2, gen_tps=120.0, eval_acc=0.7),
    ("ppo_head", 0): dict(step_s=3.0, onset=11, rss=1.5, gen_tps=50.0),
    ("ppo_head", 1): dict(step_s=3.5, onset=15, level=0.8, rss=1.9, gen_tps=70.0),
}


def test_read_metrics_splits_dedupes_and_skips_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 0, "eval/greedy_acc": 0.1},
        {"step": 1, "reward/mean": 0.0, "time/step_s": 1.0},
        {"step": 2, "reward/mean": 0.5},
        {"step": 2, "reward/mean": 0.7},  # a resumed run rewrote step 2
        {"step": 2, "eval/greedy_acc": 0.4},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "rew')
    train, evals = read_metrics(path)
    assert [r["step"] for r in train] == [1, 2]
    assert train[1]["reward/mean"] == 0.7
    assert [(r["step"], r["eval/greedy_acc"]) for r in evals] == [(0, 0.1), (2, 0.4)]


def test_aggregate_synthetic_runs_hand_computed(tmp_path):
    for (variant, seed), kw in RUNS.items():
        write_run(tmp_path / variant / f"seed{seed}", **kw)
    # An unfinished third seed must be listed but not counted.
    write_run(tmp_path / "ppo_head" / "seed2", step_s=1.0, onset=1, rss=9.0, gen_tps=1.0,
              n=5, finished=False)  # fmt: skip
    # A torn last line (a killed writer) is skipped.
    with open(tmp_path / "grpo" / "seed1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "reward/acc')

    summary = aggregate_sweep(tmp_path, baseline="grpo", target_accuracy=0.45)

    with open(summary.csv_path, newline="") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["grpo", "ppo_head"]
    g, p = rows["grpo"], rows["ppo_head"]

    def check(row, key, mean, half, rat):
        assert float(row[f"{key}_mean"]) == pytest.approx(mean), key
        assert float(row[f"{key}_ci95"]) == pytest.approx(half), key
        assert float(row[f"{key}_ratio"]) == pytest.approx(rat), key

    assert g["n_seeds"] == p["n_seeds"] == "2"
    # Peak RSS is the last step's: grpo 1.0, 1.2; ppo 1.5, 1.9.
    check(g, "peak_mem_gib", 1.1, T1 * 0.1, 1.0)
    check(p, "peak_mem_gib", 1.7, T1 * 0.2, 1.7 / 1.1)
    assert g["peak_mem_source"] == "cpu"
    # Median of [10, step_s x 19] is step_s: grpo 2, 2.5; ppo 3, 3.5.
    check(g, "step_time_s", 2.25, T1 * 0.25, 1.0)
    check(p, "step_time_s", 3.25, T1 * 0.25, 3.25 / 2.25)
    # grpo: held-out 0.6, 0.7 (not the training accuracy of 1.0); ppo: mean accuracy of the last
    # 10 % = last 2 steps: 1.0 and 0.8.
    check(g, "final_acc", 0.65, T1 * 0.05, 1.0)
    check(p, "final_acc", 0.9, T1 * 0.1, 0.9 / 0.65)
    assert (g["final_acc_source"], p["final_acc_source"]) == ("eval", "train")
    # 10-step mean >= 0.45: ones from step o give (s - o + 1)/10, so 5 ones -> step o + 4
    # (grpo 15, 17; ppo seed0 15). ppo seed1 has 0.8s from 15: 0.8 k / 10 >= 0.45 -> k = 6 -> 20.
    # Wall-clock there = 10 + step_s (s - 1): grpo 38, 50; ppo 52, 10 + 3.5 * 19 = 76.5.
    check(g, "target_steps", 16.0, T1 * 1.0, 1.0)
    check(p, "target_steps", 17.5, T1 * 2.5, 17.5 / 16)
    check(g, "target_wall_s", 44.0, T1 * 6.0, 1.0)
    check(p, "target_wall_s", 64.25, T1 * 12.25, 64.25 / 44)
    assert g["target_reached"] == p["target_reached"] == "2"
    check(p, "gen_tokens_per_s", 60.0, T1 * 10.0, 60.0 / 110.0)
    assert p["mfu_mean"] == ""  # logged as null everywhere
    # Phases: rollout = 0.5 x mean step time; grpo seed0 mean step (10 + 19 x 2)/20 = 2.4,
    # seed1 (10 + 19 x 2.5)/20 = 2.875 -> rollout 1.2, 1.4375. reward ran on half the steps: 0.05.
    # other = step - phases = 0.25 x mean step - 0.05 -> 0.55, 0.66875.
    assert float(g["time_rollout_s_mean"]) == pytest.approx((1.2 + 1.4375) / 2)
    assert float(g["time_reward_s_mean"]) == pytest.approx(0.05)
    assert float(g["time_other_s_mean"]) == pytest.approx((0.55 + 0.66875) / 2)

    for path in [summary.report_path, summary.csv_path, *summary.plots]:
        assert path.stat().st_size > 0
    names = {p.name for p in summary.plots}
    assert names == {"reward_vs_step.png", "reward_vs_wallclock.png", "memory_per_phase.png",
                     "step_time.png", "tokens_per_s.png"}  # fmt: skip
    for path in summary.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = summary.report_path.read_text()
    sections = [report.index(h) for h in ("## Result", "## Time per step", "## Memory", "## Plots")]
    assert sections == sorted(sections)
    result = report[sections[0] : sections[1]]
    grpo_line = next(line for line in result.splitlines() if line.startswith("| **grpo**"))
    ppo_line = next(line for line in result.splitlines() if line.startswith("| **ppo_head**"))
    assert "(baseline)" in grpo_line and "(1.00×)" in grpo_line
    assert "(1.55×)" in ppo_line  # peak memory 1.7 / 1.1
    assert "held-out greedy" in grpo_line and "train reward/accuracy" in ppo_line
    for png in names:
        assert f"]({png})" in report
    assert "`ppo_head/seed2` | partial" in report


def test_aggregate_reports_target_not_reached_and_single_seed(tmp_path):
    write_run(tmp_path / "a" / "seed0", step_s=1.0, onset=100, rss=1.0, gen_tps=1.0)
    write_run(tmp_path / "b" / "seed0", step_s=1.0, onset=1, rss=2.0, gen_tps=1.0)
    summary = aggregate_sweep(tmp_path, target_accuracy=0.5)
    assert summary.baseline == "a"
    with open(summary.csv_path, newline="") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert rows["a"]["target_reached"] == "0" and rows["a"]["target_steps_mean"] == ""
    assert rows["b"]["target_steps_mean"] == "10.0"  # all ones: the first full window
    assert rows["b"]["peak_mem_gib_ci95"] == ""  # one seed: no interval
    assert rows["b"]["peak_mem_gib_ratio"] == "2.0"
    assert rows["b"]["target_steps_ratio"] == ""  # baseline never got there
    assert "not reached" in summary.report_path.read_text()


def test_aggregate_without_runs_is_an_error(tmp_path):
    with pytest.raises(SweepError, match="no runs found"):
        aggregate_sweep(tmp_path)


def test_report_separates_the_value_model_from_the_extra_epochs(tmp_path):
    # Per seed (step time = median of the steps after the first): grpo 2 / 4 s,
    # ppo_head_matched 3 / 5 s, ppo_head 6 / 15 s.
    # value head at matched updates: (3/2 + 5/4) / 2 = 1.375; extra epochs: (6/3 + 15/5) / 2 = 2.5.
    for variant, times in {
        "grpo": (2.0, 4.0),
        "ppo_head_matched": (3.0, 5.0),
        "ppo_head": (6.0, 15.0),
    }.items():
        for seed, step_s in enumerate(times):
            write_run(
                tmp_path / variant / f"seed{seed}", step_s=step_s, onset=5, rss=1.0, gen_tps=1.0
            )
    aggregate_sweep(tmp_path, baseline="grpo")
    report = (tmp_path / "report.md").read_text()
    assert "## What the cost is made of" in report
    head = next(line for line in report.splitlines() if line.startswith("| value head at"))
    extra = next(line for line in report.splitlines() if line.startswith("| PPO's extra epochs"))
    assert "| 1.38 ±" in head and "| 2.50 ±" in extra
    assert "critic" not in report.split("## What the cost is made of")[1].split("##")[0].lower()
