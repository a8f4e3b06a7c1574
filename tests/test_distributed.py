"""Two CPU processes (gloo) under DeepSpeed ZeRO-2 and ZeRO-3 match one process on the same batch.

Each case launches ``tests/distributed_update.py`` with ``accelerate launch`` and the project's own
CPU DeepSpeed configs, takes two optimizer steps of GRPO (with a KL reference) and of PPO with a
separate critic on a fixed global batch split across the two ranks, and compares the losses and
the final parameters with a single-process run of the same global batch. The script itself
asserts that both ranks end with identical parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_update.py"
OBJECTIVES = "grpo,ppo_critic"


def _run(cmd: list[str], log: Path) -> None:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    with log.open("w") as f:
        rc = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=900
        ).returncode
    assert rc == 0, log.read_text()[-4000:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from grpo_lab.tiny import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("dist_model")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def single_process(model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "single.pt"
    _run(
        [sys.executable, str(SCRIPT), model_dir, str(out), "--objectives", OBJECTIVES],
        out.with_suffix(".log"),
    )
    return torch.load(out)


@pytest.mark.parametrize("zero", ["zero2_cpu", "zero3_cpu"])
def test_two_processes_match_one(zero, model_dir, single_process, tmp_path):
    out = tmp_path / f"{zero}.pt"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"{zero}.yaml"),
           str(SCRIPT), model_dir, str(out), "--objectives", OBJECTIVES]  # fmt: skip
    _run(cmd, tmp_path / f"{zero}.log")
    multi = torch.load(out)
    for objective, ref in single_process.items():
        got = multi[objective]
        assert ref["world"] == 1 and got["world"] == 2
        torch.testing.assert_close(got["losses"], ref["losses"])
        assert got["params"].keys() == ref["params"].keys()
        for name, p in ref["params"].items():
            torch.testing.assert_close(
                got["params"][name], p, msg=lambda m, n=name, o=objective: f"{o} {n}: {m}"
            )
