"""Two CPU processes (gloo) under DeepSpeed ZeRO-2 and ZeRO-3 match one process on the same batch.

Each case launches ``tests/distributed_update.py`` with ``accelerate launch`` and the project's own
CPU DeepSpeed configs, takes two optimizer steps of GRPO (with a KL reference and batch-scaled
advantages), GRPO without KL (zero-advantage rows skipped, unevenly across the ranks), PPO with
the value head on the shared trunk and PPO with a separate critic on a fixed global batch split
across the two ranks, and compares the losses and the final parameters with a single-process run
of the same global batch. The script itself asserts that both ranks end with identical
parameters. (Full runs with real rollouts through the entry point are in test_train.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import launching
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_update.py"
OBJECTIVES = "grpo,grpo_skip,ppo_head,ppo_critic"


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
def single_process(tiny_model_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "single.pt"
    _run(
        [sys.executable, str(SCRIPT), tiny_model_dir, str(out), "--objectives", OBJECTIVES],
        out.with_suffix(".log"),
    )
    return torch.load(out)


@pytest.mark.parametrize("zero", ["zero2_cpu", "zero3_cpu"])
def test_two_processes_match_one(zero, tiny_model_dir, single_process, tmp_path):
    out = tmp_path / f"{zero}.pt"
    args = [str(SCRIPT), tiny_model_dir, str(out), "--objectives", OBJECTIVES]
    launching.run(zero, args, tmp_path / "logs", timeout=900)
    multi = torch.load(out)
    # Rows skipped (fraction of this process's rows): one process runs only group 0's 4 of 16
    # rows; two processes keep 4 rows each (rank 1 tops up with zero-advantage rows).
    assert single_process["grpo_skip"]["skipped"] == [0.75, 0.75]
    assert multi["grpo_skip"]["skipped"] == [0.5, 0.5]
    assert single_process["grpo"]["skipped"] == [0.0, 0.0]  # KL in the loss: nothing skipped
    for objective, ref in single_process.items():
        got = multi[objective]
        assert ref["world"] == 1 and got["world"] == 2
        torch.testing.assert_close(got["losses"], ref["losses"])
        assert got["params"].keys() == ref["params"].keys()
        for name, p in ref["params"].items():
            torch.testing.assert_close(
                got["params"][name], p, msg=lambda m, n=name, o=objective: f"{o} {n}: {m}"
            )


def test_single_process_collectives_are_the_identity_and_stats_match_algos():
    from accelerate import Accelerator

    from grpo_lab import algos, distributed

    acc = Accelerator(cpu=True)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert distributed.global_sum(acc, x) is x
    assert distributed.global_max(acc, 7) == 7
    assert distributed.zero_stage(acc) == 0 and not distributed.is_deepspeed(acc)
    mean, var = distributed.global_masked_stats(acc, x, mask)
    # Tokens 1, 2, 4: mean 7/3; unbiased variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3.
    torch.testing.assert_close(mean, torch.tensor(7 / 3))
    torch.testing.assert_close(var, torch.tensor(7 / 3))
    torch.testing.assert_close(var, algos.masked_var(x, mask))


def test_parameter_digest_tells_replicas_apart():
    """The digest is SHA-256 over each parameter's name, dtype, shape and bytes: recomputed here
    by hand for a two-parameter module; a copy has the same digest, one changed element or a
    renamed parameter another; differing ranks fail the check with the model named."""
    import copy
    import hashlib

    from grpo_lab import distributed

    module = torch.nn.Linear(3, 2)
    h = hashlib.sha256()
    for name in ("weight", "bias"):
        p = getattr(module, name)
        h.update(f"{name}:torch.float32:{tuple(p.shape)};".encode())
        h.update(p.detach().numpy().tobytes())
    assert distributed.parameter_digest(module) == h.hexdigest()

    twin = copy.deepcopy(module)
    assert distributed.parameter_digest(twin) == h.hexdigest()
    with torch.no_grad():
        twin.weight[1, 2] = torch.nextafter(twin.weight[1, 2], torch.tensor(1.0))
    assert distributed.parameter_digest(twin) != h.hexdigest()
    renamed = torch.nn.Sequential(copy.deepcopy(module))  # "0.weight", "0.bias"
    assert distributed.parameter_digest(renamed) != h.hexdigest()

    distributed.check_replicas({"policy": ["a", "a"], "critic": ["b", "b"]}, "final/replicas.json")
    with pytest.raises(RuntimeError, match=r"ranks hold different parameters .*\(critic;"):
        distributed.check_replicas({"policy": ["a", "a"], "critic": ["b", "c"]}, "x")
