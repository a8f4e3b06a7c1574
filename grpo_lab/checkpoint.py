"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<output_dir>/checkpoints/step_<NNNNNNN>/`` holding:

- accelerate's ``save_state`` files: every prepared model (or its DeepSpeed shards), optimizer,
  scheduler and the RNG states of every process (python, numpy, torch, CUDA), plus the registered
  custom objects (prompt sampler position, harness counters);
- ``trainer_state.json``: the step, skip counters and a fingerprint of the run (algorithm, value
  mode, model, parameter shapes) that a resume must match;
- ``COMPLETE``: written last. A folder without it is partial and is ignored with a warning.

The folder is written as ``step_<N>.tmp`` and renamed into place only when complete, so a crash
or a full disk mid-save never damages the previous checkpoint. Only the newest ``keep`` complete
checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("grpo_lab")

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit this run."""


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first. Partial ones are reported and skipped."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir() or not p.name.startswith(PREFIX):
            continue
        if p.name.endswith(".tmp") or not (p / MARKER).is_file():
            logger.warning("ignoring partial checkpoint %s (no %s marker)", p, MARKER)
            continue
        found.append(p)
    return sorted(found, key=step_of)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``None`` -> no resume; ``"auto"`` -> newest complete checkpoint or None; else that path."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"resume={resume!r}: not a complete checkpoint folder (no {MARKER} file)"
        )
    return path


def fingerprint(models: dict[str, object], extra: dict) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    shapes = {}
    for name, model in models.items():
        if model is None:
            continue
        h = hashlib.sha256()
        for pname, p in model.named_parameters():
            shape = tuple(getattr(p, "ds_shape", None) or p.shape)
            h.update(f"{pname}:{shape};".encode())
        shapes[name] = h.hexdigest()[:16]
    return {**extra, "param_shapes": shapes}


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    diffs = [
        f"{k}: checkpoint has {saved.get(k)!r}, this run has {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by a different setup\n  "
            + "\n  ".join(diffs)
        )


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, state: dict, *, keep: int
) -> Path:
    """Write a complete checkpoint for `step` atomically; prune to the newest `keep`.

    Every process must call this (DeepSpeed writes its shards from each rank). On failure the
    temporary folder is removed, earlier checkpoints are untouched and CheckpointError is raised.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{final.name}.tmp"
    ok = True
    error = ""
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(state, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            (tmp / MARKER).write_text(str(step))
    except OSError as e:  # full disk, permissions, ...
        ok, error = False, f"{type(e).__name__}: {e}"
    accelerator.wait_for_everyone()
    if not ok:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"saving checkpoint {final} failed ({error}); the previous checkpoint is kept"
        )
    if accelerator.is_main_process:
        replace_folder(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing any earlier `final`.

    The old folder is renamed aside before the new one is renamed in, so a crash at any point
    leaves either the old or the new folder complete (the aside copy is removed last)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(final.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, current_fingerprint: dict) -> dict:
    """Restore models, optimizers, schedulers, RNG and registered objects; return trainer state."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: cannot read {STATE_FILE} ({e})"
        ) from e
    check_fingerprint(state.get("fingerprint", {}), current_fingerprint, path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or incomplete: {type(e).__name__}: {e}"
        ) from e
    return state
