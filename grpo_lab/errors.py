"""User errors: one line that names the file, row or key and says what to do; no traceback.

Every failure the user can fix (a config key, a data file, a model name, a run folder, a
checkpoint, a full disk, a diverged run) raises a :class:`UserError`. The command line catches it
once (:func:`exit_code_for`, called by ``grpo_lab.cli.main`` and so by ``python -m
grpo_lab.train``) and prints ``grpo-lab: <kind>: <message>`` on one line, exit code 2 (3 for a
run stopped by a divergence guard). Anything else is a bug and keeps its traceback.
``--debug`` or ``GRPO_LAB_DEBUG=1`` shows the traceback of user errors too. Under several
processes each failing rank prints its own line, prefixed with its rank.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

__all__ = [
    "DataError",
    "DiskFullError",
    "DivergenceError",
    "ModelSourceError",
    "RunFolderError",
    "UserError",
    "debug_enabled",
    "disk_full_error",
    "exit_code_for",
    "is_disk_full",
    "is_out_of_space",
    "is_write_failure",
    "one_line",
]


class UserError(Exception):
    """A failure the user can fix; the message names what is wrong and what to do."""

    kind = "error"
    exit_code = 2


class DataError(UserError, ValueError):
    """A dataset file or dataset setting that cannot be used."""

    kind = "data error"


class ModelSourceError(UserError, ValueError):
    """A model name or folder that cannot be loaded."""

    kind = "model error"


class RunFolderError(UserError):
    """An output folder that holds another run."""

    kind = "run folder"


class DivergenceError(UserError, RuntimeError):
    """Training diverged (non-finite weights, entropy out of bounds) and was stopped."""

    kind = "training diverged"
    exit_code = 3


class DiskFullError(UserError, OSError):
    """A write failed because the disk is full."""

    kind = "disk full"


def debug_enabled() -> bool:
    return os.environ.get("GRPO_LAB_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def one_line(message: str) -> str:
    """``message`` with its lines joined by "; " (the CLI prints one line per error)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


_ENOSPC_TEXT = ("no space left on device", "os error 28", "disk quota exceeded")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an out-of-space error.

    Writers report it differently: ``OSError(ENOSPC)``, safetensors' ``SafetensorError ... os
    error 28``, torch's ``RuntimeError ... enforce fail at inline_container.cc`` (its zip writer;
    the cause is only seen by the free-space check of :func:`disk_full_error`'s callers).
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc).lower() for text in _ENOSPC_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


_WRITER_TEXT = ("inline_container.cc", "pytorchstreamwriter", "file write failed")
# Below this much free space a failed write is taken to be a full disk.
LOW_SPACE_BYTES = 64 * 2**20


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write (rather than a bug): an OSError, an out-of-space error,
    or a serialiser's own write error (safetensors, torch's zip writer)."""
    if isinstance(exc, OSError) or is_disk_full(exc):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return "safetensorerror" in text or any(t in text for t in _WRITER_TEXT)


def is_out_of_space(exc: BaseException, where: str | os.PathLike) -> bool:
    """:func:`is_disk_full`, or a write failure while ``where``'s disk has almost no space left
    (torch's zip writer reports ENOSPC only as "enforce fail at inline_container.cc")."""
    if is_disk_full(exc):
        return True
    free = _free_bytes(Path(where))
    return is_write_failure(exc) and free is not None and free < LOW_SPACE_BYTES


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def disk_full_error(where: str | os.PathLike, what: str, after: str = "") -> DiskFullError:
    """The one-line error for a write of ``what`` into ``where`` that ran out of space."""
    where = Path(where)
    free = _free_bytes(where)
    free_text = "" if free is None else f" ({free / 2**20:.0f} MiB free there now)"
    message = f"no space left on the disk holding {where}{free_text} while writing {what}"
    if after:
        message += f"; {after}"
    return DiskFullError(errno.ENOSPC, message)


def _rank_prefix() -> str:
    world = os.environ.get("WORLD_SIZE")
    if world and world != "1":
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def exit_code_for(exc: BaseException, *, prog: str = "grpo-lab", debug: bool = False) -> int | None:
    """Print ``exc`` as one line and return the exit code, or None when it is a bug to re-raise.

    Handles :class:`UserError` (and the library's errors built on it) and out-of-space errors
    from any writer. With ``debug`` (or ``GRPO_LAB_DEBUG=1``) returns None for every error.
    """
    if debug or debug_enabled():
        return None
    if isinstance(exc, DiskFullError) or (not isinstance(exc, UserError) and is_disk_full(exc)):
        where = getattr(exc, "filename", None)
        if isinstance(exc, DiskFullError):
            message = exc.strerror or str(exc)
        else:
            target = f" while writing {where}" if where else ""
            message = f"no space left on the device{target} ({one_line(str(exc))[:200]})"
        _say(f"{_rank_prefix()}{prog}: disk full: {one_line(message)}")
        return 2
    if isinstance(exc, PermissionError | IsADirectoryError) or (
        isinstance(exc, OSError) and exc.errno == errno.EROFS
    ):
        where = f" {exc.filename}" if exc.filename else ""
        _say(
            f"{_rank_prefix()}{prog}: permission denied{where} ({exc.strerror}); check the "
            "permissions of output_dir and of the files named in the config"
        )
        return 2
    if isinstance(exc, UserError):
        _say(f"{_rank_prefix()}{prog}: {exc.kind}: {one_line(str(exc))}")
        return exc.exit_code
    return None


def _say(line: str) -> None:
    """Write ``line`` and its newline to stderr in one call: ranks sharing the launcher's stderr
    then never splice their lines together (``print`` writes the newline separately)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
