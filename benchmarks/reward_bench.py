"""Reward scoring throughput and per-item latency: GSM8K-style, MATH-style and adversarial items.

What it measures (pinned to one CPU core by default; worker processes inherit the pinning):

* GSM8K-style throughput: every reference solution of ``gsm8k_train.jsonl`` scored against its
  own answer and against answer + 1, in two ``score_batch`` calls. Without the file, synthetic
  solutions ending in ``#### N`` are generated. All of it is in-process fast path.
* MATH-style throughput: a few hundred generated ``\\boxed{}`` completions (fractions, roots,
  intervals, sets, tuples, polynomials, equations), each against a gold written differently, so
  most need the symbolic worker; one ``score_batch`` call, one worker, pool started beforehand.
* MATH-style in GRPO groups: ``--group-size`` completions per gold (the gold's own form, another
  equal form, or a wrong answer), as a GRPO batch looks: identical pairs are verified once and the
  worker caches parses, so repeated golds are cheap.
* Marked answers: completions written the way models mark final answers (``####``, boxes,
  "final answer is", "Answer:" with prose, a last line of math, display math after "Answer",
  multi-part boxes, word answers, units, intervals, inequalities), wrong answers, hedges and
  unmarked math, from the seeded generator of the differential test
  (``tests/rewards/marked_answers.py``); reported: agreement with the expected verdict and
  scores/s (one ``score_batch`` call, fresh worker).
* Per-item latency (p50 / p99 / max), scoring items one at a time: GSM8K items, fresh MATH-style
  items (a new draw, on a new worker, so no parse is cached), and an adversarial set (power towers, huge factorial, 1 MB completion, deep nesting, code injection,
  a polynomial that times out) under the default 2 s bound.

Usage::

    .venv/bin/python benchmarks/reward_bench.py [--cores 1] [--math-items 300] [--timeout-s 2.0]

Prints a table, then ONE JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from grpo_lab.rewards import VerifierPool, score_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.rewards.marked_answers import generate_cases  # noqa: E402


def _data_file() -> Path:
    override = os.environ.get("GRPO_LAB_SHARED_DATA")
    root = Path(override) if override else REPO / ".." / "shared" / "data"
    return root / "gsm8k_train.jsonl"


def gsm8k_items(rng: random.Random) -> tuple[list[str], list[str], str]:
    """Completions and golds (each solution twice: right gold, then gold + 1); and the source."""
    path = _data_file()
    if path.is_file():
        with path.open() as f:
            solutions = [json.loads(line)["answer"] for line in f]
        source = str(path.resolve())
    else:
        solutions = []
        for _ in range(7473):
            a, b = rng.randint(1, 999), rng.randint(1, 999)
            solutions.append(
                f"She has {a} and gets {b} more: {a}+{b}=<<{a}+{b}={a + b}>>{a + b}.\n#### {a + b:,}"
            )
        source = "synthetic"
    golds = [s.split("####")[-1].strip() for s in solutions]
    plus_one = [str(int(g.replace(",", "")) + 1) for g in golds]
    return solutions + solutions, golds + plus_one, source


def math_triple(rng: random.Random, i: int) -> tuple[str, str, str]:
    """(an equal answer written differently from the gold, the gold, a wrong answer); kind ``i``."""

    def fraction():
        p, q = rng.randint(1, 30), rng.randint(2, 30)
        k = rng.randint(2, 5)
        return (
            f"\\frac{{{p * k}}}{{{q * k}}}",
            f"\\dfrac{{{p}}}{{{q}}}",
            f"\\frac{{{p + 1}}}{{{q}}}",
        )

    def root():
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        return f"\\sqrt{{{a * a * b}}}", f"{a}\\sqrt{{{b}}}", f"{a + 1}\\sqrt{{{b}}}"

    def rationalised():
        b = rng.choice([2, 3, 5, 7])
        return f"\\frac{{\\sqrt{{{b}}}}}{{{b}}}", f"\\frac{{1}}{{\\sqrt{{{b}}}}}", f"\\sqrt{{{b}}}"

    def interval():
        a, b = sorted(rng.sample(range(-20, 20), 2))
        return f"\\left({a}, {b}\\right]", f"({a},{b}]", f"[{a},{b}]"

    def infinite_interval():
        a = rng.randint(-9, 9)
        return f"(-\\infty, {a})", f"(-\\infty,{a})", f"(-\\infty, {a}]"

    def solution_set():
        a, b = rng.sample(range(-9, 10), 2)
        return f"{b}, {a}", f"{a}, {b}", f"{a}, {b + 20}"

    def point():
        a, b = rng.sample(range(-9, 10), 2)
        return f"({a}, {b})", f"({a},{b})", f"({b}, {a})"

    def polynomial():
        a = rng.randint(1, 9)
        return f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"x^2+{a}x+{a * a}"

    def equation():
        a, b = rng.randint(2, 9), rng.randint(1, 9)
        return f"y = {b} + {a}x", f"y={a}x+{b}", f"y={a}x-{b}"

    def assignment():
        a = rng.randint(-50, 50)
        return f"x = {a}", str(a), str(a + 1)

    def pi_multiple():
        a = rng.randint(2, 12)
        return f"{a}\\pi", f"\\pi \\cdot {a}", f"{a + 1}\\pi"

    kinds = [
        fraction,
        root,
        rationalised,
        interval,
        infinite_interval,
        solution_set,
        point,
        polynomial,
        equation,
        assignment,
        pi_multiple,
    ]
    return kinds[i % len(kinds)]()


def _boxed(answer: str) -> str:
    return f"Simplifying step by step, we get $\\boxed{{{answer}}}$."


def math_items(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    """``n`` boxed completions, each against a gold written differently (1/3 of them wrong)."""
    completions, golds = [], []
    for i in range(n):
        pred, gold, wrong = math_triple(rng, i)
        completions.append(_boxed(wrong if rng.random() < 1 / 3 else pred))
        golds.append(gold)
    return completions, golds


def math_group_items(rng: random.Random, groups: int, size: int) -> tuple[list[str], list[str]]:
    """GRPO-shaped: ``size`` completions per gold, each the gold's form, another form or wrong."""
    completions, golds = [], []
    for i in range(groups):
        pred, gold, wrong = math_triple(rng, i)
        for _ in range(size):
            completions.append(_boxed(rng.choice((pred, gold, wrong))))
            golds.append(gold)
    return completions, golds


def adversarial_items() -> tuple[list[str], list[str]]:
    items = [
        ("\\boxed{9^{9^{9^{9}}}}", "5"),
        ("\\boxed{10^{10^{10}}}", "5"),
        ("\\boxed{1000000!}", "5"),
        ("\\boxed{(x+1)^{3000}}", "x^{3000}+1"),
        ("#### " + "1" * 1_000_000, "5"),
        ("x " * 500_000 + "\\boxed{" + "{" * 100, "5"),
        ("\\boxed{" + "{" * 900 + "1" + "}" * 900 + "}", "5"),
        ("\\boxed{__import__('os').system('true')}", "0"),
        ("\\boxed{eval(\"open('x', 'w')\")}", "0"),
        ("\\boxed{1 + {2}", "3"),
    ]
    return [c for c, _ in items], [g for _, g in items]


def throughput(completions, golds, pool, timeout_s) -> tuple[float, Counter]:
    start = time.perf_counter()
    results = score_batch(completions, golds, timeout_s=timeout_s, pool=pool)
    elapsed = time.perf_counter() - start
    return len(completions) / elapsed, Counter(r.status for r in results)


def latencies_ms(completions, golds, pool, timeout_s) -> tuple[dict[str, float], Counter]:
    times, statuses = [], Counter()
    for completion, gold in zip(completions, golds):
        start = time.perf_counter()
        (result,) = score_batch([completion], [gold], timeout_s=timeout_s, pool=pool)
        times.append((time.perf_counter() - start) * 1000)
        statuses[result.status] += 1
    times.sort()
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    summary = {"p50": statistics.median(times), "p99": p99, "max": times[-1]}
    return summary, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=1, help="CPU cores to pin to (0: no pinning)")
    parser.add_argument("--math-items", type=int, default=300)
    parser.add_argument("--group-size", type=int, default=8, help="completions per gold (GRPO G)")
    parser.add_argument("--latency-items", type=int, default=2000, help="GSM8K items timed singly")
    parser.add_argument("--marked-items", type=int, default=600, help="generated marked answers")
    parser.add_argument("--timeout-s", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    rng = random.Random(args.seed)
    gsm_c, gsm_g, source = gsm8k_items(rng)
    math_c, math_g = math_items(rng, args.math_items)
    lat_c, lat_g = math_items(random.Random(args.seed + 1), args.math_items)
    group_c, group_g = math_group_items(rng, args.math_items // args.group_size, args.group_size)
    adv_c, adv_g = adversarial_items()

    # Each symbolic workload gets a fresh worker (fresh parse cache), started before timing.
    with VerifierPool(num_workers=1) as pool:
        start = time.perf_counter()
        pool.start()
        worker_start_s = time.perf_counter() - start
        gsm_rate, gsm_status = throughput(gsm_c, gsm_g, pool, args.timeout_s)
        n = args.latency_items
        gsm_lat, _ = latencies_ms(gsm_c[:n], gsm_g[:n], pool, args.timeout_s)
        math_rate, math_status = throughput(math_c, math_g, pool, args.timeout_s)
        math_to_worker = pool.stats().items
    with VerifierPool(num_workers=1) as pool:
        pool.start()
        group_rate, group_status = throughput(group_c, group_g, pool, args.timeout_s)
        group_to_worker = pool.stats().items
    marked = generate_cases(args.seed, args.marked_items)
    with VerifierPool(num_workers=1) as pool:
        pool.start()
        start = time.perf_counter()
        marked_results = score_batch(
            [c.completion for c in marked],
            [c.gold for c in marked],
            timeout_s=args.timeout_s,
            pool=pool,
        )
        marked_rate = len(marked) / (time.perf_counter() - start)
    marked_status = Counter(r.status for r in marked_results)
    marked_agree = sum(
        (r.status == "correct") == c.expected for r, c in zip(marked_results, marked)
    )
    with VerifierPool(num_workers=1) as pool:
        pool.start()
        math_lat, _ = latencies_ms(lat_c, lat_g, pool, args.timeout_s)
        adv_lat, adv_status = latencies_ms(adv_c, adv_g, pool, args.timeout_s)
        stats = pool.stats()

    rows = [
        ("GSM8K-style", len(gsm_c), gsm_rate, gsm_lat, gsm_status),
        ("MATH-style", len(math_c), math_rate, math_lat, math_status),
        (f"MATH G={args.group_size}", len(group_c), group_rate, None, group_status),
        ("marked", len(marked), marked_rate, None, marked_status),
        ("adversarial", len(adv_c), None, adv_lat, adv_status),
    ]
    print(
        f"reward scoring benchmark  (cores={args.cores or 'all'}, 1 worker, timeout {args.timeout_s} s)"
    )
    print(f"GSM8K source: {source}; worker start-up {worker_start_s:.2f} s")
    print(f"MATH-style items sent to the worker: {math_to_worker} of {len(math_c)}")
    print(f"MATH G={args.group_size} items sent to the worker: {group_to_worker} of {len(group_c)}")
    header = f"{'workload':<13}{'items':>8}{'scores/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  statuses"
    print(header)
    print("-" * len(header))
    for name, count, rate, lat, status in rows:
        rate_text = f"{rate:>11,.0f}" if rate is not None else f"{'-':>11}"
        lat_text = (
            f"{lat['p50']:>9.2f}{lat['p99']:>9.1f}{lat['max']:>9.1f}" if lat else f"{'-':>9}" * 3
        )
        print(f"{name:<13}{count:>8}{rate_text}{lat_text}  {dict(sorted(status.items()))}")
    print(
        f"marked answers agreeing with the expected verdict: {marked_agree} of {len(marked)} "
        f"({marked_agree / len(marked):.1%})"
    )
    print(f"latency pool (fresh MATH items, then adversarial): {stats}")
    record = {
        "benchmark": "reward_scoring",
        "cores": args.cores,
        "timeout_s": args.timeout_s,
        "gsm8k_source": source,
        "gsm8k_items": len(gsm_c),
        "gsm8k_scores_per_s": round(gsm_rate, 1),
        "gsm8k_latency_ms": {k: round(v, 3) for k, v in gsm_lat.items()},
        "gsm8k_statuses": dict(gsm_status),
        "math_items": len(math_c),
        "math_items_to_worker": math_to_worker,
        "math_scores_per_s": round(math_rate, 1),
        "math_latency_ms": {k: round(v, 3) for k, v in math_lat.items()},
        "math_statuses": dict(math_status),
        "math_group_size": args.group_size,
        "math_group_items": len(group_c),
        "math_group_items_to_worker": group_to_worker,
        "math_group_scores_per_s": round(group_rate, 1),
        "math_group_statuses": dict(group_status),
        "marked_items": len(marked),
        "marked_agreement": round(marked_agree / len(marked), 4),
        "marked_scores_per_s": round(marked_rate, 1),
        "marked_statuses": dict(marked_status),
        "adversarial_items": len(adv_c),
        "adversarial_latency_ms": {k: round(v, 1) for k, v in adv_lat.items()},
        "adversarial_statuses": dict(adv_status),
        "worker_start_s": round(worker_start_s, 3),
        "adversarial_pool_timeouts": stats.timeouts,
        "adversarial_pool_restarts": stats.restarts,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
