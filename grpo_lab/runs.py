"""Run folders: one run per ``output_dir``, never two mixed.

A run writes ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and ``final/`` into its
``output_dir``. A fresh run (``resume`` null) into a folder that already holds a run's metrics,
checkpoints or final model is refused by :func:`claim_output_dir`, naming the two ways on:
``resume=auto`` continues that run, ``overwrite=true`` (``grpo-lab train --overwrite``) deletes
its files first. A folder holding only ``config.yaml`` (a run that stopped before its first step)
counts as empty. ``resume=auto`` into a finished run that kept no checkpoint is refused too (it
would start over and replace that run). Files that are not a run's are never deleted.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from grpo_lab.checkpoint import list_checkpoints
from grpo_lab.errors import RunFolderError

logger = logging.getLogger("grpo_lab")

__all__ = ["RUN_FILES", "claim_output_dir", "clear_run", "run_files"]

#: What a run writes into its folder (and ``overwrite=true`` deletes); the first three mark a run.
RUN_FILES = ("metrics.jsonl", "checkpoints", "final", "final.tmp", "final.old", "config.yaml")
_MARKS_A_RUN = RUN_FILES[:3]


def run_files(output_dir: str | Path) -> list[str]:
    """The names in ``output_dir`` that show a run has been there (metrics, checkpoints, final)."""
    out = Path(output_dir)
    found = []
    for name in _MARKS_A_RUN:
        path = out / name
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.is_file() and path.stat().st_size == 0:
            continue  # opened but nothing recorded (e.g. a run set up, never stepped)
        if path.exists():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def claim_output_dir(output_dir: str | Path, *, resume: str | None, overwrite: bool) -> list[str]:
    """Check that a run may use ``output_dir``: the previous run's files that ``overwrite=true``
    will delete (see :func:`clear_run`), or a one-line :class:`RunFolderError` refusing.

    Reads only, so every process can call it and all refuse together. Called before anything is
    loaded (a refusal comes at once); the deletion waits until the run has loaded its data and
    models, so a run that fails to start deletes nothing.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    finished_without_checkpoints = (
        resume == "auto" and (out / "final").is_dir() and not list_checkpoints(out)
    )
    if finished_without_checkpoints and not overwrite:
        raise RunFolderError(
            f"resume=auto: output_dir {out} holds a finished run without checkpoints, so there "
            "is nothing to continue; start over with overwrite=true (grpo-lab train "
            "--overwrite), which deletes it, or choose another output_dir"
        )
    if resume and not finished_without_checkpoints:
        return []
    found = run_files(out)
    if found and not overwrite:
        raise RunFolderError(
            f"output_dir {out} already holds a run ({', '.join(found)}); continue it with "
            "resume=auto, start over with overwrite=true (grpo-lab train --overwrite), which "
            "deletes it, or choose another output_dir"
        )
    return found


def clear_run(output_dir: str | Path, found: list[str]) -> None:
    """Delete a previous run's files (:data:`RUN_FILES`) from ``output_dir``; main process only."""
    if not found:
        return
    out = Path(output_dir)
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.warning("overwrite=true: deleted the previous run in %s (%s)", out, ", ".join(found))
