"""Trackers: a missing one stops the run with one line; TensorBoard and wandb (offline) receive
the step metrics and the completion-sample table, read back with their own formats."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

from grpo_lab import trackers
from grpo_lab.cli import main
from grpo_lab.config import ConfigError, load_config
from grpo_lab.harness import MetricsWriter
from grpo_lab.samples import TABLE_COLUMNS
from grpo_lab.trainer import setup, train_loop


def test_missing_tracker_names_the_extra(monkeypatch):
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [])
    with pytest.raises(ConfigError, match=r"pip install 'grpo_lab\[tensorboard\]'"):
        trackers.require_trackers(["tensorboard"])
    with pytest.raises(ConfigError, match=r"pip install mlflow"):
        trackers.require_trackers(["mlflow"])
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        trackers.require_trackers(["tensorbord"])
    trackers.require_trackers(["all"])  # every installed one, however many


def test_train_with_a_missing_tracker_stops_at_start_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [])
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "recipes/tiny_arith_grpo.yaml",
            f"output_dir={out}",
            "harness.report_to=[tensorboard]",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "harness.report_to" in err[0] and "pip install 'grpo_lab[tensorboard]'" in err[0]
    assert not out.exists()  # nothing was started


def _run(model_dir: str, out: Path, tracker: str) -> tuple[list[dict], list[dict]]:
    """A 3-step run logging to ``tracker``; (metrics rows, sample records)."""
    cfg = load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=3",
            "data.num_eval=4",
            "trainer.max_steps=3",
            "trainer.progress_bar=false",
            "harness.sample_every=2",
            "harness.sample_prompts=1",
            f"harness.report_to=[{tracker}]",
        ],
    )
    train_loop(setup(cfg))
    return MetricsWriter.read(out / "metrics.jsonl"), MetricsWriter.read(out / "samples.jsonl")


def test_tensorboard_events_hold_the_step_metrics_and_samples(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    rows, samples = _run(tiny_model_dir, tmp_path, "tensorboard")
    events = EventAccumulator(
        str(tmp_path / "grpo_lab"), size_guidance={"scalars": 0, "tensors": 0}
    )
    events.Reload()
    train = [r for r in rows if "reward/mean" in r]
    for key in ("reward/mean", "policy/entropy", "time/step_s"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        # TensorBoard stores float32.
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in train]
    evals = [(e.step, e.value) for e in events.Scalars("eval/greedy_acc")]
    assert [s for s, _ in evals] == [0, 3]
    text = events.Tensors("samples/text_summary")
    assert [e.step for e in text] == [2, 3]
    table = make_ndarray(text[-1].tensor_proto).item().decode()
    last = [r for r in samples if r["step"] == 3]
    assert len(table.splitlines()) == 2 + len(last)
    assert all(f"| {r['gold']} |" in table for r in last)


def test_wandb_offline_run_holds_the_step_metrics_and_samples(
    tiny_model_dir, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_CODE": "true",
    }.items():
        monkeypatch.setenv(key, value)
    rows, samples = _run(tiny_model_dir, tmp_path, "wandb")
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    (log,) = glob.glob(f"{run_dir}/run-*.wandb")
    data = Path(log).read_bytes()
    # wandb's run log holds each history value as its JSON text.
    for r in rows:
        if "reward/mean" in r:
            assert json.dumps(r["reward/mean"]).encode() in data
    tables = sorted(glob.glob(f"{run_dir}/files/media/table/samples_*.table.json"))
    assert len(tables) == 2
    last = json.loads(Path(tables[-1]).read_text())
    assert last["columns"] == list(TABLE_COLUMNS)
    assert last["data"] == [[r[c] for c in last["columns"]] for r in samples if r["step"] == 3]
