"""The worker pool: hard time bound, crash recovery, memory bound, threads, clean shutdown; and
adversarial completions through score_batch (bounded, score 0, nothing executed)."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from grpo_lab.rewards import VerifierPool, score_batch

TIMEOUT_S = 1.0
# A fresh worker needs ~0.5 s (more on a loaded machine) before an item's clock starts.
SPAWN_MARGIN_S = 3.0


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def test_timeout_kills_and_replaces_the_worker(pool):
    pool.start()
    before = pool.stats()
    (old_pid,) = pool.worker_pids()
    start = time.perf_counter()
    # Bypasses the pre-screen on purpose: sympy would try to build 10^(10^10).
    statuses = pool.verify_many([("10^{10^{10}}", "5")], timeout_s=TIMEOUT_S)
    elapsed = time.perf_counter() - start
    assert statuses == ["timeout"]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 0.5
    after = pool.stats()
    assert (after.timeouts - before.timeouts, after.restarts - before.restarts) == (1, 1)
    assert not _alive(old_pid)
    assert pool.worker_pids() != [old_pid]
    assert pool.verify_many([("\\sqrt{8}", "2\\sqrt{2}")]) == ["correct"]


def test_items_after_a_timeout_in_the_same_batch_still_run(pool):
    statuses = pool.verify_many(
        [("\\sqrt{4}", "2"), ("10^{10^{10}}", "1"), ("\\sqrt{9}", "3"), ("\\sqrt{9}", "4")],
        timeout_s=TIMEOUT_S,
    )
    assert statuses == ["correct", "timeout", "correct", "wrong"]


def test_a_worker_killed_mid_item_is_a_crash(pool):
    pool.start()
    (pid,) = pool.worker_pids()
    before = pool.stats()
    killer = threading.Timer(0.3, os.kill, args=(pid, 9))
    killer.start()
    statuses = pool.verify_many([("10^{10^{10}}", "5")], timeout_s=5.0)
    killer.join()
    assert statuses == ["parse_error"]
    assert pool.stats().crashes - before.crashes == 1
    assert pool.verify_many([("\\frac{1}{2}", "0.5")]) == ["correct"]


def _address_space_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max address space"):
            return line.split()[3]  # soft limit, in bytes
    raise AssertionError("no address-space line")


def test_workers_run_under_the_memory_limit():
    limit = 768 * 1024**2
    with VerifierPool(num_workers=1, memory_limit_bytes=limit) as small:
        small.start()
        (pid,) = small.worker_pids()
        assert _address_space_limit(pid) == str(limit)
        assert small.verify_many([("\\sqrt{4}", "2")]) == ["correct"]


def test_close_reaps_every_worker():
    small = VerifierPool(num_workers=2)
    small.start()
    pids = small.worker_pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    small.close()
    small.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        small.verify_many([("1", "1")])


def test_workers_do_not_outlive_the_process():
    # The script never closes its pool; atexit, stdin EOF and PDEATHSIG each end the worker.
    script = (
        "import json\n"
        "from grpo_lab.rewards import get_default_pool, math_reward\n"
        "assert math_reward('\\\\boxed{\\\\sqrt{8}}', '2\\\\sqrt{2}') == 1.0\n"
        "print(json.dumps(get_default_pool().worker_pids()))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(pids) >= 1
    assert not any(_alive(p) for p in pids)


def test_pool_is_usable_from_several_threads(pool):
    results = {}

    def work(i):
        results[i] = pool.verify_many([(f"\\sqrt{{{i * i}}}", str(i))])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2, 6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {i: "correct" for i in range(2, 6)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=0)
    with VerifierPool(num_workers=1) as unstarted, pytest.raises(ValueError, match="timeout_s"):
        unstarted.verify_many([("1", "1")], timeout_s=0)


def _adversarial(marker: Path) -> list[tuple[str, str]]:
    m = str(marker)
    return [
        ("\\boxed{9^{9^{9^{9}}}}", "5"),
        ("\\boxed{10^{10^{10}}}", "5"),
        ("\\boxed{1000000!}", "5"),
        ("\\boxed{(x+1)^{3000}}", "x^{3000}+1"),
        ("#### " + "1" * 1_000_000, "5"),
        ("\\boxed{" + "(" * 1_000_000 + "}", "5"),
        ("x " * 500_000 + "\\boxed{" + "{" * 100, "5"),
        ("\\boxed{" + "{" * 900 + "1" + "}" * 900 + "}", "5"),
        (f"\\boxed{{__import__('os').system('touch {m}')}}", "0"),
        (f"\\boxed{{eval(\"open('{m}', 'w')\")}}", "0"),
        (f"\\boxed{{exec('import os; os.system(\"touch {m}\")')}}", "0"),
        (f"Answer: open('{m}', 'w').write('x')", "0"),
        (f"The final answer is $\\text{{{m}}}$ \\input{{{m}}}", "0"),
    ]


def test_adversarial_completions_are_bounded_and_score_zero(pool, tmp_path):
    marker = tmp_path / "pwned"
    for completion, gold in _adversarial(marker):
        start = time.perf_counter()
        result = score_batch([completion], [gold], timeout_s=TIMEOUT_S, pool=pool)[0]
        elapsed = time.perf_counter() - start
        assert result.score == 0.0, completion[:60]
        assert result.status in ("wrong", "no_answer", "timeout", "parse_error"), completion[:60]
        assert elapsed < TIMEOUT_S + SPAWN_MARGIN_S, (completion[:60], elapsed)
    assert not marker.exists()
    assert score_batch(["\\boxed{\\sqrt{2}}"], ["2^{1/2}"], pool=pool)[0].status == "correct"


def test_a_warm_spare_replaces_a_timed_out_worker():
    """After a timeout a spare starts warming; the next timeout swaps it in (no cold start for
    the items behind it), and closing the pool reaps the spare too."""
    with VerifierPool(1) as small:
        small.start()
        assert small.verify_many([("10^{10^{10}}", "5")], timeout_s=TIMEOUT_S) == ["timeout"]
        spare = small._spare
        assert spare is not None and _alive(spare.process.pid)
        assert small.verify_many([("10^{10^{10}}", "5")], timeout_s=TIMEOUT_S) == ["timeout"]
        assert small.worker_pids() == [spare.process.pid]
        assert small.verify_many([("\\sqrt{8}", "2\\sqrt{2}")]) == ["correct"]
        last_spare = small._spare.process.pid
    assert not _alive(spare.process.pid) and not _alive(last_spare)
