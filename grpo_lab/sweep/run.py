"""Running a sweep: every unfinished run as its own subprocess, one after another.

:func:`run_sweep` loads and plans the sweep (:mod:`.plan`), skips finished runs, resumes started
ones with ``resume=auto``, streams each run's output to the console and its ``train.log``, marks
it ``DONE`` or ``FAILED``, and at the end writes the report (:mod:`.report`). A failed run does
not stop the sweep; the result lists the failures.
"""

from __future__ import annotations

import codecs
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpo_lab.harness import format_duration
from grpo_lab.sweep.plan import (
    DONE,
    FAILED,
    LOG,
    MANIFEST,
    RunPlan,
    SweepSpec,
    check_runs,
    display_path,
    load_sweep,
    plan_runs,
)
from grpo_lab.sweep.report import aggregate_sweep
from grpo_lab.sweep.summary import SweepSummary


def run_command(cmd: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None) -> int:
    """Run ``cmd``, streaming its stdout+stderr to this console and appending it to ``log_path``.

    Returns the exit code. Interrupting (Ctrl-C) kills the child and re-raises.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} $ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while chunk := proc.stdout.read1(1 << 16):
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            sys.stdout.write(decoder.decode(b"", final=True))
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


@dataclass
class SweepResult:
    """What :func:`run_sweep` did. ``exit_code`` is 1 when any run failed, else 0."""

    spec: SweepSpec
    runs: list[RunPlan]
    ran: list[RunPlan] = field(default_factory=list)
    skipped: list[RunPlan] = field(default_factory=list)
    failed: list[tuple[RunPlan, int]] = field(default_factory=list)  # (run, exit code)
    summary: SweepSummary | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_sweep(
    path: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    report_only: bool = False,
) -> SweepResult:
    """Run every unfinished run of a sweep file, one after another, then write the report.

    ``overrides`` are ``key=value`` arguments (see :func:`load_sweep`). ``dry_run`` prints each
    run's command (and whether it would be skipped or resumed) and runs nothing. ``report_only``
    only aggregates what ``output_dir`` already holds. A failed run is recorded (``FAILED``, its
    log in ``train.log``) and the sweep goes on; the result lists the failures.
    """
    spec = load_sweep(path, overrides)
    runs = plan_runs(spec)
    result = SweepResult(spec, runs)
    if report_only:
        result.summary = aggregate_sweep(
            spec.output_dir, baseline=spec.baseline, target_accuracy=spec.target_accuracy
        )
        _say(f"report: {result.summary.report_path}")
        return result
    check_runs(spec, runs)
    if dry_run:
        for i, run in enumerate(runs, 1):
            state = (
                "finished, would be skipped"
                if run.is_finished()
                else "would resume"
                if run.has_started()
                else "would start"
            )
            _say(f"[{i}/{len(runs)}] {run.label} ({state})")
            print(shlex.join(run.command(resume=run.has_started())), flush=True)
        return result

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(spec, runs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    durations: list[float] = []
    todo = sum(not run.is_finished() for run in runs)
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run.label}"
        if run.is_finished():
            _say(f"{tag}: finished earlier, skipped")
            result.skipped.append(run)
            continue
        resume = run.has_started()
        cmd = run.command(resume=resume)
        eta = ""
        if durations:
            left = todo - len(durations)
            eta = f", about {format_duration(left * statistics.fmean(durations))} left"
        _say(
            f"{tag}: {'resuming' if resume else 'starting'} "
            f"(elapsed {format_duration(time.monotonic() - start)}{eta})\n  $ {shlex.join(cmd)}"
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        code = run_command(cmd, run.dir / LOG, env=env)
        seconds = time.monotonic() - t0
        durations.append(seconds)
        marker = {
            "command": cmd,
            "exit_code": code,
            "seconds": round(seconds, 3),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if code == 0:
            (run.dir / FAILED).unlink(missing_ok=True)
            (run.dir / DONE).write_text(json.dumps(marker, indent=1) + "\n")
            result.ran.append(run)
            _say(f"{tag}: done in {format_duration(seconds)}")
        else:
            (run.dir / FAILED).write_text(json.dumps(marker, indent=1) + "\n")
            result.failed.append((run, code))
            _say(
                f"{tag}: FAILED (exit {code}) after {format_duration(seconds)}; log: {run.dir / LOG}"
            )

    _say(
        f"{len(result.ran)} ran, {len(result.skipped)} skipped, {len(result.failed)} failed "
        f"in {format_duration(time.monotonic() - start)}"
    )
    if any(run.is_finished() for run in runs):
        result.summary = aggregate_sweep(
            spec.output_dir, baseline=spec.baseline, target_accuracy=spec.target_accuracy
        )
        _say(f"report: {result.summary.report_path}")
    if result.failed:
        lines = [f"  {run.label}: exit {code}, log {run.dir / LOG}" for run, code in result.failed]
        _say(f"{len(result.failed)} of {len(runs)} runs failed:\n" + "\n".join(lines))
    return result


def _write_manifest(spec: SweepSpec, runs: list[RunPlan]) -> None:
    manifest = {
        "sweep_file": display_path(spec.path),
        "sweep_text": spec.path.read_text(encoding="utf-8"),
        "cwd": str(Path.cwd()),
        "spec": spec.to_dict(),
        "runs": [
            {
                "group": run.group,
                "variant": run.variant,
                "grid": {k: v for k, v in run.grid},
                "seed": run.seed,
                "dir": str(run.dir),
                "command": run.command(),
            }
            for run in runs
        ],
    }
    text = json.dumps(manifest, indent=1, default=str)
    (spec.output_dir / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _say(message: str) -> None:
    print(f"[sweep] {message}", flush=True)
