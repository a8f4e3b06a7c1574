"""grpo_lab.answer: benchmark choice and parsing, the numbers, and the document from synthetic runs."""

import math

import pytest
from sweep_helpers import write_run

from grpo_lab.answer import analysis as an
from grpo_lab.answer.document import Inputs, workload_w, write_document
from grpo_lab.answer.measure import bench_runs, last_json_line
from grpo_lab.sweep import aggregate_sweep


def test_last_json_line_reads_only_the_last_line():
    assert last_json_line('progress\n{"a": 1}\n\n') == {"a": 1}
    assert last_json_line('{"a": 1}\ndone\n') is None  # the JSON must be last
    assert last_json_line("[1, 2]\n") is None
    assert last_json_line('{"torn": \n') is None


def _fake_bench(tmp_path, presets, impls):
    script = tmp_path / "step_bench.py"
    script.write_text(
        "from dataclasses import dataclass\n\n\n@dataclass(frozen=True)\nclass P:\n    x: int\n\n\n"
        f"PRESETS = {{k: P(1) for k in {presets!r}}}\nIMPLS = {impls!r}\n"
    )
    return script


def test_bench_runs_prefers_mid_with_matched_impls_else_tiny_twice(tmp_path):
    mid = _fake_bench(
        tmp_path, ["tiny", "mid"], ("trl", "grpo", "ppo_head_matched", "ppo_critic_matched")
    )
    (run,) = bench_runs(mid)
    # The implementations the benchmark offers, in MID_IMPLS order (no standard PPO offered here).
    at = run.argv.index("--preset")
    assert run.argv[at : at + 4] == (
        "--preset",
        "mid",
        "--impls",
        "grpo,ppo_head_matched,ppo_critic_matched,trl",
    )
    assert run.argv[at + 4 :] == ("--rounds", "2", "--steps", "3", "--warmup", "1")
    old = _fake_bench(tmp_path, ["tiny", "w0.5b"], ("trl", "grpo", "ppo_head", "ppo_critic"))
    standard, matched = bench_runs(old, rounds=2)
    assert "--set" not in standard.argv and standard.rename == {}
    # PPO at GRPO's schedule through overrides from grpo_lab.objectives.MATCHED_UPDATES.
    assert matched.argv[-4:] == (
        "--set",
        "trainer.epochs=1",
        "--set",
        "trainer.num_minibatches=1",
    )
    assert matched.rename == {"ppo_head": "ppo_head_matched", "ppo_critic": "ppo_critic_matched"}


def _facts(variant, seed, ev=(), zero_std=(), update=(), **kw):
    per_step = {
        an.EV_KEY: list(enumerate(ev, 1)),
        "reward/zero_std_groups": list(enumerate(zero_std, 1)),
        "time/update_s": list(enumerate(update, 1)),
    }
    base = dict(
        steps=len(ev) or len(update),
        spent_s=1.0,
        median_step_s=1.0,
        heldout_before=0.3,
        heldout_after=0.4,
        peak_rss_gib=1.0,
        static_gib=1.0,
    )
    return an.RunFacts(variant=variant, seed=seed, per_step=per_step, **{**base, **kw})


def test_explained_variance_early_late_and_positive_share():
    # 20 steps: the first 10 % is 2 steps, the last 10 % is 2 steps.
    ev0 = [-4.0, -2.0] + [0.0] * 16 + [0.5, -0.5]  # early -3, late 0, positive late 1/2
    ev1 = [-2.0, -2.0] + [0.0] * 16 + [0.5, 0.5]  # early -2, late 0.5, positive late 1
    facts = [_facts("ppo_head", 0, ev=ev0), _facts("ppo_head", 1, ev=ev1), _facts("grpo", 0)]
    e = an.explained_variance(facts, "ppo_head")
    assert e.early.mean == pytest.approx(-2.5) and e.late.mean == pytest.approx(0.25)
    assert e.positive_late.mean == pytest.approx(0.75)
    assert an.explained_variance(facts, "grpo") is None


def test_skip_bins_pool_steps_by_fraction_and_keep_well_filled_bins():
    # grpo: 3 steps at 0.25 (0.1, 0.2, 0.3 s -> 0.2) and 1 at 0.5; all rows: 3 at 0.25 (0.4 s).
    facts = [
        _facts("grpo", 0, zero_std=[0.25, 0.25, 0.25, 0.5], update=[0.1, 0.2, 0.3, 0.9]),
        _facts("all", 0, zero_std=[0.25, 0.25, 0.25], update=[0.4, 0.4, 0.4]),
    ]
    (b,) = an.skip_bins(facts, ("grpo", "all"), min_steps=3)
    assert b.fraction == 0.25 and b.steps == {"grpo": 3, "all": 3}
    assert b.update_s["grpo"] == pytest.approx(0.2) and b.update_s["all"] == pytest.approx(0.4)
    assert an.skip_bins(facts, ("grpo", "all"), min_steps=4) == []


def test_paired_ratios_and_bench_arms():
    facts = [
        _facts("grpo", 0, median_step_s=1.0),
        _facts("grpo", 1, median_step_s=2.0),
        _facts("ppo", 0, median_step_s=2.0),
        _facts("ppo", 1, median_step_s=6.0),
    ]
    assert an.paired(facts, "ppo", "grpo", "median_step_s").mean == pytest.approx(2.5)  # (2+3)/2
    bench = {
        "preset": "mid",
        "bench_run": "b",
        "results": {
            "grpo": {"step_s_summary": {"median": 2.0}, "mem_gib": 4.0},
            "ppo_critic_matched": {"step_s": [3.0, 4.0, 100.0], "mem_gib": 6.0},
        },
    }
    arms = {a.objective: a for a in an.bench_arms([bench])}
    assert arms["ppo_critic_matched"].time_ratio == pytest.approx(2.0)  # median 4 / 2
    assert arms["ppo_critic_matched"].memory_ratio == pytest.approx(1.5)


def test_workload_w_is_copied_only_when_measured(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Workload W\n\nNot run yet.\n")
    assert workload_w(results) == (None, [])
    results.write_text(
        "# Results\n\n## Workload W (GPU)\n\nDevice: NVIDIA H200\nDate: 2026-12-02\n\n"
        "| impl | step s |\n|---|---|\n| grpo | 1.0 |\n\n## Other\n\nx\n"
    )
    device, body = workload_w(results)
    assert device == "NVIDIA H200"
    assert "| grpo | 1.0 |" in body and "x" not in body


def test_document_from_synthetic_sweeps_states_the_answer(tmp_path):
    # Benefit sweep: grpo 2 s/step, ppo_head_matched 3 s/step, two seeds each -> ratio 1.5x
    # (seed 0: 3/2, seed 1: 3.5/2.5 = 1.4; mean 1.45).
    benefit = tmp_path / "benefit"
    for seed, (g, h) in enumerate([(2.0, 3.0), (2.5, 3.5)]):
        write_run(
            benefit / "grpo" / f"seed{seed}", step_s=g, onset=5, rss=1, gen_tps=1, eval_acc=0.5
        )
        write_run(
            benefit / "ppo_head_matched" / f"seed{seed}",
            step_s=h,
            onset=8,
            rss=1,
            gen_tps=1,
            eval_acc=0.45,
        )
    skipping = tmp_path / "skip"
    for seed in (0, 1):
        write_run(skipping / "grpo" / f"seed{seed}", step_s=1.0, onset=3, rss=1, gen_tps=1)
        write_run(skipping / "grpo_all_rows" / f"seed{seed}", step_s=2.0, onset=3, rss=1, gen_tps=1)
    summary = aggregate_sweep(benefit, baseline="grpo", target_accuracy=0.5)
    skip = aggregate_sweep(skipping, baseline="grpo")
    bench = {
        "preset": "tiny",
        "bench_run": "step_bench_tiny_matched",
        "argv": ["benchmarks/step_bench.py", "--preset", "tiny"],
        "memory_metric": "rss delta",
        "results": {
            "grpo": {"step_s_summary": {"median": 0.02}, "mem_gib": 0.01},
            "ppo_head_matched": {"step_s_summary": {"median": 0.03}, "mem_gib": 0.01},
        },
    }
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# nothing on W\n")
    out = tmp_path / "docs" / "answer.md"
    write_document(
        Inputs(
            machine="test machine",
            date="2026-12-01",
            load=(0.5, 0.5),
            cores=2,
            benefit=summary,
            skipping=skip,
            benches=[bench],
            results_md=results_md,
            command="make answer",
            runs=tmp_path,
        ),
        out,
    )
    text = out.read_text()
    first = text.split("**Answer")[1].split("\n")[0]
    assert "1.45×" in first  # paired step-time ratio of the sweep
    assert "1.50×" in first  # the step benchmark's 0.03 / 0.02
    assert "Not measured yet" in text and "--preset w0.5b" in text
    assert "test machine, 2026-12-01" in text
    rows = (out.parent / "answer" / "answer.csv").read_text().splitlines()
    ratio = next(r for r in rows if r.startswith("step time ratio ppo_head_matched/grpo (sweep)"))
    assert math.isclose(float(ratio.split(",")[1]), 1.45)


def test_mean_curve_keeps_steps_that_half_the_seeds_reached():
    # Seed 0 logs steps 1-3 (EV 0, 1, 2), seed 1 steps 1-2 (EV 2, 3), seed 2 step 1 (EV 4):
    # step 1 mean (0+2+4)/3 = 2, step 2 (1+3)/2 = 2, step 3 has 1 of 3 seeds and is dropped.
    facts = [
        _facts("ppo", 0, ev=[0.0, 1.0, 2.0]),
        _facts("ppo", 1, ev=[2.0, 3.0]),
        _facts("ppo", 2, ev=[4.0]),
    ]
    assert an.mean_curve(facts, "ppo", an.EV_KEY) == [
        {"step": 1, an.EV_KEY: 2.0},
        {"step": 2, an.EV_KEY: 2.0},
    ]


def test_conditions_are_recorded_only_by_invocations_that_measured(tmp_path):
    from grpo_lab.answer.measure import record_conditions

    path = tmp_path / "conditions.json"
    assert record_conditions(path, False, (1.0, 2.0), 0.1) == [] and not path.exists()
    (first,) = record_conditions(path, True, (9.8, 7.3), 23.0)
    assert (first["load_start"], first["load_end"], first["minutes"]) == (9.8, 7.3, 23.0)
    # A later regeneration that reused everything keeps the measuring invocation's conditions.
    assert record_conditions(path, False, (0.5, 0.5), 0.1) == [first]


def test_bench_arms_fall_back_on_the_benchmarks_own_ratios():
    # No memory figure per impl, only ratios to TRL: 0.9 / 0.6 = 1.5x GRPO's memory.
    bench = {
        "results": {"grpo": {"step_s": [1.0]}, "ppo_head_matched": {"step_s": [1.1]}},
        "ratios": {"grpo": {"time": 0.5, "memory": 0.6}, "ppo_head_matched": {"memory": 0.9}},
    }
    arms = {a.objective: a for a in an.bench_arms([bench])}
    assert arms["ppo_head_matched"].memory_ratio == pytest.approx(1.5)
    assert arms["ppo_head_matched"].time_ratio == pytest.approx(1.1)  # from the step times
