"""Sandbox worker process: symbolic comparison with math-verify.

Run as ``python -m grpo_lab.rewards._worker MEMORY_LIMIT_BYTES`` by ``sandbox.VerifierPool``; the
trainer process never imports this module, so sympy never sees model text there.

Protocol (JSON, one message per line): the worker writes ``"ready"`` once warmed up, then for each
request ``[pred, gold]`` on stdin writes ``["ok", status]`` or ``["error", exception class name]``
on stdout. It exits on EOF. JSON rather than pickle so that the parent never unpickles anything a
worker produced.

Only math-verify's LaTeX extraction is used: its plain-expression extraction goes through
``sympy.parse_expr``, which evaluates Python, so it is never enabled here.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import resource
import signal
import sys

from math_verify import LatexExtractionConfig, parse, verify

# math-verify warns once per process that its signal-based timeouts are off; the parent process
# enforces the wall-clock bound by killing this process instead.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)

_LATEX_ONLY = (LatexExtractionConfig(boxed_match_priority=0),)
_PR_SET_PDEATHSIG = 1


# Parsing (latex2sympy's ANTLR grammar, pure Python) costs 10-150 ms and dominates a comparison;
# the G completions of a GRPO group share one gold, and answers repeat, so parses are cached.
# sympy objects are immutable, so sharing them between comparisons is safe.
@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple:
    # A bare `$` is a currency sign in an answer; inside `$\boxed{...}$` it would end the math span.
    body = answer.replace("\\$", "").replace("$", "")
    parsed = parse("$\\boxed{" + body + "}$", extraction_config=_LATEX_ONLY, parsing_timeout=None)
    return tuple(parsed)


def compare(pred: str, gold: str) -> str:
    """``"correct"``, ``"wrong"`` or ``"parse_error"`` (nothing could be read from one side)."""
    gold_parsed = _parse(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return "parse_error"
    # NOTE: verify is asymmetric (gold first): assignments like `x=3` are unwrapped on that basis.
    equal = verify(list(gold_parsed), list(pred_parsed), timeout_seconds=None)
    return "correct" if equal else "wrong"


def _confine(memory_limit_bytes: int) -> None:
    """Memory bound, no child processes, and death with the parent (the last two best effort)."""
    if memory_limit_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # root ignores it
    except (ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str]) -> None:
    memory_limit_bytes = int(argv[1]) if len(argv) > 1 else 0
    parent = os.getppid()
    # Replies go to a private copy of stdout; fd 1 then points at stderr, so a stray print (from
    # Python or C) can never corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    compare("1", "1")  # warm up the LaTeX parser before reporting ready
    _confine(memory_limit_bytes)
    if os.getppid() != parent:
        return  # the parent died before PDEATHSIG was armed
    replies.write(json.dumps("ready") + "\n")
    replies.flush()
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            reply = ["ok", compare(pred, gold)]
        except Exception as exc:  # any failure (MemoryError, RecursionError, ...) is reported
            reply = ["error", type(exc).__name__]
        try:
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
        except BrokenPipeError:
            return  # the parent closed the pool


if __name__ == "__main__":
    main(sys.argv)
