"""grpo_lab.sweep.run: running, skipping, resuming and reporting failed runs; end to end."""

import csv
import json
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import RECIPES, base_body, write_run, write_sweep

from grpo_lab.sweep import SweepError, read_metrics, run_command, run_sweep
from grpo_lab.sweep import run as sweep_run


def test_invalid_run_config_fails_before_anything_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_run, "run_command", lambda cmd, log, env=None: calls.append(cmd) or 0)
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
    monkeypatch.setattr(sweep_run, "run_command", fake_runner(calls, fail={"grpo/seed1"}))
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
    monkeypatch.setattr(sweep_run, "run_command", fake_runner(calls))
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
    monkeypatch.setattr(sweep_run, "run_command", fake_runner(calls))
    result = run_sweep(write_sweep(tmp_path, base_body(tmp_path)), dry_run=True)
    printed = capsys.readouterr().out
    assert calls == [] and not (tmp_path / "out").exists()
    assert len(result.runs) == 4
    assert printed.count("-m grpo_lab.train") == 4
    assert "[4/4] ppo_head/seed1 (would start)" in printed


def test_report_only_aggregates_what_is_there(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep_run, "run_command", fake_runner(calls))
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
