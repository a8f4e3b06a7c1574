"""The entry point ``accelerate launch ... -m grpo_lab.train`` on two CPU processes: every
objective under every DeepSpeed launch config with every rollout engine that runs under it, real
rollouts of the embedded model, LoRA and KL on some cells; and SIGKILL-then-resume under ZeRO-3.

Each launch has a deadline and shows both ranks' logs when it fails (``tests/launching.py``). A
cell passes when the launch exits 0 after its steps and both ranks wrote the same digest of their
parameters into ``final/replicas.json`` at the end; with full weights the digest is also that of
the model loaded back from ``final/``. A few cells run in the default suite, the rest are
``slow``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from launching import run, start

from grpo_lab.distributed import REPLICAS_FILE, parameter_digest
from grpo_lab.harness import MetricsWriter

OBJECTIVES = ("grpo", "ppo_head", "ppo_critic")
VARIANTS = {
    "plain": [],
    "lora": ["model.lora.r=8"],
    "kl": ["loss.kl_coef=0.05"],
    "lora+kl": ["model.lora.r=8", "loss.kl_coef=0.05"],
}
# Every launch runs the embedded model's recipe for 3 steps, with a short evaluation.
COMMON = ["trainer.max_steps=3", "data.num_eval=32", "trainer.progress_bar=false"]
TIMEOUT_S = 600

# (objective, launch config, rollout engine, variant). Every objective x {ZeRO-2, ZeRO-3} x
# {shared_prefix, static, hf}; "compiled" runs under ZeRO-2 only (ZeRO-3 refuses it, below).
DEFAULT_CELLS = [
    ("ppo_head", "zero3_cpu", "shared_prefix", "plain"),  # the shared trunk under ZeRO-3
    ("ppo_critic", "zero3_cpu", "static", "kl"),
    ("grpo", "zero2_cpu", "hf", "lora+kl"),
]
SLOW_CELLS = [
    ("grpo", "zero2_cpu", "shared_prefix", "plain"),
    ("grpo", "zero2_cpu", "static", "kl"),
    ("grpo", "zero2_cpu", "compiled", "plain"),
    ("grpo", "zero3_cpu", "shared_prefix", "kl"),
    ("grpo", "zero3_cpu", "static", "lora"),
    ("grpo", "zero3_cpu", "hf", "plain"),
    ("ppo_head", "zero2_cpu", "shared_prefix", "lora"),
    ("ppo_head", "zero2_cpu", "static", "plain"),
    ("ppo_head", "zero2_cpu", "hf", "kl"),
    ("ppo_head", "zero3_cpu", "static", "lora+kl"),
    ("ppo_head", "zero3_cpu", "hf", "lora"),
    ("ppo_critic", "zero2_cpu", "shared_prefix", "kl"),
    ("ppo_critic", "zero2_cpu", "static", "lora"),
    ("ppo_critic", "zero2_cpu", "hf", "plain"),
    ("ppo_critic", "zero3_cpu", "shared_prefix", "lora+kl"),
    ("ppo_critic", "zero3_cpu", "hf", "lora"),
]
CELLS = [*DEFAULT_CELLS, *(pytest.param(*c, marks=pytest.mark.slow) for c in SLOW_CELLS)]


@pytest.fixture(scope="module")
def tiny_arith() -> str:
    """The embedded model's folder, built once here rather than raced for by two ranks."""
    from grpo_lab.tiny import ensure_tiny_model

    return str(ensure_tiny_model())


def _train_args(objective: str, *overrides: str) -> list[str]:
    return ["-m", "grpo_lab.train", f"recipes/tiny_arith_{objective}.yaml", *COMMON, *overrides]


def _saved_digests(final: Path, objective: str) -> dict[str, str]:
    """The digest of each model loaded back from ``final/`` with the library's loaders."""
    from grpo_lab.models import PolicyWithValueHead, load_causal_lm, load_critic

    policy = PolicyWithValueHead if objective == "ppo_head" else None
    loaded = {
        "policy": policy.from_pretrained(str(final)) if policy else load_causal_lm(str(final))
    }
    if objective == "ppo_critic":
        loaded["critic"] = load_critic(str(final / "critic"))
    return {name: parameter_digest(model) for name, model in loaded.items()}


@pytest.mark.parametrize(("objective", "launch", "engine", "variant"), CELLS)
def test_every_objective_runs_under_every_launch_config(
    objective, launch, engine, variant, tiny_arith, tmp_path
):
    out = tmp_path / "run"
    args = _train_args(
        objective,
        f"model.name_or_path={tiny_arith}",
        f"rollout.backend={engine}",
        f"output_dir={out}",
        *VARIANTS[variant],
    )
    run(launch, args, tmp_path / "logs", timeout=TIMEOUT_S)

    steps = [r["step"] for r in MetricsWriter.read(out / "metrics.jsonl") if "reward/mean" in r]
    assert steps == [1, 2, 3]
    replicas = json.loads((out / "final" / REPLICAS_FILE).read_text())
    models = ["policy", "critic"] if objective == "ppo_critic" else ["policy"]
    assert sorted(replicas) == sorted(models)
    for name in models:
        # Each rank hashed its own copy at the end of the run: both ranks got there, and
        # they hold the same parameters.
        assert len(replicas[name]) == 2 and replicas[name][0] == replicas[name][1], replicas
    if "lora" not in variant:
        # The digests are those of the weights rank 0 saved.
        saved = _saved_digests(out / "final", objective)
        assert saved == {name: replicas[name][0] for name in models}


def test_compiled_engine_is_refused_under_zero3(tiny_arith, tmp_path):
    """One line naming the field, a non-zero exit, no traceback on either rank."""
    args = _train_args(
        "grpo",
        f"model.name_or_path={tiny_arith}",
        "rollout.backend=compiled",
        f"output_dir={tmp_path / 'run'}",
    )
    launch = start("zero3_cpu", args, tmp_path / "logs")
    assert launch.wait(TIMEOUT_S) != 0
    logs = {title: p.read_text() for title, p in launch.rank_logs().items()}
    stderr = [text for title, text in logs.items() if "stderr" in title]
    assert len(stderr) == 2, launch.report()
    for text in stderr:
        assert "rollout.backend" in text and "cannot run under DeepSpeed ZeRO-3" in text, text
        assert "Traceback" not in text, text


# ------------------------------------------------------------------ kill and resume under ZeRO-3

VOLATILE = ("time/", "perf/", "mem/")


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _steps_written(metrics: Path) -> list[int]:
    """The steps of the complete lines of a metrics file that is being written."""
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line).get("step") for line in text.split("\n")[:-1]]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["ppo_head", "ppo_critic"])
def test_zero3_sigkill_then_resume_matches_uninterrupted_run(objective, tiny_arith, tmp_path):
    """Both ranks SIGKILLed after step 3 of 5 and resumed with resume=auto (from the step-2
    checkpoint) write the same metrics rows and end with the same parameters as a run that was
    never interrupted."""
    common = _train_args(
        objective,
        f"model.name_or_path={tiny_arith}",
        "trainer.max_steps=5",
        "checkpoint.every=2",
        "checkpoint.keep=2",
        "trainer.warmup_steps=0",
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    run("zero3_cpu", [*common, f"output_dir={clean}"], tmp_path / "clean_logs", timeout=TIMEOUT_S)

    launch = start("zero3_cpu", [*common, f"output_dir={killed}"], tmp_path / "killed_logs")
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and launch.proc.poll() is None:
        if 3 in _steps_written(metrics):
            break
        time.sleep(0.05)
    assert launch.proc.poll() is None, "run finished before it could be killed\n" + launch.report()
    launch.kill()  # the launcher and both ranks, SIGKILL
    assert (killed / "checkpoints" / "step_0000002" / "COMPLETE").is_file()
    assert not (killed / "final").exists()

    resumed = run(
        "zero3_cpu",
        [*common, f"output_dir={killed}", "resume=auto"],
        tmp_path / "resumed_logs",
        timeout=TIMEOUT_S,
    )
    assert "resumed from" in resumed.log.read_text()

    assert _stable(MetricsWriter.read(metrics)) == _stable(
        MetricsWriter.read(clean / "metrics.jsonl")
    )
    a = json.loads((clean / "final" / REPLICAS_FILE).read_text())
    b = json.loads((killed / "final" / REPLICAS_FILE).read_text())
    assert a == b and all(len(set(d)) == 1 for d in a.values()), (a, b)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "step_0000002",
        "step_0000004",
    ]
