"""A pool of killable worker processes for symbolic answer comparison.

Why processes: sympy cannot be interrupted from another thread, and a single adversarial answer
(``10^{10^{10}}``) can compute or allocate forever. Each worker is a separate process that the pool
kills when an item runs past its wall-clock bound; the killed worker is replaced at once and the
item scores 0 with status ``"timeout"``.

Guarantees
----------
* Per-item wall-clock bound: measured from the moment the item is sent to a ready worker; at the
  deadline the worker gets SIGKILL. A worker that is still starting up is not charged to any item.
* Memory bound: each worker sets ``RLIMIT_AS`` (default 2 GiB) on itself, so a runaway allocation
  raises ``MemoryError`` in the worker (status ``"parse_error"``) instead of swapping the machine.
* Best effort on top (Linux): ``RLIMIT_NPROC`` 0 so a worker cannot start processes (root ignores
  it), and ``PR_SET_PDEATHSIG`` so a worker dies with the trainer even in the middle of an item.
* Thread safety: one lock serialises calls; any thread may call :meth:`VerifierPool.verify_many`.
* Clean shutdown: :meth:`VerifierPool.close` (also registered with ``atexit``) closes the workers'
  stdin, kills stragglers and waits for every process, so no zombies are left.

Workers are plain subprocesses (``python -P -m grpo_lab.rewards._worker``) talking JSON lines over
pipes, not ``multiprocessing`` children: no re-import of the caller's ``__main__`` (scripts need no
``if __name__ == "__main__"`` guard), and the parent never unpickles anything a worker wrote. The
trainer process itself never imports sympy or math-verify. A worker takes about half a second to
start (importing sympy and warming up the LaTeX parser).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_MEMORY_LIMIT_BYTES",
    "PoolStats",
    "VerifierPool",
    "get_default_pool",
    "set_default_pool",
]

DEFAULT_MEMORY_LIMIT_BYTES = 2 * 1024**3
_WORKER_MODULE = "grpo_lab.rewards._worker"
# The directory holding the `grpo_lab` package, so workers import this very copy of it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class PoolStats:
    """Counters since the pool was created.

    Attributes:
        items: items sent to a worker.
        timeouts: items whose worker was killed at the deadline (status ``"timeout"``).
        crashes: items whose worker died while working on them (status ``"parse_error"``).
        errors: items on which the worker raised, e.g. ``MemoryError`` (status ``"parse_error"``).
        restarts: workers started to replace a killed or dead one.
    """

    items: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0
    restarts: int = 0


@dataclass
class _Worker:
    process: subprocess.Popen
    started_at: float
    ready: bool = False
    pending_output: bytes = field(default=b"")

    def send(self, pred: str, gold: str) -> None:
        self.process.stdin.write((json.dumps([pred, gold]) + "\n").encode("ascii"))
        self.process.stdin.flush()

    def read_messages(self) -> list[object] | None:
        """Complete messages available on stdout now, or ``None`` once the worker has exited."""
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self.pending_output = (self.pending_output + data).split(b"\n")
        return [json.loads(line) for line in lines]


def _reap(worker: _Worker) -> None:
    """Kill (if still running) and wait for a worker, and close its pipes."""
    if worker.process.poll() is None:
        worker.process.kill()
    worker.process.wait()
    for stream in (worker.process.stdin, worker.process.stdout):
        try:
            stream.close()
        except OSError:
            pass


def _default_num_workers() -> int:
    # Leave most cores to the trainer: 1 worker on 2 cores, 4 on 8 or more.
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _close_at_exit(pool_ref: weakref.ref[VerifierPool]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.close()


class VerifierPool:
    """Worker processes that run ``grpo_lab.rewards._worker.compare`` under a hard time bound.

    Args:
        num_workers: worker processes; default ``max(1, min(4, cpu_count // 2))``.
        memory_limit_bytes: ``RLIMIT_AS`` for each worker (``None``: no limit). Default 2 GiB.
        start_timeout_s: how long a worker may take to become ready before the pool gives up
            with ``RuntimeError`` (a broken environment, not a bad answer).

    Workers start on the first :meth:`verify_many` (or explicitly with :meth:`start`).
    """

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES,
        start_timeout_s: float = 60.0,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers or _default_num_workers()
        self.memory_limit_bytes = memory_limit_bytes
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * self.num_workers
        # After the first timeout a spare worker is kept warming, so the next replacement is
        # (usually) ready at once instead of costing the next item a ~1 s interpreter start.
        self._spare: _Worker | None = None
        self._closed = False
        self._items = self._timeouts = self._crashes = self._errors = self._restarts = 0
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> PoolStats:
        """A snapshot of the pool's counters."""
        return PoolStats(self._items, self._timeouts, self._crashes, self._errors, self._restarts)

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (ready or starting)."""
        return [w.process.pid for w in self._workers if w is not None]

    def start(self) -> None:
        """Start every worker and wait until all are ready."""
        with self._lock:
            self._check_open()
            self._fill_slots()
            while not all(w is not None and w.ready for w in self._workers):
                self._wait_and_collect({}, [], time.monotonic() + 0.5)
                self._fill_slots()

    def verify_many(self, pairs: Sequence[tuple[str, str]], *, timeout_s: float = 2.0) -> list[str]:
        """Compare each ``(pred, gold)`` in a worker; one status per pair, in order.

        Statuses: ``"correct"``, ``"wrong"``, ``"timeout"`` (killed at ``timeout_s``) or
        ``"parse_error"`` (math-verify read nothing from one side, the worker raised, or it died).
        """
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        results: list[str | None] = [None] * len(pairs)
        pending = deque(range(len(pairs)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (item index, deadline)
        with self._lock:
            self._check_open()
            while pending or busy:
                self._fill_slots()
                self._dispatch(pairs, pending, busy, timeout_s)
                deadline = min((d for _, d in busy.values()), default=time.monotonic() + 0.5)
                self._wait_and_collect(busy, results, deadline)
                self._expire(busy, results)
        return [r if r is not None else "parse_error" for r in results]

    def close(self) -> None:
        """Stop every worker and reap it. Idempotent; the pool cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for worker in self._workers:
                if worker is not None:
                    try:
                        worker.process.stdin.close()  # EOF: the worker's loop ends
                    except OSError:
                        pass
            give_up = time.monotonic() + 2.0
            for slot, worker in enumerate(self._workers):
                if worker is not None:
                    try:
                        worker.process.wait(timeout=max(0.0, give_up - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
                    self._kill(slot)
            if self._spare is not None:
                _reap(self._spare)
                self._spare = None

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")

    def _fill_slots(self) -> None:
        for slot, worker in enumerate(self._workers):
            if worker is None:
                self._workers[slot] = self._spawn()

    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        # -P: do not put the current directory first on sys.path (a stray `sympy.py` there).
        command = [sys.executable, "-P", "-m", _WORKER_MODULE, str(self.memory_limit_bytes or 0)]
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True
        )
        return _Worker(process, started_at=time.monotonic())

    def _kill(self, slot: int) -> None:
        worker = self._workers[slot]
        if worker is not None:
            _reap(worker)
        self._workers[slot] = None

    def _replace(self, slot: int) -> None:
        """Kill the worker in ``slot``; the warm spare (if alive) takes its place and a new spare
        starts warming."""
        self._kill(slot)
        self._restarts += 1
        spare, self._spare = self._spare, None
        if spare is None or spare.process.poll() is not None:
            if spare is not None:
                _reap(spare)
            spare = self._spawn()
        self._workers[slot] = spare
        self._spare = self._spawn()

    def _dispatch(
        self,
        pairs: Sequence[tuple[str, str]],
        pending: deque[int],
        busy: dict[int, tuple[int, float]],
        timeout_s: float,
    ) -> None:
        for slot, worker in enumerate(self._workers):
            if not pending:
                return
            if worker is None or not worker.ready or slot in busy:
                continue
            index = pending.popleft()
            pred, gold = pairs[index]
            try:
                worker.send(pred, gold)
            except OSError:
                # The worker died while idle: not this item's fault, so retry it elsewhere.
                pending.appendleft(index)
                self._replace(slot)
                continue
            self._items += 1
            busy[slot] = (index, time.monotonic() + timeout_s)

    def _wait_and_collect(
        self, busy: dict[int, tuple[int, float]], results: list[str | None], deadline: float
    ) -> None:
        watched = {
            w.process.stdout.fileno(): slot
            for slot, w in enumerate(self._workers)
            if w is not None and (slot in busy or not w.ready)
        }
        if not watched:
            return
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        timeout_ms = max(0.0, deadline - time.monotonic()) * 1000
        for fd, _ in poller.poll(timeout_ms):
            self._collect(watched[fd], busy, results)
        now = time.monotonic()
        for slot, worker in enumerate(self._workers):
            if worker is not None and not worker.ready:
                if now - worker.started_at > self.start_timeout_s:
                    self._kill(slot)
                    raise RuntimeError(
                        f"reward worker not ready after {self.start_timeout_s:.0f} s"
                    )

    def _collect(
        self, slot: int, busy: dict[int, tuple[int, float]], results: list[str | None]
    ) -> None:
        worker = self._workers[slot]
        try:
            messages = worker.read_messages()
        except (OSError, ValueError):
            messages = None
        if not worker.ready:
            if messages is None or (messages and messages[0] != "ready"):
                code = worker.process.poll()
                self._kill(slot)
                raise RuntimeError(
                    f"reward worker failed to start (exit code {code}); see its stderr above"
                )
            worker.ready = bool(messages)
            return
        if messages == []:
            return  # part of a line; the rest follows
        index, _ = busy.pop(slot)
        if messages is None:
            self._crashes += 1
            results[index] = "parse_error"
            self._replace(slot)
            return
        kind, detail = messages[0]
        if kind == "ok":
            results[index] = detail
        else:
            self._errors += 1
            results[index] = "parse_error"

    def _expire(self, busy: dict[int, tuple[int, float]], results: list[str | None]) -> None:
        now = time.monotonic()
        for slot, (index, deadline) in list(busy.items()):
            if now >= deadline:
                del busy[slot]
                self._timeouts += 1
                results[index] = "timeout"
                self._replace(slot)


_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def get_default_pool() -> VerifierPool:
    """The process-wide pool used when no ``pool=`` is given (created on first use)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None or _default_pool.closed:
            _default_pool = VerifierPool()
        return _default_pool


def set_default_pool(pool: VerifierPool | None) -> None:
    """Replace the process-wide pool (closing the old one); ``None`` restores lazy creation.

    Use this to configure workers, e.g. ``set_default_pool(VerifierPool(4, memory_limit_bytes=...))``.
    """
    global _default_pool
    with _default_pool_lock:
        old, _default_pool = _default_pool, pool
    if old is not None and old is not pool:
        old.close()
