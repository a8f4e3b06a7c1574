"""The tiny recipes' fixed-seed metrics do not drift: 20 steps of each, against a recorded file.

Every optional knob defaults to off, so a change that is meant to leave existing runs alone must
reproduce the recorded rewards, losses, gradient norms, entropies and clip fractions bit for bit.
Timings, throughput and memory are not compared. The recorded numbers depend on the torch build
and the CPU (its model and the kernels torch picks for it), so the whole run is compared bit for
bit only where it was recorded (``environment`` in the file). Elsewhere the runs drift apart step
by step as rounding differs, so only the first rows are compared (the starting evaluation and
step 1, made from the same weights and seed), to float32 rounding: a change to the maths shows
there on any machine. Regenerate the file with ``python tests/test_recipe_metrics.py`` only for a
change that is meant to alter these runs, and say why in the commit.
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


# Elsewhere than the recording: the rows compared, and how closely. Step 1's losses and norms
# agree to float32 rounding amplified through a few layers (~1e-6 relative); quantities that are
# themselves rounding noise (the rollout/recompute log-prob gaps, step 1's KL ~1e-8) within 1e-4.
# Checked with another reduction order on the recording CPU (trainer.cpu_threads=2): step 1 was
# bit-identical, and every later row differed only in those gaps (~1e-7), all within tolerance.
FIRST_ROWS = 2
REL, ABS = 1e-3, 1e-4


def compare(got: list[dict], expected: list[dict], *, exact: bool) -> None:
    """Assert that ``got`` reproduces the recorded rows: all of them bit for bit (``exact``), or
    the first :data:`FIRST_ROWS` to float32 rounding."""
    if exact:
        assert len(got) == len(expected)
    else:
        got, expected = got[:FIRST_ROWS], expected[:FIRST_ROWS]
    for row, ref in zip(got, expected, strict=True):
        # Keys added since the recording (new diagnostics) are allowed; recorded ones must match.
        assert ref.keys() <= row.keys(), ref.keys() - row.keys()
        mine = {k: row[k] for k in ref}
        assert mine == (ref if exact else pytest.approx(ref, rel=REL, abs=ABS)), row.get("step")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_metrics_match_the_recorded_run(recipe, tmp_path):
    golden = _golden()
    got = run_recipe(recipe, tmp_path)
    compare(got, golden["runs"][recipe], exact=golden["environment"] == environment())


def test_compare_is_exact_where_recorded_and_within_rounding_elsewhere():
    ref = [{"step": 0, "eval/greedy_acc": 0.40625}, {"step": 1, "loss/policy": 0.25, "kl": 1e-8}]
    later = [{"step": 2, "loss/policy": 0.5}]
    # Rounding: 1e-6 relative on the loss, 3e-8 absolute on a ~1e-8 quantity.
    rounded = [ref[0], {"step": 1, "loss/policy": 0.25 * (1 + 1e-6), "kl": 4e-8}]
    compare(ref + later, ref + later, exact=True)
    with pytest.raises(AssertionError):
        compare(rounded + later, ref + later, exact=True)
    compare(rounded + [{"step": 2, "loss/policy": 0.7}], ref + later, exact=False)
    # A change to the maths: step 1's loss 1 % off, or a recorded key gone.
    with pytest.raises(AssertionError):
        compare([ref[0], {"step": 1, "loss/policy": 0.2525, "kl": 1e-8}], ref, exact=False)
    with pytest.raises(AssertionError):
        compare([ref[0], {"step": 1, "loss/policy": 0.25}], ref, exact=False)
    # Where recorded, a run of another length is a change too.
    with pytest.raises(AssertionError):
        compare(ref, ref + later, exact=True)


if __name__ == "__main__":
    import tempfile

    runs = {}
    for name in RECIPES:
        with tempfile.TemporaryDirectory() as d:
            runs[name] = run_recipe(name, Path(d))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"environment": environment(), "runs": runs}, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
