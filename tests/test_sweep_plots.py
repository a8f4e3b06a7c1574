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


def test_metric_curves_draw_through_the_one_line_plot(tmp_path, monkeypatch):
    # plot_metric_curves (the answer document's curves) hands grpo_lab.plots.line_plot one panel
    # per metric, one line per run that logged it, as `grpo-lab show --plot` and the sweep do.
    import grpo_lab.sweep.plots as sweep_plots

    drawn = {}

    def fake_line_plot(Figure, path, panels, **kw):
        drawn.update(panels=panels, **kw)
        return path

    monkeypatch.setattr(sweep_plots, "line_plot", fake_line_plot)
    records = {
        "a": [{"step": 1, "x/y": 1.0}, {"step": 2, "x/y": 3.0}],
        "b": [{"step": 1, "x/z": 2.0}],
    }
    plot_metric_curves(records, ["x/y", "x/z"], tmp_path / "p.png", window=2, title="T")
    y, z = drawn["panels"]
    assert [line.label for line in y.lines] == ["a"] and list(y.lines[0].y) == [1.0, 2.0]
    assert [(line.label, line.color) for line in z.lines] == [("b", "C1")]
    assert y.ylabel == "x/y\n(2-step moving avg)"
    assert (drawn["xlabel"], drawn["title"], drawn["size"]) == ("step", "T", (7, 5.8))
