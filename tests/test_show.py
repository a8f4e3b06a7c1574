"""grpo-lab show: a folder that is not a run, a run still being written, plots, a finished run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from grpo_lab.cli import main
from grpo_lab.config import load_config, save_config
from grpo_lab.show import load_run, show, sparkline


def test_show_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"grpo-lab: {tmp_path} is not a run folder (no config.yaml); pass a training run's output_dir"
    ]
    assert main(["show", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_sparkline():
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([2.0] * 5) == "▄▄▄▄▄"
    # 16 values in 8 characters: bucket means 0.5, 2.5, ..., 14.5 rise evenly.
    assert sparkline(list(range(16)), width=8) == "▁▂▃▄▅▆▇█"
    assert sparkline([]) == ""


def _sample(step: int, i: int, status: str, truncated: bool = False) -> dict:
    return {
        "step": step, "group": 0, "sample": i, "id": "arith:12+30=", "prompt": "12+30=",
        "completion": f"completion-{step}-{i}", "extracted": None if status == "no_answer" else "42",
        "gold": "42", "reward": float(status == "correct"), "status": status,
        "truncated": truncated, "advantage": 0.5 if status == "correct" else -0.5, "length": 3,
    }  # fmt: skip


def _running_run(path: Path, *, kl: bool = True) -> Path:
    """A run of 40 steps that has logged 8 (rewards 0.1 .. 0.8, 0.5 s/step) and is writing the
    9th row."""
    cfg = load_config(
        "recipes/tiny_arith_grpo.yaml", [f"output_dir={path}", "trainer.max_steps=40"]
    )
    path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, path / "config.yaml")
    rows = [{"step": 0, "eval/greedy_acc": 0.25, "eval/n": 16.0}]
    for step in range(1, 9):
        row = {
            "step": step,
            "reward/mean": step / 10,
            "reward/accuracy": step / 10,
            "policy/entropy": 1.0 - step / 20,
            "policy/approx_kl": 0.0,
            "policy/clipfrac": 0.0,
            "time/step_s": 0.5,
            "time/total_s": 0.5 * step,
            "mem/rss_gib": 1.0 + step / 100,
        }
        if kl:
            row["policy/kl_ref"] = step / 1000
        rows.append(row)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "reward/me'  # mid-write
    (path / "metrics.jsonl").write_text(text)
    samples = [_sample(4, i, "wrong") for i in range(2)]
    samples += [_sample(8, 0, "correct"), _sample(8, 1, "no_answer", truncated=True)]
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return path


def _render(path: Path, **kwargs) -> tuple[str, list[Path]]:
    from rich.console import Console

    out = io.StringIO()
    files = show(path, console=Console(file=out, width=160, color_system=None), **kwargs)
    return out.getvalue(), files


def test_show_a_running_run(tmp_path):
    run = _running_run(tmp_path / "run")
    text, files = _render(run)
    assert files == []
    assert "step 8 / 40" in text and "in progress or stopped" in text
    # Windows of max(1, min(10, 8 // 4)) = 2 steps: reward (0.1 + 0.2) / 2 -> (0.7 + 0.8) / 2.
    reward = next(line for line in text.splitlines() if line.startswith("reward"))
    assert reward.split()[1:4] == ["0.150", "0.750", "▁▂▃▄▅▆▇█"]
    # 32 steps left at the median recent step time of 0.5 s.
    assert "about 16s left at 0.50 s/step" in text
    assert "held-out greedy acc (n=16)" in text and "0.250 @0" in text
    # Only the latest sampled step is shown.
    assert "Samples at step 8" in text and "completion-8-1" in text
    assert "completion-4-0" not in text
    assert "no_answer truncated" in text and "correct" in text


def test_show_plot_writes_one_png_per_logged_curve(tmp_path):
    from matplotlib.image import imread

    run = _running_run(tmp_path / "run")
    text, files = _render(run, plot=True)
    names = sorted(f.name for f in files)
    assert names == sorted(
        [
            "reward.png",
            "accuracy.png",
            "entropy.png",
            "kl.png",
            "clip_fraction.png",
            "step_time.png",
            "memory.png",
        ]
    )
    assert all(f.parent == run / "plots" for f in files)
    height, width, _ = imread(files[0]).shape
    assert (width, height) == (770, 462)  # 7 x 4.2 inches at 110 dpi
    assert "wrote 7 plots" in text
    # A run without a KL term still gets its behaviour-policy KL curve; without clip fraction
    # logged at all there is no clip-fraction plot.
    other = _running_run(tmp_path / "other", kl=False)
    rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()[:-1]]
    for r in rows:
        r.pop("policy/clipfrac", None)
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, files = _render(other, plot=True, plot_dir=tmp_path / "elsewhere")
    assert {f.name for f in files} == {
        "reward.png",
        "accuracy.png",
        "entropy.png",
        "kl.png",
        "step_time.png",
        "memory.png",
    }
    assert all(f.parent == tmp_path / "elsewhere" for f in files)


def test_show_a_finished_run_from_the_command_line(tmp_path, capsys):
    """A real two-step run: the command prints its status and samples and writes its plots."""
    from grpo_lab.tiny import build_model, build_tokenizer
    from grpo_lab.trainer import setup, train_loop

    torch.manual_seed(0)
    tok = build_tokenizer()
    build_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tmp_path / 'model'}",
            f"output_dir={run}",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "data.num_eval=4",
            "trainer.max_steps=2",
            "trainer.progress_bar=false",
        ],
    )
    train_loop(setup(cfg))
    assert main(["show", str(run), "--plot"]) == 0
    out = capsys.readouterr().out
    assert "step 2 / 2" in out and "finished" in out
    assert "Samples at step 2" in out and "prompt 1:" in out  # sample_prompts=2 by default
    assert len(list((run / "plots").glob("*.png"))) == 7
    loaded = load_run(run)
    assert loaded.finished and [r["step"] for r in loaded.train] == [1, 2]
    assert len(loaded.samples) == 2 * 4


def test_show_names_a_corrupt_metrics_line(tmp_path, capsys):
    """A torn line in the middle of the file (not a write in progress) is named, file:line."""
    run = _running_run(tmp_path / "run")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:2" in err[0]
