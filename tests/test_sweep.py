import csv
import json
import math
import sys
import time
from pathlib import Path

import pytest
import yaml

from grpo_lab import sweep
from grpo_lab.sweep import (
    SweepError,
    aggregate_sweep,
    load_sweep,
    mean_ci,
    moving_average,
    plan_runs,
    ratio,
    read_metrics,
    run_command,
    run_sweep,
    student_t_cdf,
    t_quantile,
    time_to_target,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
T1 = 12.706204736  # t_{0.975, 1}: two seeds give half-width T1 * |a - b| / 2 (s = |a-b|/sqrt 2)


# ------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        # Standard two-sided 95 % / 90 % / 99 % critical values (any printed t table).
        (0.975, 1, 12.7062047),
        (0.975, 2, 4.3026527),
        (0.975, 3, 3.1824463),
        (0.975, 4, 2.7764451),
        (0.975, 9, 2.2621572),
        (0.975, 30, 2.0422725),
        (0.975, 100, 1.9839715),
        (0.95, 5, 2.0150484),
        (0.995, 4, 4.6040949),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-7)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, rel=1e-7)


def test_t_quantile_median_is_zero():
    assert t_quantile(0.5, 7) == 0.0


def _t_cdf_by_integration(t: float, df: int, n: int = 20000) -> float:
    """P(T <= t) = 1/2 + integral_0^t of the t density, by Simpson's rule (independent of the series)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    h = t / n
    total = pdf(0.0) + pdf(t)
    total += sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + total * h / 3


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 31])
@pytest.mark.parametrize("t", [-2.5, 0.3, 1.0, 4.0])
def test_t_cdf_series_matches_integrated_density(df, t):
    assert student_t_cdf(t, df) == pytest.approx(_t_cdf_by_integration(t, df), abs=1e-9)


def test_t_cdf_known_closed_forms():
    # df = 1 is Cauchy: F(1) = 1/2 + atan(1)/pi = 0.75. df = 2: F(t) = 1/2 + t / (2 sqrt(t^2 + 2)),
    # so F(1) = 1/2 + 1 / (2 sqrt 3) = 0.7886751.
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)
    assert student_t_cdf(1.0, 2) == pytest.approx(0.5 + 1 / (2 * math.sqrt(3)))


def test_mean_ci_hand_values():
    # [1, 2, 3]: mean 2, s = sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, t_{0.975,2} = 4.302653,
    # half-width = 4.302653 * 1 / sqrt(3) = 2.484138.
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(2.484138, abs=1e-6)
    # [2, 4] at 90 %: mean 3, s = sqrt 2, t_{0.95,1} = 6.313752, half = 6.313752 * sqrt2 / sqrt2.
    mean, half = mean_ci([2.0, 4.0], confidence=0.90)
    assert mean == 3.0
    assert half == pytest.approx(6.313752, abs=1e-6)
    # Identical values: s = 0, so no spread.
    assert mean_ci([5.0, 5.0, 5.0]) == (5.0, 0.0)


def test_mean_ci_single_value_has_no_interval_and_empty_is_an_error():
    mean, half = mean_ci([0.7])
    assert mean == 0.7
    assert math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci([])


def test_moving_average_hand_values_and_loop_reference():
    # window 3 over [3, 6, 9, 0]: [3/1, 9/2, 18/3, 15/3].
    assert moving_average([3.0, 6.0, 9.0, 0.0], 3) == [3.0, 4.5, 6.0, 5.0]
    values = [0.1 * ((7 * i) % 11) for i in range(40)]
    for window in (1, 4, 10, 50):
        loop = [
            sum(values[max(0, i - window + 1) : i + 1])
            / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        assert moving_average(values, window) == pytest.approx(loop)
    with pytest.raises(ValueError):
        moving_average(values, 0)


def test_time_to_target_counts_only_full_windows():
    steps = list(range(1, 16))
    wall = [2.0 * s for s in steps]
    # Five zeros then ten ones: the 10-step mean at index 9 (step 10) is 5/10 = 0.5 -> reaches 0.5
    # exactly there; 0.51 needs 6 ones -> index 10 (step 11, wall 22).
    acc = [0.0] * 5 + [1.0] * 10
    assert time_to_target(steps, acc, 0.5, wall_s=wall) == sweep.TargetHit(10, 20.0)
    assert time_to_target(steps, acc, 0.51, wall_s=wall) == sweep.TargetHit(11, 22.0)
    assert time_to_target(steps, acc, 0.51) == sweep.TargetHit(11, None)
    # A perfect first step alone does not count: the first full window (steps 1-10) averages 0.1.
    lucky = [1.0] + [0.0] * 14
    assert time_to_target(steps, lucky, 0.5) is None
    # Fewer steps than the window: never reached.
    assert time_to_target([1, 2, 3], [1.0, 1.0, 1.0], 0.5) is None
    with pytest.raises(ValueError):
        time_to_target([1, 2], [1.0], 0.5)


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(math.nan, 1.0) is None


# ------------------------------------------------------------------------------- synthetic runs


def write_run(
    run_dir: Path,
    *,
    step_s: float,
    onset: int,
    level: float = 1.0,
    rss: float,
    gen_tps: float,
    eval_acc: float | None = None,
    n: int = 20,
    finished: bool = True,
) -> None:
    """A metrics.jsonl with known numbers.

    Step 1 takes 10 s, the others ``step_s``; reward/accuracy is 0 before ``onset`` and ``level``
    from it. Phases: rollout 0.5 x, update 0.25 x the step time, reward 0.1 s on even steps only.
    RSS peak grows to ``rss`` at the last step. With ``eval_acc``, eval rows at step 0 (0.1) and n.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [] if eval_acc is None else [{"step": 0, "eval/greedy_acc": 0.1, "eval/n": 16}]
    total = 0.0
    for s in range(1, n + 1):
        dt = 10.0 if s == 1 else step_s
        total += dt
        acc = level if s >= onset else 0.0
        row = {
            "step": s,
            "reward/mean": acc,
            "reward/accuracy": acc,
            "time/step_s": dt,
            "time/total_s": total,
            "time/rollout_s": 0.5 * dt,
            "time/update_s": 0.25 * dt,
            "mem/rss_gib": 0.5,
            "mem/rss_peak_gib": rss * s / n,
            "perf/gen_tokens_per_s": gen_tps,
            "perf/mfu": None,
        }
        if s % 2 == 0:
            row["time/reward_s"] = 0.1
        if s == 1:
            row["mem/static/policy_params_gib"] = 0.01
        rows.append(row)
    if eval_acc is not None:
        rows.append({"step": n, "eval/greedy_acc": eval_acc, "eval/n": 16})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(text)
    if finished:
        (run_dir / "DONE").write_text("{}\n")


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


# ------------------------------------------------------------------------------- sweep files


def write_sweep(tmp_path: Path, body: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def base_body(tmp_path: Path, **changes) -> dict:
    body = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "base": str(RECIPES / "tiny_arith_grpo.yaml"),
        "seeds": [0, 1],
        "overrides": {"trainer.max_steps": 30},
        "variants": {"grpo": {}, "ppo_head": {"recipe": str(RECIPES / "tiny_arith_ppo_head.yaml")}},
        "baseline": "grpo",
        "target_accuracy": 0.5,
    }
    body.update(changes)
    return body


@pytest.mark.parametrize("path", sorted((RECIPES / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load_and_their_runs_validate(path):
    spec = load_sweep(path)
    runs = plan_runs(spec)
    assert len(runs) == len(spec.variants) * len(spec.seeds) >= 6
    sweep.check_runs(spec, runs)
    assert path.read_text().startswith(f"# grpo-lab sweep recipes/sweeps/{path.name}\n")


def test_relative_paths_are_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "recipes" / "sweeps").mkdir(parents=True)
    (tmp_path / "recipes" / "r.yaml").write_text("algorithm: grpo\n")
    path = write_sweep(tmp_path / "recipes" / "sweeps", {"base": "../r.yaml"})
    spec = load_sweep(path)
    assert spec.base == (tmp_path / "recipes" / "r.yaml").resolve()
    assert spec.name == "s" and spec.output_dir == Path("runs/sweeps/s")
    assert list(spec.variants) == ["r"] and spec.baseline == "r" and spec.seeds == (0,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sedes": [0]}, r"unknown key sedes \(did you mean 'seeds'\?\)"),
        ({"base": None}, r"base: missing"),
        ({"base": "nope.yaml"}, r"base: file 'nope.yaml' not found"),
        ({"baseline": "ppo"}, r"baseline: unknown variant 'ppo'; variants: grpo, ppo_head"),
        ({"variants": {"grpo": {"recpie": "x"}}}, r"unknown key variants\.grpo\.recpie"),
        ({"variants": {"a/b": {}}}, r"variants\.a/b: a variant name is a folder name"),
        ({"seeds": [0, 0]}, r"seeds: values repeat"),
        ({"seeds": 3}, r"seeds: expected a non-empty list of integers"),
        ({"overrides": {"seed": 1}}, r"overrides\.seed: the sweep sets each run's seed"),
        ({"overrides": {"trainer": {"lr": 1}}}, r"overrides\.trainer: a mapping"),
        (
            {"grid": {"rollout.group_size": 4}},
            r"grid\.rollout\.group_size: expected a non-empty list",
        ),
        ({"target_accuracy": 2}, r"target_accuracy: expected a number in \[0, 1\]"),
        ({"launch": "missing.yaml"}, r"launch: file 'missing.yaml' not found"),
    ],
)
def test_sweep_file_errors_name_the_file_and_key(tmp_path, change, message):
    path = write_sweep(tmp_path, base_body(tmp_path, **change))
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SweepError, match="sweep file not found"):
        load_sweep(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0\n")
    with pytest.raises(SweepError, match=f"{bad}: not valid YAML"):
        load_sweep(bad)


def test_command_line_overrides(tmp_path):
    path = write_sweep(tmp_path, base_body(tmp_path, grid={"rollout.group_size": [4, 8]}))
    spec = load_sweep(path, ["seeds=[3]", f"output_dir={tmp_path / 'o2'}", "trainer.lr=1.0e-5"])
    assert spec.seeds == (3,) and spec.output_dir == tmp_path / "o2"
    assert spec.extra_overrides == ("trainer.lr=1.0e-5",)
    for bad, message in [
        ("seed=1", "override seed: the sweep sets each run's seed"),
        ("grid={}", "override grid: edit `grid` in the sweep file"),
        ("rollout.group_size=2", "override rollout.group_size: the grid sweeps it"),
        ("novalue", "override 'novalue': expected key=value"),
    ]:
        with pytest.raises(SweepError, match=message):
            load_sweep(path, [bad])


def test_plan_folders_order_and_overrides(tmp_path):
    body = base_body(tmp_path, grid={"rollout.group_size": [4, 8]},
                     overrides={"trainer.max_steps": 30, "trainer.lr": 1e-6, "data.ops": ["+", "-"],
                                "trainer.micro_batch_size": 16})  # fmt: skip
    body["variants"]["ppo_head"]["overrides"] = {"ppo.vf_coef": 0.5}
    spec = load_sweep(write_sweep(tmp_path, body), ["model.dtype=float32"])
    runs = plan_runs(spec)
    out = tmp_path / "out"
    # Seed-major: every configuration of seed 0 first.
    assert [r.dir for r in runs[:4]] == [
        out / "grpo__rollout.group_size=4" / "seed0",
        out / "grpo__rollout.group_size=8" / "seed0",
        out / "ppo_head__rollout.group_size=4" / "seed0",
        out / "ppo_head__rollout.group_size=8" / "seed0",
    ]
    assert runs[4].dir == out / "grpo__rollout.group_size=4" / "seed1"
    assert runs[2].overrides == (
        "trainer.max_steps=30",
        "trainer.lr=1.0e-06",  # not "1e-06", which YAML 1.1 reads as a string
        "data.ops=[+, -]",
        "trainer.micro_batch_size=16",
        "ppo.vf_coef=0.5",
        "rollout.group_size=4",
        "model.dtype=float32",
        f"output_dir={out / 'ppo_head__rollout.group_size=4' / 'seed0'}",
        "seed=0",
    )
    cmd = runs[2].command(resume=True)
    assert cmd[:3] == [sys.executable, "-m", "grpo_lab.train"]
    assert cmd[-1] == "resume=auto"
    sweep.check_runs(spec, runs)


def test_launch_builds_an_accelerate_command(tmp_path):
    body = base_body(tmp_path, launch=str(RECIPES / "accelerate" / "cpu.yaml"))
    run = plan_runs(load_sweep(write_sweep(tmp_path, body)))[0]
    cmd = run.command()
    i = cmd.index("--config_file")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert Path(cmd[i + 1]).resolve() == (RECIPES / "accelerate" / "cpu.yaml").resolve()
    assert cmd[i + 2 : i + 4] == ["-m", "grpo_lab.train"]


def test_invalid_run_config_fails_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_command", lambda cmd, log, env=None: calls.append(cmd) or 0)
    path = write_sweep(tmp_path, base_body(tmp_path, overrides={"trainer.max_stepz": 2}))
    with pytest.raises(SweepError, match=r"4 run\(s\) have an invalid config"):
        run_sweep(path)
    assert calls == []


# ------------------------------------------------------------------------------- running


def fake_runner(calls: list, fail: set[str] = frozenset()):
    """Records each command; writes synthetic metrics into its output_dir; fails runs in ``fail``."""

    def run(cmd, log_path, *, env=None):
        calls.append(list(cmd))
        out = Path(next(a for a in cmd if a.startswith("output_dir=")).partition("=")[2])
        label = f"{out.parent.name}/{out.name}"
        log_path.write_text(f"training {label}\n")
        if label in fail:
            (out / "config.yaml").write_text("started\n")
            return 1
        write_run(out, step_s=1.0, onset=1, rss=1.0, gen_tps=10.0, finished=False)
        return 0

    return run


def test_restart_skips_finished_and_failed_runs_are_reported(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep, "run_command", fake_runner(calls, fail={"grpo/seed1"}))
    path = write_sweep(tmp_path, base_body(tmp_path))
    first = run_sweep(path)
    out = tmp_path / "out"
    # All four runs were tried although the third failed.
    assert len(calls) == 4
    assert [r.label for r, _ in first.failed] == ["grpo/seed1"]
    assert first.exit_code == 1
    assert json.loads((out / "grpo" / "seed1" / "FAILED").read_text())["exit_code"] == 1
    assert (out / "grpo" / "seed1" / "train.log").read_text() == "training grpo/seed1\n"
    assert (out / "ppo_head" / "seed1" / "DONE").exists()
    printed = capsys.readouterr().out
    assert "[3/4] grpo/seed1: FAILED (exit 1)" in printed
    assert "1 of 4 runs failed" in printed
    # The report was written from the three finished runs.
    assert first.summary is not None
    assert [g.n_seeds for g in first.summary.groups] == [1, 2]
    assert "| `grpo/seed1` | failed |" in first.summary.report_path.read_text()

    # Restart: only the failed run runs again, resuming because the trainer had started it.
    monkeypatch.setattr(sweep, "run_command", fake_runner(calls))
    second = run_sweep(path)
    assert len(calls) == 5
    assert calls[4][-1] == "resume=auto" and "output_dir=" + str(out / "grpo" / "seed1") in calls[4]
    assert second.exit_code == 0 and len(second.skipped) == 3
    assert not (out / "grpo" / "seed1" / "FAILED").exists()
    assert [g.n_seeds for g in second.summary.groups] == [2, 2]

    # A third invocation has nothing to do; a final/ folder also counts as finished.
    (out / "grpo" / "seed0" / "DONE").unlink()
    (out / "grpo" / "seed0" / "final").mkdir()
    third = run_sweep(path)
    assert len(calls) == 5 and len(third.skipped) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["group"] for r in manifest["runs"]] == ["grpo", "ppo_head", "grpo", "ppo_head"]
    commands = third.summary.report_path.read_text().split("```bash\n")[1].split("```")[0]
    assert commands.count("-m grpo_lab.train") == 4 and "resume=auto" not in commands


def test_dry_run_prints_and_runs_nothing(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sweep, "run_command", fake_runner(calls))
    result = run_sweep(write_sweep(tmp_path, base_body(tmp_path)), dry_run=True)
    printed = capsys.readouterr().out
    assert calls == [] and not (tmp_path / "out").exists()
    assert len(result.runs) == 4
    assert printed.count("-m grpo_lab.train") == 4
    assert "[4/4] ppo_head/seed1 (would start)" in printed


def test_report_only_aggregates_what_is_there(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_command", fake_runner(calls))
    path = write_sweep(tmp_path, base_body(tmp_path))
    run_sweep(path)
    (tmp_path / "out" / "report.md").unlink()
    result = run_sweep(path, report_only=True)
    assert len(calls) == 4 and result.summary.report_path.exists()
    assert result.summary.target_accuracy == 0.5 and result.summary.baseline == "grpo"


def test_run_command_tees_output_and_returns_the_exit_code(tmp_path, capsys):
    log = tmp_path / "run" / "train.log"
    code = run_command([sys.executable, "-c", "print('héllo'); raise SystemExit(3)"], log)
    assert code == 3
    text = log.read_text()
    assert text.startswith("=== ") and text.endswith("héllo\n")
    assert "héllo" in capsys.readouterr().out
    run_command([sys.executable, "-c", "print('again')"], log)
    assert log.read_text().count("=== ") == 2  # attempts are appended, not overwritten


# ------------------------------------------------------------------------------- end to end


def test_end_to_end_tiny_sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    body = {
        "name": "e2e",
        "output_dir": "sweep",
        "base": str(RECIPES / "tiny_arith_grpo.yaml"),
        "seeds": [0],
        "overrides": {
            "trainer.max_steps": 2,
            "trainer.warmup_steps": 0,
            "data.num_eval": 16,
            "rollout.prompts_per_step": 4,
            "rollout.group_size": 4,
            "trainer.micro_batch_size": 8,
        },
        "variants": {"grpo": {}, "ppo_head": {"recipe": str(RECIPES / "tiny_arith_ppo_head.yaml")}},
        "target_accuracy": 0.5,
    }
    path = write_sweep(tmp_path, body)
    start = time.monotonic()
    result = run_sweep(path)
    elapsed = time.monotonic() - start
    assert result.exit_code == 0, [
        (r.label, (r.dir / "train.log").read_text()[-2000:]) for r, _ in result.failed
    ]
    out = tmp_path / "sweep"
    for variant in ("grpo", "ppo_head"):
        run_dir = out / variant / "seed0"
        for name in ("config.yaml", "metrics.jsonl", "train.log", "DONE"):
            assert (run_dir / name).exists(), (run_dir, name)
        train, evals = read_metrics(run_dir / "metrics.jsonl")
        assert [r["step"] for r in train] == [1, 2]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["grpo", "ppo_head"]
    assert all(float(r["step_time_s_mean"]) > 0 for r in rows)
    assert (out / "report.md").stat().st_size > 0
    print(f"end-to-end sweep of 2 runs took {elapsed:.1f} s")
