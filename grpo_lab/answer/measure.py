"""The measurements behind docs/answer.md: the step benchmark and two sweeps, each resumable.

- :func:`bench_runs` chooses the step benchmark's runs from what ``benchmarks/step_bench.py``
  offers: ``--preset mid`` with the matched-update implementations when it has them, else
  ``--preset tiny`` twice (the recipes' own settings, then PPO at GRPO's update schedule through
  ``--set`` overrides from :data:`grpo_lab.objectives.MATCHED_UPDATES`).
- :func:`run_bench` runs one in a subprocess (its output teed to a log) and reads the last stdout
  line as JSON; a saved result of the same command is reused.
- :func:`run_study_sweep` runs a sweep file (``recipes/sweeps/answer_tiny.yaml``,
  ``zero_advantage_tiny.yaml``); finished runs are skipped, so a stopped ``make answer`` resumes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_lab.objectives import MATCHED_UPDATES, OBJECTIVES
from grpo_lab.sweep import SweepSummary, run_command, run_sweep
from grpo_lab.sweep.plan import display_path

REPO = Path(__file__).resolve().parents[2]
STEP_BENCH = REPO / "benchmarks" / "step_bench.py"
MATCHED = ("ppo_head_matched", "ppo_critic_matched")
# The standard PPO settings and TRL ride along on mid: the same workload, one run, one anchor.
MID_IMPLS = ("grpo", *MATCHED, "ppo_head", "ppo_critic", "trl")
TINY_IMPLS = ("grpo", "ppo_head", "ppo_critic")


class MeasureError(RuntimeError):
    """A measurement could not be made; the message names the command and its log."""


@dataclass(frozen=True)
class BenchRun:
    """One step_bench invocation; ``rename`` maps its impl names to objective names."""

    name: str  # file stem of its saved JSON and log
    argv: tuple[str, ...]
    rename: dict[str, str]


def _bench_offers(script: Path) -> tuple[set[str], set[str]]:
    """(presets, implementations) the step benchmark defines (read from its module)."""
    spec = importlib.util.spec_from_file_location("_grpo_lab_step_bench", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return set(getattr(module, "PRESETS", {})), set(getattr(module, "IMPLS", ()))


def bench_runs(
    script: Path = STEP_BENCH, impls: Sequence[str] | None = None, rounds: int = 3
) -> list[BenchRun]:
    """The step_bench runs to make: mid with matched impls when offered, else tiny twice."""
    presets, offered = _bench_offers(script)
    base = (sys.executable, display_path(script))
    if "mid" in presets and set(MATCHED) <= offered:
        chosen = tuple(impls or [i for i in MID_IMPLS if i in offered])
        return [
            BenchRun(
                "step_bench_mid",
                (*base, "--preset", "mid", "--impls", ",".join(chosen), "--rounds", "2")
                + ("--steps", "3", "--warmup", "1"),
                {},
            )
        ]
    chosen = tuple(impls or TINY_IMPLS)
    tiny = (*base, "--preset", "tiny", "--rounds", str(rounds), "--impls", ",".join(chosen))
    matched_set = [a for k, v in MATCHED_UPDATES.items() for a in ("--set", f"{k}={v}")]
    rename = {i: f"{i}_matched" for i in chosen if f"{i}_matched" in OBJECTIVES}
    return [
        BenchRun("step_bench_tiny", tiny, {}),
        BenchRun("step_bench_tiny_matched", (*tiny, *matched_set), rename),
    ]


def run_bench(run: BenchRun, folder: Path) -> dict[str, Any]:
    """Run (or reuse) one step_bench invocation; its JSON with ``rename`` applied to impl names."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / f"{run.name}.json"
    if saved.is_file():
        data = json.loads(saved.read_text(encoding="utf-8"))
        if data.get("argv") == list(run.argv[1:]):
            print(f"[answer] {run.name}: reusing {saved}", flush=True)
            return {**data, "reused": True}
    log = folder / f"{run.name}.log"
    print(f"[answer] {run.name}: $ {' '.join(run.argv)}", flush=True)
    code = run_command(list(run.argv), log)
    if code != 0:
        raise MeasureError(f"{' '.join(run.argv)} failed (exit {code}); log: {log}")
    data = last_json_line(log.read_text(encoding="utf-8", errors="replace"))
    if data is None:
        raise MeasureError(f"{' '.join(run.argv)}: no JSON object on its last line; log: {log}")
    data["results"] = {run.rename.get(k, k): v for k, v in data.get("results", {}).items()}
    data["argv"] = list(run.argv[1:])
    data["bench_run"] = run.name
    saved.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def last_json_line(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that parses as a JSON object, else None."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
        if line:
            return None
    return None


def run_study_sweep(path: Path, overrides: Sequence[str] = ()) -> tuple[SweepSummary, int]:
    """Run a sweep file's unfinished runs; (its summary, runs made now). A failed run is an error."""
    result = run_sweep(path, overrides=list(overrides))
    if result.failed:
        failed = ", ".join(f"{r.label} (log {r.dir / 'train.log'})" for r, _ in result.failed)
        raise MeasureError(f"{path}: runs failed: {failed}; rerun to retry them")
    if result.summary is None:
        raise MeasureError(f"{path}: no finished runs")
    return result.summary, len(result.ran)


def record_conditions(path: Path, measured: bool, load: tuple[float, float], minutes: float):
    """The invocations that measured (date, load average at start and end), kept in ``path``.

    An invocation that only reused earlier measurements adds nothing, so the document reports the
    conditions the numbers were taken under, not those of the last regeneration.
    """
    invocations = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if measured:
        invocations.append(
            {
                "date": time.strftime("%Y-%m-%d"),
                "load_start": round(load[0], 2),
                "load_end": round(load[1], 2),
                "minutes": round(minutes, 1),
            }
        )
        path.write_text(json.dumps(invocations, indent=1) + "\n", encoding="utf-8")
    return invocations
