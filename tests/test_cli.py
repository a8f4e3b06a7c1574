"""The grpo-lab command line: help, config errors, config printing, eval of a run folder."""

import json

import pytest

from grpo_lab.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "demo", "sweep", "merge", "config"):
        assert command in out


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
