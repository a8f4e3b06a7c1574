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
