"""The tiny recipes' fixed-seed metrics do not drift: 20 steps of each, against a recorded file.

Every optional knob defaults to off, so a change that is meant to leave existing runs alone must
reproduce the recorded rewards, losses, gradient norms, entropies and clip fractions bit for bit.
Timings, throughput and memory are not compared. The recorded numbers depend on the torch build
and the CPU (its model and the kernels torch picks for it), so the test runs only where they
were recorded (``environment`` in the file); regenerate the file with ``python tests/test_recipe_metrics.py`` only for a change
that is meant to alter these runs, and say why in the commit.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_recipes_20_steps.json"
RECIPES = ("tiny_arith_grpo", "tiny_arith_ppo_head", "tiny_arith_ppo_critic")
OVERRIDES = (
    "trainer.max_steps=20",
    "trainer.log_every=1",
    "trainer.progress_bar=false",
    "data.num_eval=32",
)
NOT_COMPARED = ("time/", "perf/", "mem/", "static/")


def environment() -> dict[str, str]:
    return {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vector_flags": _cpu_vector_flags(),
        "torch": torch.__version__,
    }


def _cpu_info(key: str) -> str:
    """The first ``key`` line of ``/proc/cpuinfo`` ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_vector_flags() -> str:
    """The CPU's vector-instruction flags: the oneDNN / MKL kernels (and so the float results)
    follow them, and a CPU's model name alone ("AMD EPYC") may not tell them apart."""
    flags = _cpu_info("flags").split()
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))))


def _cpu_model() -> str:
    """The CPU's model name: two x86_64 machines with different CPUs give different float
    results from the same kernels."""
    return _cpu_info("model name")


def run_recipe(recipe: str, out: Path) -> list[dict]:
    """The metrics rows of a 20-step run of ``recipes/<recipe>.yaml``, minus timings and memory."""
    from grpo_lab.config import load_config
    from grpo_lab.harness import MetricsWriter
    from grpo_lab.trainer import train

    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml", [*OVERRIDES, f"output_dir={out}"])
    train(cfg)
    rows = MetricsWriter.read(out / "metrics.jsonl")
    return [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in rows]


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_metrics_match_the_recorded_run(recipe, tmp_path):
    golden = _golden()
    if golden["environment"] != environment():
        pytest.skip(f"recorded on {golden['environment']}, this is {environment()}")
    expected = golden["runs"][recipe]
    got = run_recipe(recipe, tmp_path)
    assert len(got) == len(expected)
    for row, ref in zip(got, expected, strict=True):
        # Keys added since the recording (new diagnostics) are allowed; recorded ones must match.
        assert ref.keys() <= row.keys(), ref.keys() - row.keys()
        assert {k: row[k] for k in ref} == ref, row.get("step")


if __name__ == "__main__":
    import tempfile

    runs = {}
    for name in RECIPES:
        with tempfile.TemporaryDirectory() as d:
            runs[name] = run_recipe(name, Path(d))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"environment": environment(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
