"""Bad input through the command line: one line naming the file, row or key, a non-zero exit code,
no traceback, and nothing on disk lost or mixed between runs.

Cases: data files (missing, empty, not JSON, not UTF-8, missing fields, unscorable golds, a file
for the generated task, a hub split while offline), prompt length, models (missing folder, hub
name offline, empty folder for eval), run folders (a fresh run into another run, overwrite),
resume (safe keys applied, unsafe keys refused, corrupt newest checkpoint), divergence
(non-finite weights, non-finite logits, entropy explosion), a full disk (simulated by making the
writers raise what they raise on ENOSPC), and the error path itself (--debug, real bugs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_lab.cli import main
from grpo_lab.harness import MetricsWriter

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny_arith_grpo.yaml")


def _small(model: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", RECIPE, f"model.name_or_path={model}", f"output_dir={out}",
        "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=4",
        "data.num_eval=8", "trainer.micro_batch_size=8", "trainer.warmup_steps=0",
        "trainer.progress_bar=false", "trainer.max_steps=1", "trainer.lr=1e-3", *extra,
    ]  # fmt: skip


def _error_line(capsys, prefix: str = "grpo-lab: ") -> str:
    """The one error line on stderr; fails on a traceback or on more than one error line."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, str]:
    """Hash of every file under ``folder``: what a refused command must leave as it was."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD_GSM8K = [{"question": f"{i}+1=", "answer": f"#### {i + 1}"} for i in range(4)]


# ------------------------------------------------------------------ data


def test_missing_data_file_names_the_key_and_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["data.name=gsm8k", f"data.path={tmp_path / 'nope.jsonl'}", "data.num_eval=0"]
    assert main(_small("builtin:tiny-arith", out, *args)) == 2
    line = _error_line(capsys)
    assert "data.path" in line and "nope.jsonl" in line and "no such file" in line
    assert not out.exists()  # nothing written for a refused run


def test_empty_data_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    args = ["data.name=gsm8k", f"data.path={empty}", "data.num_eval=0"]
    assert main(_small("builtin:tiny-arith", tmp_path / "run", *args)) == 2
    line = _error_line(capsys)
    assert str(empty) in line and "empty" in line


@pytest.mark.parametrize(
    "name, rows, expected",
    [
        ("gsm8k", ['{"question": "1+1=", "answer": "#### 2"', *GOOD_GSM8K], "not valid JSON"),
        ("gsm8k", [{"answer": "#### 2"}, *GOOD_GSM8K], "missing field 'question'"),
        ("gsm8k", [{"question": "1+1="}, *GOOD_GSM8K], "missing field 'answer'"),
        ("gsm8k", [{"question": "1+1=", "answer": "#### \\frac{"}, *GOOD_GSM8K], "not a number"),
        ("math", [{"problem": "1+1=", "answer": "\\frac{"}, {"problem": "2=", "answer": "2"}],
         "unbalanced braces"),
        ("math", [{"problem": "1+1=", "answer": "}{"}, {"problem": "2=", "answer": "2"}],
         "unbalanced braces"),
        ("math", [{"problem": "1+1=", "answer": ""}, {"problem": "2=", "answer": "2"}],
         "'answer' is empty"),
    ],
    ids=["not-json", "no-question", "no-answer", "gsm8k-frac", "math-frac", "math-}{", "math-empty"],
)  # fmt: skip
def test_bad_row_names_file_and_row(tmp_path, capsys, name, rows, expected):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    args = [f"data.name={name}", f"data.path={path}", "data.num_eval=0"]
    assert main(_small("builtin:tiny-arith", tmp_path / "run", *args)) == 2
    line = _error_line(capsys)
    assert path in line and "row 1:" in line and expected in line


def test_non_utf8_bytes_name_the_row(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        b'{"question": "1+1=", "answer": "#### 2"}\n{"question": "caf\xe9", "answer": "#### 3"}\n'
    )
    args = ["data.name=gsm8k", f"data.path={path}", "data.num_eval=0"]
    assert main(_small("builtin:tiny-arith", tmp_path / "run", *args)) == 2
    line = _error_line(capsys)
    assert str(path) in line and "row 2: not UTF-8" in line and "0xe9" in line


def test_every_unscorable_gold_is_listed_up_to_a_cap(tmp_path, capsys):
    """15 bad golds among good rows: all counted, the first 10 named by row, the rest counted."""
    rows = []
    for i in range(30):
        gold = "\\frac{" if i % 2 else str(i)
        rows.append({"problem": f"{i}=", "answer": gold})
    path = _jsonl(tmp_path / "math.jsonl", rows)
    args = ["data.name=math", f"data.path={path}", "data.num_eval=0"]
    assert main(_small("builtin:tiny-arith", tmp_path / "run", *args)) == 2
    line = _error_line(capsys)
    assert "15 bad rows" in line and "(and 5 more)" in line
    # rows 2, 4, ..., 20 (1-based lines of the odd indices) are named; row 22 is counted only
    for row in range(2, 21, 2):
        assert f"row {row}:" in line
    assert "row 22:" not in line and "row 1:" not in line


def test_data_path_with_the_generated_task_hints_data_name(tmp_path, capsys):
    path = _jsonl(tmp_path / "g.jsonl", GOOD_GSM8K)
    assert main(_small("builtin:tiny-arith", tmp_path / "run", f"data.path={path}")) == 2
    line = _error_line(capsys)
    assert "data.path" in line and "'arith'" in line and "data.name=gsm8k" in line


def test_gsm8k_without_eval_path_offline_says_what_to_set(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _jsonl(tmp_path / "g.jsonl", GOOD_GSM8K)
    start = time.perf_counter()
    assert main(_small("builtin:tiny-arith", tmp_path / "run", "data.name=gsm8k", f"data.path={path}")) == 2  # fmt: skip
    assert time.perf_counter() - start < 10  # no hub retries
    line = _error_line(capsys)
    assert "data.eval_path" in line and "HF_HUB_OFFLINE" in line and "data.num_eval=0" in line


def test_a_gsm8k_file_read_as_math_says_so(tmp_path, capsys):
    path = _jsonl(tmp_path / "g.jsonl", GOOD_GSM8K)
    args = ["data.name=math", f"data.path={path}", "data.num_eval=0"]
    assert main(_small("builtin:tiny-arith", tmp_path / "run", *args)) == 2
    line = _error_line(capsys)
    assert "4 bad rows" in line and "data.name=gsm8k" in line


def test_unknown_template_is_a_config_error(tmp_path, capsys):
    assert main(_small("builtin:tiny-arith", tmp_path / "run", "data.template=boxd")) == 2
    line = _error_line(capsys)
    assert line.startswith("grpo-lab: config error: override 'data.template=boxd': data.template")
    assert "(did you mean 'boxed'?)" in line


# ------------------------------------------------------------------ prompt length


def test_prompt_longer_than_the_context_is_refused_or_dropped(
    tiny_model_dir, tmp_path, capsys, caplog
):
    """The tiny model has 64 positions; a 2,000-token question in row 3 does not fit."""
    rows = [*GOOD_GSM8K[:2], {"question": "1" * 2000 + "=", "answer": "#### 3"}, *GOOD_GSM8K[2:]]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    data = ["data.name=gsm8k", f"data.path={path}", f"data.eval_path={path}"]
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out, *data)) == 2
    line = _error_line(capsys)
    assert f"{path}: row 3: " in line and "64 tokens" in line and "data.max_prompt_tokens" in line
    assert not (out / "metrics.jsonl").exists()

    with caplog.at_level(logging.WARNING, logger="grpo_lab"):
        assert main(_small(tiny_model_dir, out, *data, "data.max_prompt_tokens=32")) == 0
    assert "dropped 1 of 5 training problems" in caplog.text
    assert (out / "final").is_dir()


def test_max_new_tokens_beyond_the_context_is_refused(tiny_model_dir, tmp_path, capsys):
    assert main(_small(tiny_model_dir, tmp_path / "run", "rollout.max_new_tokens=100")) == 2
    line = _error_line(capsys)
    assert "rollout.max_new_tokens=100" in line and "64 tokens" in line


# ------------------------------------------------------------------ models


def test_missing_local_model_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(_small(str(missing), tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert str(missing) in line and "no such local folder" in line and "model.name_or_path" in line


def test_hub_name_without_network_fails_fast(tmp_path, capsys, monkeypatch):
    """Offline switch set, and no switch but an unreachable hub: both answer in seconds."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(_small("someorg/some-model", tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert "HF_HUB_OFFLINE" in line and "model.name_or_path" in line and "data.path" in line

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    assert main(_small("someorg/some-model", tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert "cannot be reached" in line and "model.name_or_path" in line
    assert time.perf_counter() - start < 30


def test_eval_on_an_empty_folder_says_what_it_is_not(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--limit", "2"]) == 2
    line = _error_line(capsys)
    assert "not a model folder" in line and "run folder" in line and "sentencepiece" not in line


def test_unreadable_model_folder_is_one_line(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{ not json")
    assert main(_small(str(broken), tmp_path / "run")) == 2
    line = _error_line(capsys)
    assert f"cannot load {str(broken)!r}" in line and "model.name_or_path" in line


# ------------------------------------------------------------------ run folders


def test_fresh_run_into_another_run_is_refused_then_overwritten(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out, "checkpoint.every=1")) == 0
    before = _snapshot(out)
    assert "checkpoints/step_0000001/COMPLETE" in before and "metrics.jsonl" in before
    capsys.readouterr()

    assert main(_small(tiny_model_dir, out, "seed=1")) == 2
    line = _error_line(capsys)
    assert str(out) in line and "resume=auto" in line and "overwrite=true" in line
    assert _snapshot(out) == before  # nothing of the old run touched

    # An overwrite that cannot start (bad data) deletes nothing.
    missing = f"data.path={tmp_path / 'missing.jsonl'}"
    args = _small(tiny_model_dir, out, "seed=1", "data.name=gsm8k", missing)
    assert main([*args, "--overwrite"]) == 2
    assert "data.path" in _error_line(capsys)
    assert _snapshot(out) == before

    assert main([*_small(tiny_model_dir, out, "seed=1"), "--overwrite"]) == 0
    assert not (out / "checkpoints").exists()  # the old run's checkpoints are gone
    rows = MetricsWriter.read(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "reward/mean" in r] == [1]
    assert "seed: 1" in (out / "config.yaml").read_text()


def test_resume_auto_into_a_finished_run_without_checkpoints_is_refused(
    tiny_model_dir, tmp_path, capsys
):
    """It would start over and replace the finished run's metrics and final model."""
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_small(tiny_model_dir, out, "resume=auto", "trainer.max_steps=2")) == 2
    line = _error_line(capsys)
    assert "finished run without checkpoints" in line and "overwrite=true" in line
    assert _snapshot(out) == before


def test_output_dir_that_is_a_file_is_named(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "taken").write_text("notes")
    assert main(_small(tiny_model_dir, tmp_path / "taken")) == 2
    line = _error_line(capsys)
    assert "is a file" in line and "output_dir" in line
    assert (tmp_path / "taken").read_text() == "notes"


# ------------------------------------------------------------------ resume


SIGNAL = ("rollout.prompts_per_step=8", "rollout.group_size=8", "trainer.micro_batch_size=64")


def test_resume_applies_a_new_lr_and_refuses_unsafe_keys(tmp_path, capsys, caplog):
    """The old lr is in the restored scheduler and optimizer: without re-applying it, a resume
    with another trainer.lr ends with the same weights as one with the old lr."""
    from safetensors.torch import load_file

    MODEL = "builtin:tiny-arith"  # a trained model: its groups have reward signal at every step

    a = tmp_path / "a"
    assert main(_small(MODEL, a, "trainer.max_steps=2", "checkpoint.every=1", *SIGNAL)) == 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    config_before = (a / "config.yaml").read_text()
    metrics_before = (a / "metrics.jsonl").read_text()

    capsys.readouterr()
    assert main(_small(MODEL, a, "trainer.max_steps=3", "resume=auto", *SIGNAL, "seed=5", "rollout.group_size=2")) == 2  # fmt: skip
    line = _error_line(capsys)
    assert "seed: 0 -> 5" in line and "rollout.group_size: 8 -> 2" in line
    assert (a / "config.yaml").read_text() == config_before
    assert (a / "metrics.jsonl").read_text() == metrics_before

    assert main(_small(MODEL, a, "trainer.max_steps=3", "resume=auto", *SIGNAL)) == 0
    with caplog.at_level(logging.INFO, logger="grpo_lab"):
        assert main(_small(MODEL, b, "trainer.max_steps=3", "resume=auto", "trainer.lr=0.05", *SIGNAL)) == 0  # fmt: skip
    assert "trainer.lr: 0.001 -> 0.05" in caplog.text and "trainer.max_steps: 2 -> 3" in caplog.text
    step3 = [r for r in MetricsWriter.read(b / "metrics.jsonl") if r.get("step") == 3]
    assert step3[0]["optim/lr"] == pytest.approx(0.05)  # constant schedule, no warmup
    wa = load_file(a / "final" / "model.safetensors")
    wb = load_file(b / "final" / "model.safetensors")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert "lr: 0.05" in (b / "config.yaml").read_text()


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out, "trainer.max_steps=2", "checkpoint.every=1")) == 0
    newest = out / "checkpoints" / "step_0000002"
    (newest / "model.safetensors").write_bytes(b"truncated")
    with caplog.at_level(logging.INFO, logger="grpo_lab"):
        assert main(_small(tiny_model_dir, out, "trainer.max_steps=3", "resume=auto")) == 0
    assert "step_0000002 is corrupt" in caplog.text and "falling back" in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step_0000001'}" in caplog.text
    steps = [r["step"] for r in MetricsWriter.read(out / "metrics.jsonl") if "reward/mean" in r]
    assert steps == [1, 2, 3]  # step 2 redone once, not twice


# ------------------------------------------------------------------ divergence


def test_non_finite_weights_stop_before_the_next_rollout(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from grpo_lab import trainer as trainer_module

    real = trainer_module.update

    def poisoned(run, exp, *args, **kwargs):
        out = real(run, exp, *args, **kwargs)
        with torch.no_grad():
            next(run.policy.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(trainer_module, "update", poisoned)
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out, "trainer.max_steps=3", "checkpoint.every=1")) == 3
    line = _error_line(capsys)
    assert "NaN or infinite after the update of step 1" in line and "trainer.lr" in line
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def test_huge_lr_is_named_whether_weights_or_logits_overflow(tiny_model_dir, tmp_path, capsys):
    """lr=1e38 without warmup makes the weights infinite; with the recipe's warmup (lr / 20 at
    step 1) they stay finite and only the logits overflow, which the sampler meets."""
    huge = ["trainer.max_steps=3", "trainer.lr=1e38"]
    assert main(_small(tiny_model_dir, tmp_path / "a", *huge)) == 3
    line = _error_line(capsys)
    assert "NaN or infinite after the update of step 1" in line
    assert "trainer.lr (now 1e+38)" in line and "add trainer.warmup_steps" in line

    recipe_warmup = [
        a for a in _small("builtin:tiny-arith", tmp_path / "b", *huge) if "warmup" not in a
    ]
    assert main(recipe_warmup) == 3
    line = _error_line(capsys)
    assert "logits are NaN or infinite at step " in line and "trainer.lr (now 1e+38)" in line


def test_entropy_explosion_warns_or_stops(tmp_path, capsys, caplog):
    """The trained tiny model at lr=1e6 turns uniform over its vocabulary after one update."""
    base = [
        "train", RECIPE, "trainer.max_steps=4", "trainer.lr=1e6", "trainer.warmup_steps=0",
        "rollout.prompts_per_step=4", "data.num_eval=8", "trainer.progress_bar=false",
    ]  # fmt: skip
    assert main([*base, f"output_dir={tmp_path / 'stop'}"]) == 3
    line = _error_line(capsys)
    assert "entropy exploded" in line and "divergence.entropy_max" in line and "trainer.lr" in line
    with caplog.at_level(logging.WARNING, logger="grpo_lab"):
        assert main([*base, f"output_dir={tmp_path / 'warn'}", "divergence.action=warn"]) == 0
    assert "entropy exploded" in caplog.text


def test_entropy_alarm_bounds_and_patience():
    from grpo_lab.guards import entropy_alarm

    kw = {"vocab_size": 20, "entropy_max": 0.9, "entropy_min": 0.01, "patience": 2}
    uniform = torch.log(torch.tensor(20.0)).item()  # 2.996 nats
    assert entropy_alarm([0.8, 2.99], **kw) is None  # one step out: patience not reached
    assert "exploded" in entropy_alarm([0.8, 2.99, 2.98], **kw)
    assert entropy_alarm([uniform, uniform, uniform], **kw) is None  # started as noise
    assert "collapsed" in entropy_alarm([0.8, 0.001, 0.0], **kw)
    assert entropy_alarm([0.8, 0.5, 0.6], **kw) is None


# ------------------------------------------------------------------ full disk


def test_full_disk_at_the_final_save_leaves_no_debris_and_stays_resumable(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Simulated: the model writer writes a partial file, then raises what safetensors raises
    on ENOSPC."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def full_disk(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out, "trainer.max_steps=2", "checkpoint.every=1")) == 2
    line = _error_line(capsys)
    assert line.startswith("grpo-lab: disk full: ") and str(out) in line and "resume=auto" in line
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
    ]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_0000001",
        "step_0000002",
    ]

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real)
    assert main(_small(tiny_model_dir, out, "trainer.max_steps=2", "resume=auto")) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """Simulated: torch's zip writer fails mid-checkpoint ("enforce fail at inline_container.cc")
    on a disk with almost no space left."""
    from accelerate import Accelerator

    from grpo_lab import errors

    real = Accelerator.save_state

    def full_disk(self, output_dir, **kwargs):
        if "step_0000002" not in str(output_dir):
            return real(self, output_dir, **kwargs)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    monkeypatch.setattr(errors, "_free_bytes", lambda path: 2**20)
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="grpo_lab"):
        assert main(_small(tiny_model_dir, out, "trainer.max_steps=2", "checkpoint.every=1")) == 0
    assert "disk full" in caplog.text and "previous checkpoint is kept" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000001"]
    assert (out / "checkpoints" / "step_0000001" / "COMPLETE").is_file()


def test_full_disk_while_writing_metrics_names_the_run_folder(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Simulated: a plain file write reports ENOSPC without naming the file."""
    import errno

    def full_disk(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsWriter, "write", full_disk)
    out = tmp_path / "run"
    assert main(_small(tiny_model_dir, out)) == 2
    line = _error_line(capsys)
    assert line.startswith("grpo-lab: disk full: ") and str(out) in line and "resume=auto" in line


# ------------------------------------------------------------------ the error path


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    from grpo_lab.errors import DataError

    args = _small("builtin:tiny-arith", tmp_path / "run", f"data.path={tmp_path / 'x.jsonl'}")
    with pytest.raises(DataError):
        main(["--debug", *args])
    monkeypatch.setenv("GRPO_LAB_DEBUG", "1")
    with pytest.raises(DataError):
        main(args)


def test_a_real_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from grpo_lab import trainer as trainer_module

    def bug(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(trainer_module, "train", bug)
    with pytest.raises(ZeroDivisionError):
        main(_small("builtin:tiny-arith", tmp_path / "run"))


def test_train_entry_point_exits_non_zero_with_one_line(tmp_path):
    """``python -m grpo_lab.train`` (what accelerate launches) returns the error's exit code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    args = _small("builtin:tiny-arith", tmp_path / "run", "data.name=gsm8k")[1:]
    args.append(f"data.path={tmp_path / 'missing.jsonl'}")
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_lab.train", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("grpo-lab: ")]
    assert lines == [f"grpo-lab: data error: data.path={tmp_path / 'missing.jsonl'}: no such file (expected a JSONL file)"]  # fmt: skip


@pytest.mark.slow
def test_two_processes_print_one_line_per_rank(tmp_path):
    """Under accelerate with two CPU processes each rank prints its own line and exits 2; no
    traceback passes through grpo_lab (the launcher reports the failed processes itself)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"question": "1+1="}, *GOOD_GSM8K])
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate), "launch", "-q", "--config_file",
        str(ROOT / "recipes" / "accelerate" / "zero2_cpu.yaml"), "--main_process_port", str(port),
        "-m", "grpo_lab.train", RECIPE, f"output_dir={tmp_path / 'run'}", "data.name=gsm8k",
        f"data.path={bad}", "data.num_eval=0", "rollout.prompts_per_step=4",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = sorted(line for line in output.splitlines() if "grpo-lab: data error:" in line)
    assert len(lines) == 2, output[-3000:]
    assert lines[0].startswith("[rank 0] grpo-lab: data error: ") and "row 1:" in lines[0]
    assert lines[1].startswith("[rank 1] grpo-lab: data error: ")
    frames = [line for line in output.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "grpo_lab" in f], output[-3000:]
    assert "exitcode  : 2" in output
