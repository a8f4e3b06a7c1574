"""``make answer``: measure what PPO's value model costs over GRPO and write docs/answer.md.

    python -m grpo_lab.answer                         # about 20-30 minutes on 2 CPU cores
    python -m grpo_lab.answer --machine "2-core CPU VM" --seeds 5 --budget-s 20

Three measurements, then one document:

1. the step benchmark (``benchmarks/step_bench.py``, in a subprocess; its last stdout line is
   JSON): ``--preset mid`` with the matched-update PPO variants when the benchmark offers them,
   else ``--preset tiny`` with the recipes' settings and again at matched updates;
2. the benefit sweep ``recipes/sweeps/answer_tiny.yaml``: every objective of
   :mod:`grpo_lab.objectives` on the tiny task, 5 seeds, the same wall-clock budget each;
3. the zero-advantage sweep ``recipes/sweeps/zero_advantage_tiny.yaml``: GRPO with and without
   skipping the rows of groups whose rewards are all equal.

Everything lands under ``--runs`` (default ``runs/answer``); finished runs and a saved benchmark
of the same command are reused, so an interrupted ``make answer`` picks up where it stopped.
The document (:mod:`.document`) goes to ``--out`` with its plots and CSVs in the folder of the
same name beside it (``docs/answer/``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

SWEEPS = Path(__file__).resolve().parents[2] / "recipes" / "sweeps"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m grpo_lab.answer",
        description="Measure GRPO against PPO (value head, critic; standard and matched updates) "
        "and write docs/answer.md with its plots and CSVs. Resumable: finished runs are skipped.",
    )
    p.add_argument("--out", type=Path, default=Path("docs/answer.md"), help="the document")
    p.add_argument("--runs", type=Path, default=Path("runs/answer"), help="measurements folder")
    p.add_argument("--seeds", type=int, help="seeds per objective (default: the sweep file's, 5)")
    p.add_argument(
        "--budget-s", type=float, help="training seconds per benefit run (default: the file's, 20)"
    )
    p.add_argument("--bench-impls", help="step_bench --impls (default: GRPO and the PPO variants)")
    p.add_argument(
        "--machine",
        default=f"{os.cpu_count()}-core CPU",
        help='what the document says it ran on, e.g. "2-core CPU VM"',
    )
    p.add_argument(
        "--skip-bench", action="store_true", help="reuse saved benchmark JSON only (no new run)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from grpo_lab.answer.document import Inputs, write_document
    from grpo_lab.answer.measure import (
        MeasureError,
        bench_runs,
        record_conditions,
        run_bench,
        run_study_sweep,
    )
    from grpo_lab.sweep import SweepError

    args = build_parser().parse_args(argv)
    start = time.monotonic()
    load_start = os.getloadavg()[0]
    try:
        benches = []
        impls = args.bench_impls.split(",") if args.bench_impls else None
        for run in bench_runs(impls=impls):
            saved = args.runs / f"{run.name}.json"
            if args.skip_bench and not saved.is_file():
                continue
            benches.append(run_bench(run, args.runs))
        common = [] if args.seeds is None else [f"seeds={list(range(args.seeds))}"]
        benefit, ran_benefit = run_study_sweep(
            SWEEPS / "answer_tiny.yaml",
            [
                *common,
                f"output_dir={args.runs / 'benefit'}",
                *([] if args.budget_s is None else [f"trainer.max_time_s={args.budget_s}"]),
            ],
        )
        skipping, ran_skipping = run_study_sweep(
            SWEEPS / "zero_advantage_tiny.yaml", [f"output_dir={args.runs / 'zero_advantage'}"]
        )
    except (MeasureError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    measured = ran_benefit + ran_skipping > 0 or any(not b.get("reused") for b in benches)
    invocations = record_conditions(
        args.runs / "conditions.json",
        measured,
        (load_start, os.getloadavg()[0]),
        (time.monotonic() - start) / 60,
    )
    dates = sorted({s["date"] for s in invocations}) or [time.strftime("%Y-%m-%d")]
    inputs = Inputs(
        machine=args.machine,
        date=dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}",
        load=(
            max((s["load_start"] for s in invocations), default=load_start),
            max((s["load_end"] for s in invocations), default=load_start),
        ),
        cores=os.cpu_count() or 1,
        benefit=benefit,
        skipping=skipping,
        benches=benches,
        results_md=SWEEPS.parents[1] / "benchmarks" / "RESULTS.md",
        runs=args.runs,
        command="make answer"
        if os.environ.get("MAKELEVEL")
        else shlex.join(
            ["python", "-m", "grpo_lab.answer", *(sys.argv[1:] if argv is None else argv)]
        ),
    )
    out = write_document(inputs, args.out)
    print(f"[answer] wrote {out} in {(time.monotonic() - start) / 60:.1f} min", flush=True)
    return 0
