"""grpo_lab.sweep.plots: metric curves from metrics.jsonl records, and a sweep's plots."""

import pytest

from grpo_lab.sweep.plots import plot_metric_curves

pytest.importorskip("matplotlib")


def test_plot_metric_curves_draws_what_was_logged(tmp_path):
    records = {
        "a": [{"step": s, "reward/mean": s / 10, "time/total_s": 0.5 * s} for s in range(1, 11)]
        + [{"step": 10, "eval/greedy_acc": 0.4}],
        "b": [{"step": s, "reward/mean": None} for s in range(1, 4)],  # nothing finite to draw
    }
    path = plot_metric_curves(records, ["reward/mean", "eval/greedy_acc"], tmp_path / "c.png")
    assert path == tmp_path / "c.png" and path.read_bytes().startswith(b"\x89PNG")
    by_time = plot_metric_curves(
        records, ["reward/mean"], tmp_path / "t.png", x="time/total_s", window=3
    )
    assert by_time is not None and by_time.exists()
    # No record holds the metric: no file, no empty figure.
    assert plot_metric_curves(records, ["loss/total"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_mean_curve_drops_steps_fewer_than_half_the_seeds_reached():
    from grpo_lab.sweep.plots import _mean_curve
    from grpo_lab.sweep.summary import RunStats

    def run(seed, values):
        steps = list(range(1, len(values) + 1))
        return RunStats(
            "g",
            "g",
            {},
            seed,
            None,
            "finished",
            curve_steps=steps,
            curve_values=values,
            curve_wall_s=[float(s) for s in steps],
        )

    # Seeds reach steps 3, 2 and 1: step 2 has 2 of 3 seeds (kept), step 3 has 1 (dropped).
    steps, walls, means, _ = _mean_curve(
        [run(0, [0.0, 1.0, 5.0]), run(1, [2.0, 3.0]), run(2, [4.0])]
    )
    assert steps == [1, 2] and means == [2.0, 2.0] and walls == [1.0, 2.0]
