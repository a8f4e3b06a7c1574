"""Is this tree's training step slower than an earlier revision's? step_bench on both, side by side.

    python benchmarks/revision_bench.py --base v0.3 --rounds 4
    python benchmarks/revision_bench.py --base HEAD~5 --impls grpo --steps 60 --warmup 3

The base revision is checked out into a temporary git worktree. Each round runs
``benchmarks/step_bench.py`` (``--preset``, ``--impls``, ``--steps``, ``--warmup``) in the base
and in this tree AT THE SAME TIME, each pinned to its own CPU core (``taskset``; the cores swap
every round), so both see the same machine conditions: on a shared VM, whole-process speed moves
by tens of percent from minute to minute, and runs one after the other mostly measure that.
The step_bench of each tree is its own, and it must accept the same options.

Reported per implementation and pooled: the geometric mean over rounds of this tree's median
step time over the base's, with a 95 % t-interval on the log ratios (scipy). The LAST stdout
line is one JSON object. Needs Linux (``taskset``) and two or more cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[1]


def _bench(tree: Path, core: int, out: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        "taskset",
        "-c",
        str(core),
        sys.executable,
        str(tree / "benchmarks" / "step_bench.py"),
        "--preset",
        args.preset,
        "--impls",
        args.impls,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=out.with_suffix(".log").open("w")
    )


def _interval(log_ratios: list[float]) -> dict[str, float]:
    """Geometric mean and 95 % t-interval of ratios given as logs."""
    mean = statistics.fmean(log_ratios)
    if len(log_ratios) < 2:
        return {"geomean": math.exp(mean), "ci_low": math.nan, "ci_high": math.nan}
    half = stats.t.ppf(0.975, len(log_ratios) - 1) * statistics.stdev(log_ratios)
    half /= math.sqrt(len(log_ratios))
    return {
        "geomean": math.exp(mean),
        "ci_low": math.exp(mean - half),
        "ci_high": math.exp(mean + half),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=4, help="side-by-side rounds (default 4)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--impls", default="grpo,ppo_head,ppo_critic")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    args = parser.parse_args(argv)
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        print("revision_bench: needs taskset and two or more cores", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="revision_bench_"))
    base = work / "base"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.base],
        check=True,
    )
    ratios: dict[str, list[float]] = {}
    try:
        for rnd in range(args.rounds):
            cores = (0, 1) if rnd % 2 == 0 else (1, 0)
            outs = {name: work / f"{name}_{rnd}.json" for name in ("base", "this")}
            procs = [
                _bench(base, cores[0], outs["base"], args),
                _bench(ROOT, cores[1], outs["this"], args),
            ]
            if any(p.wait() != 0 for p in procs):
                print(f"revision_bench: a step_bench failed; logs in {work}", file=sys.stderr)
                return 1
            got = {name: json.loads(path.read_text())["results"] for name, path in outs.items()}
            for impl in got["this"]:
                this, was = (statistics.median(got[n][impl]["step_s"]) for n in ("this", "base"))
                ratios.setdefault(impl, []).append(math.log(this / was))
                print(
                    f"round {rnd + 1}: {impl:<12} base {was * 1e3:7.1f} ms  this {this * 1e3:7.1f} ms  ratio {this / was:.3f}"
                )
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False
        )
    report = {impl: _interval(logs) for impl, logs in ratios.items()}
    report["pooled"] = _interval([x for logs in ratios.values() for x in logs])
    for name, r in report.items():
        print(
            f"{name:<12} this/base {r['geomean']:.3f}  (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f})"
        )
    print(
        json.dumps(
            {
                "base": args.base,
                "rounds": args.rounds,
                "preset": args.preset,
                "steps": args.steps,
                "ratio_this_over_base": report,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
