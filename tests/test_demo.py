"""The embedded demo: every objective learns in the same number of steps; the static memory
ratios; the table; the command line's budget (slow part: ~6 min on 2 cores)."""

import pytest

from grpo_lab.cli import main
from grpo_lab.demo import BUDGET_S, format_table, run_demo
from grpo_lab.objectives import OBJECTIVES

# The test gives every objective the same number of steps, so what it checks does not depend on
# how fast the machine is (``make demo`` gives them the same time, which does). Training and the
# seeded evaluation are deterministic on one CPU; another CPU rounds differently and follows
# another trajectory. Seeds 0-3 stand in for that spread; measured at 400 steps (2-core AMD EPYC,
# 2026-12-01), start -> end gains in points, greedy / sampled:
#
#   objective             seed 0        seed 1        seed 2        seed 3
#   GRPO                  +7.8 / +4.9   +8.2 / +4.7   +10.9 / +5.4  -0.6 / +2.8
#   PPO-head              +6.8 / +4.3   +11.3 / +4.1  +9.0 / +3.7   +14.5 / +4.2
#   PPO-critic            +13.7 / +6.3  +14.6 / +4.9  +9.0 / +5.0   +11.1 / +5.5
#   PPO-head, matched     +7.8 / +2.6   +9.2 / +2.3   +9.4 / +2.2   +9.8 / +1.8
#   PPO-critic, matched   +10.5 / +3.4  +10.5 / +3.4  +11.3 / +2.8  +10.5 / +3.2
STEPS = 400


@pytest.mark.slow
def test_every_objective_learns_in_the_same_number_of_steps(tmp_path):
    rows = run_demo(budget_s=None, steps=STEPS, seed=0, output_dir=str(tmp_path))
    assert [r["objective"] for r in rows] == list(OBJECTIVES)
    for r in rows:
        assert r["steps"] == STEPS, r
        b, a = r["before"], r["after"]
        # Sampled accuracy (512 problems x 8 samples at temperature 1, start and end drawn with
        # the same seed) is what RL optimises: every objective raises it by a point; the lowest
        # of the 20 runs above gained 1.8.
        assert a["eval/pass@1"] >= b["eval/pass@1"] + 0.01, (r["objective"], b, a)
        # Greedy accuracy on the same 512 problems moves in bigger jumps (a problem flips as a
        # whole): PPO's four arms raise it by 3 points (lowest of 16 runs: +6.8). GRPO's greedy
        # snapshot at step 400 fell 0.6 points for seed 3 while its sampled accuracy rose 2.8,
        # so for GRPO the sampled gain below is the check.
        if r["objective"] != "grpo":
            assert a["eval/greedy_acc"] >= b["eval/greedy_acc"] + 0.03, (r["objective"], b, a)
    grpo = rows[0]
    # GRPO's sampled accuracy rises by 2 points (+2.8 to +5.4 above).
    assert grpo["after"]["eval/pass@1"] >= grpo["before"]["eval/pass@1"] + 0.02, grpo
    by_name = {r["objective"]: r for r in rows}
    # Static memory (parameters + gradients + AdamW state): the value head adds one
    # hidden -> 1 projection to the policy (~0.05 % of ~130k parameters); the critic is a second
    # model of the policy's size, so the footprint doubles.
    assert by_name["ppo_head_matched"]["memory_ratio"] == pytest.approx(1.0, abs=0.01)
    assert by_name["ppo_critic_matched"]["memory_ratio"] == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize(
    "argv, budget_s, steps",
    [
        ([], BUDGET_S, None),  # make demo: the same time for every objective
        (["--steps", "7"], None, 7),  # the same steps, whatever each costs
        (["--steps", "7", "--budget-s", "3"], 3.0, 7),  # time, capped at 7 steps
        (["--budget-s", "3"], 3.0, None),
    ],
)
def test_the_command_line_budget(monkeypatch, argv, budget_s, steps):
    calls = []
    monkeypatch.setattr("grpo_lab.demo.run_demo", lambda **kw: calls.append(kw))
    assert main(["demo", *argv]) == 0
    assert (calls[0]["budget_s"], calls[0]["steps"]) == (budget_s, steps)


@pytest.mark.parametrize("budget_s, steps, max_time_s, max_steps", [
    (3.0, None, 3.0, 1_000_000),  # the same time: no step cap
    (None, 7, None, 7),  # the same steps: no time budget
    (3.0, 7, 3.0, 7),
])  # fmt: skip
def test_run_demo_hands_its_budget_to_every_run(
    monkeypatch, tmp_path, budget_s, steps, max_time_s, max_steps
):
    """Each objective's config carries the budget (trainer.max_time_s / max_steps); training and
    scoring are stubbed, so this checks the wiring, not learning."""
    import grpo_lab.demo as demo

    configs = []

    def fake_train(cfg):
        configs.append(cfg)
        return [{"time/total_s": 1.0, "time/step_s": 0.5, "mem/static/total_gib": 1.0}] * 2

    monkeypatch.setattr("grpo_lab.trainer.train", fake_train)
    monkeypatch.setattr("grpo_lab.hub.resolve_model_path", lambda name: name)
    monkeypatch.setattr(
        demo, "_accuracy", lambda path, cfg: {"eval/greedy_acc": 0.3, "eval/pass@1": 0.1}
    )
    rows = run_demo(budget_s=budget_s, steps=steps, output_dir=str(tmp_path))
    assert [c.trainer.max_time_s for c in configs] == [max_time_s] * len(OBJECTIVES)
    assert [c.trainer.max_steps for c in configs] == [max_steps] * len(OBJECTIVES)
    assert [r["steps"] for r in rows] == [2] * len(OBJECTIVES)


def test_format_table_shows_ratios_and_the_matched_line():
    acc = {"eval/greedy_acc": 0.33, "eval/pass@1": 0.13}
    rows = [
        {
            "objective": name,
            "label": name,
            "steps": 10,
            "before": acc,
            "after": acc,
            "median_step_s": step_s,
            "static_gib": mem,
            "time_ratio": step_s / 0.02,
            "memory_ratio": mem / 0.001,
        }
        for name, step_s, mem in [("grpo", 0.02, 0.001), ("ppo_head_matched", 0.03, 0.001)]
    ]
    text = format_table(rows, 45)
    assert "45 s of training each" in text
    assert "400 steps each" in format_table(rows, None, 400)
    assert "45 s of training each (at most 400 steps)" in format_table(rows, 45, 400)
    # 0.03 / 0.02 = 1.5x the step time; equal static memory 1.00x.
    assert "ppo_head_matched 1.50x GRPO's step time, 1.00x its static memory" in text
