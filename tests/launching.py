"""Several processes from a test: ``accelerate launch`` with the project's launch configs.

Every launch gets a free rendezvous port (tests run beside other jobs), writes each rank's
stdout/stderr to its own files (torchrun's ``--log_dir`` / ``--tee``), and has a deadline: a
launch still running at its deadline is killed with its whole process tree (torchrun starts each
rank in its own session, so killing the launcher's process group would leave the ranks behind).
A failed or timed-out launch fails the test with the tail of every rank's log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
LOG_TAIL = 3000  # characters of each log shown on failure


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,  # the ranks import this checkout's grpo_lab
        "PYTHONUNBUFFERED": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class Launch:
    """One running ``accelerate launch``; ``log_dir`` holds its own log and each rank's."""

    name: str
    proc: subprocess.Popen
    log_dir: Path

    @property
    def log(self) -> Path:
        return self.log_dir / "launcher.log"

    def rank_logs(self) -> dict[str, Path]:
        """``{"rank 0 stdout": path, ...}`` for the files torchrun wrote (layout:
        ``<run id>/attempt_<k>/<local rank>/{stdout,stderr}.log``)."""
        found = {}
        for path in sorted((self.log_dir / "ranks").glob("*/attempt_*/*/std*.log")):
            attempt, rank = path.parent.parent.name, path.parent.name
            found[f"rank {rank} {path.stem} ({attempt})"] = path
        return found

    def report(self) -> str:
        """The tail of the launcher's log and of every rank's log."""
        parts = []
        for title, path in [("launcher", self.log), *self.rank_logs().items()]:
            text = path.read_text(errors="replace") if path.exists() else "(no file)"
            parts.append(f"----- {self.name}: {title} (last {LOG_TAIL} chars) -----\n")
            parts.append(text[-LOG_TAIL:] + "\n")
        return "".join(parts)

    def kill(self) -> None:
        """SIGKILL the launcher and every process under it (its ranks), by pid."""
        try:
            tree = [psutil.Process(self.proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        """The exit code; past ``timeout`` seconds the tree is killed and the test fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name}: still running after {timeout:.0f} s (a hang?), killed\n"
                + self.report()
            ) from None

    def check(self, timeout: float) -> Launch:
        """Wait; fail the test with every rank's log unless the launch exited 0."""
        rc = self.wait(timeout)
        assert rc == 0, f"{self.name}: exit code {rc}\n" + self.report()
        return self


def start(
    config: str, args: list[str], log_dir: Path, *, name: str = "", num_processes: int = 2
) -> Launch:
    """Start ``accelerate launch --config_file recipes/accelerate/<config>.yaml <args>`` with
    ``num_processes`` ranks, a free port and per-rank logs under ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(ACCELERATE), "launch",
        "--config_file", str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"),
        "--num_processes", str(num_processes),
        "--main_process_port", str(free_port()),
        "--log_dir", str(log_dir / "ranks"), "--tee", "3",
        *args,
    ]  # fmt: skip
    with (log_dir / "launcher.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
        )
    return Launch(name or f"{config} {' '.join(args)}", proc, log_dir)


def run(config: str, args: list[str], log_dir: Path, *, timeout: float, name: str = "") -> Launch:
    """:func:`start`, then :meth:`Launch.check`."""
    return start(config, args, log_dir, name=name).check(timeout)
