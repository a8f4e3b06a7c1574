"""The grpo-lab command line: help, config errors, config printing, eval of a run folder (the
run's own problems and settings, offline from local files)."""

import json
from pathlib import Path

import pytest

from grpo_lab.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "show", "demo", "sweep", "merge", "config"):
        assert command in out


def test_help_loads_no_torch():
    """`grpo-lab --help` is argparse alone: it imports no torch, scipy or matplotlib."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from grpo_lab.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'scipy', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines()[-1] == "[]", proc.stderr


def test_a_sweep_error_is_one_line_with_its_kind(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"grpo-lab: sweep error: {tmp_path / 'none.yaml'}: sweep file not found\n"


def test_config_error_names_the_key_and_exits_2(capsys):
    assert main(["config", "recipes/tiny_arith_grpo.yaml", "trainer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "trainer.lrr" in err and "did you mean 'trainer.lr'" in err


def test_config_prints_the_resolved_recipe_with_overrides(capsys):
    assert main(["config", "recipes/tiny_arith_ppo_head.yaml", "trainer.lr=2.0e-5"]) == 0
    out = capsys.readouterr().out
    assert "algorithm: ppo" in out and "lr: 2.0e-05" in out


def test_eval_reads_a_run_folder(tmp_path, capsys):
    """A run folder supplies its final/ model and its data settings."""
    import torch

    from grpo_lab.config import load_config, save_config
    from grpo_lab.tiny import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    build_model(tok).save_pretrained(tmp_path / "final")
    tok.save_pretrained(tmp_path / "final")
    save_config(
        load_config("recipes/tiny_arith_grpo.yaml", ["data.max_value=9"]), tmp_path / "config.yaml"
    )
    assert main(["eval", str(tmp_path), "--limit", "8", "--k", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["dataset"] == "arith" and result["eval/n"] == 8.0
    assert {"eval/greedy_acc", "eval/pass@1", "eval/maj@2", "eval/pass@2"} <= result.keys()


GSM8K_FILE = Path("/work/shared/data/gsm8k_train.jsonl")


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train_and_eval(run: Path, overrides: list[str], capsys) -> tuple[dict, dict]:
    """Train a short run, then `grpo-lab eval RUN` with no flags: (the trainer's last held-out
    evaluation row, the command's JSON result)."""
    from grpo_lab.config import load_config
    from grpo_lab.harness import MetricsWriter
    from grpo_lab.trainer import train

    common = [
        f"output_dir={run}",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "trainer.max_steps=1",
        "trainer.lr=1.0e-4",
        "trainer.progress_bar=false",
    ]
    train(load_config(None, [*common, *overrides]))
    last_eval = [r for r in MetricsWriter.read(run) if "eval/greedy_acc" in r][-1]
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    return last_eval, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_of_a_run_scores_what_its_trainer_scored(tmp_path, capsys):
    """A run on local GSM8K-format files of arithmetic questions (which the embedded model
    half-solves): `grpo-lab eval RUN` scores the run's 16 held-out problems and gets exactly the
    trainer's own final held-out accuracy."""
    from grpo_lab.data import make_arith

    def rows(problems):
        return [{"question": p.question, "answer": f"#### {p.answer}"} for p in problems]

    train_file = _write_jsonl(tmp_path / "train.jsonl", rows(make_arith(32, seed=1, split="train")))
    test_file = _write_jsonl(tmp_path / "test.jsonl", rows(make_arith(40, seed=1, split="test")))
    trainer_eval, result = _train_and_eval(
        tmp_path / "run",
        [
            "model.name_or_path=builtin:tiny-arith",
            "data.name=gsm8k",
            f"data.path={train_file}",
            f"data.eval_path={test_file}",
            "data.template=plain",
            "data.num_eval=16",
            "rollout.max_new_tokens=6",
        ],
        capsys,
    )
    assert (result["dataset"], result["path"], result["eval/n"]) == ("gsm8k", test_file, 16.0)
    assert 0.0 < trainer_eval["eval/greedy_acc"] < 1.0
    assert result["eval/greedy_acc"] == trainer_eval["eval/greedy_acc"]


def test_eval_of_a_local_gsm8k_run_works_offline_with_no_flags(tmp_path, capsys, monkeypatch):
    """Trained from local GSM8K files with a model built here, with the hub unreachable: the
    evaluation reads the run's eval file, its gsm8k template and token budget."""
    import datasets
    import torch

    from grpo_lab.tiny import build_model, build_tokenizer

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = GSM8K_FILE.read_text().splitlines()
    train_file = _write_jsonl(tmp_path / "train.jsonl", [json.loads(x) for x in lines[:8]])
    test_file = _write_jsonl(tmp_path / "test.jsonl", [json.loads(x) for x in lines[8:13]])
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok)
    # GSM8K questions run to a few hundred characters (one token each): a context that holds
    # them, so the prompt-length check lets them through (rotary positions; no weights change).
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    trainer_eval, result = _train_and_eval(
        tmp_path / "run",
        [
            f"model.name_or_path={tmp_path / 'model'}",
            "data.name=gsm8k",
            f"data.path={train_file}",
            f"data.eval_path={test_file}",
            "data.template=gsm8k",
            "data.num_eval=4",
            "rollout.max_new_tokens=3",
        ],
        capsys,
    )
    assert (result["dataset"], result["path"], result["eval/n"]) == ("gsm8k", test_file, 4.0)
    assert result["eval/greedy_acc"] == trainer_eval["eval/greedy_acc"]
