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

:func:`save_checkpoint` writes one; :func:`restore` resumes a run from one (its schedules follow
the new run's learning rate, see :func:`apply_schedule`); :func:`save_model` writes the model a
run ends with (``final/``), loadable with transformers or peft.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from grpo_lab import distributed
from grpo_lab.config import to_dict
from grpo_lab.errors import (
    UserError,
    disk_full_error,
    is_out_of_space,
    is_write_failure,
    one_line,
)
from grpo_lab.harness import MetricsWriter
from grpo_lab.rollout import gather_params_for_generation

logger = logging.getLogger("grpo_lab")

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
PREFIX = "step_"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or does not fit this run."""

    kind = "checkpoint error"


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
        if not p.name.endswith(".tmp") and not p.name[len(PREFIX) :].isdigit():
            continue  # e.g. the ``.old`` copy of a folder being replaced
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
        hint = ""
        if any(d.startswith("param_shapes") for d in diffs):
            hint = " (param_shapes: another model.name_or_path or model.lora setting)"
        raise CheckpointError(
            f"cannot resume from {path}: it was written by a different setup{hint}\n  "
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
    except Exception as e:  # full disk, permissions; safetensors and torch's zip writer
        # report a full disk as their own errors, not as OSError.
        if not is_write_failure(e):
            raise
        ok = False
        error = "disk full: " if is_out_of_space(e, root) else ""
        error += f"{type(e).__name__}: {one_line(str(e))[:300]}"
    accelerator.wait_for_everyone()
    if not ok:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**20 if root.is_dir() else float("nan")
        raise CheckpointError(
            f"saving checkpoint {final} failed ({error}; {free:.0f} MiB free in {root}); "
            "the previous checkpoint is kept"
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


class CorruptCheckpointError(CheckpointError):
    """A complete-looking checkpoint whose files cannot be read back."""


#: Keys a resumed run may change: the schedule, cadences, logging, measurement, guards, and
#: settings that change how (not what) is computed. Every other key that differs from the
#: checkpoint's run refuses the resume. An entry ending in "." covers a whole section.
SAFE_ON_RESUME = (
    "output_dir", "resume", "overwrite",
    "model.name_or_path", "model.attn_implementation", "model.gradient_checkpointing",
    "model.trust_remote_code",
    "trainer.max_steps", "trainer.lr", "trainer.weight_decay", "trainer.adam_betas",
    "trainer.warmup_steps", "trainer.lr_scheduler", "trainer.max_grad_norm",
    "trainer.max_skipped_steps", "trainer.log_every", "trainer.eval_every", "trainer.progress_bar",
    "trainer.skip_zero_advantage", "trainer.max_logit_elements", "trainer.share_prompts",
    "trainer.cpu_threads", "trainer.micro_batch_size",
    "ppo.critic_lr", "rollout.batch_size", "data.num_eval", "data.eval_path",
    "reward.", "checkpoint.", "harness.", "divergence.",
)  # fmt: skip


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_ON_RESUME)


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(safe, unsafe) differences between the checkpoint's run config and this run's, each as
    ``"key: old -> new"``."""
    old, new = _flatten(saved), _flatten(current)
    safe, unsafe = [], []
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (safe if _is_safe(key) else unsafe).append(line)
    return safe, unsafe


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: cannot read {STATE_FILE} ({e})"
        ) from e
    needed = ("step", "skipped_total", "skipped_in_a_row")
    missing = [k for k in needed if k not in state] if isinstance(state, dict) else []
    if not isinstance(state, dict) or missing:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt: {STATE_FILE} lacks {', '.join(missing) or 'a mapping'}"
        )
    return state


def load_checkpoint(
    accelerator, path: Path, current_fingerprint: dict, current_config: dict | None = None
) -> dict:
    """Restore models, optimizers, schedulers, RNG and registered objects; return trainer state.

    With ``current_config`` (``config.to_dict``) and a checkpoint that stored its run's config,
    a key that may not change on resume (see :data:`SAFE_ON_RESUME`) refuses the resume, naming
    every such key.
    """
    state = read_state(path)
    saved_config = state.get("config")
    if current_config is not None and saved_config is not None:
        _, unsafe = config_changes(saved_config, current_config)
        if unsafe:
            raise CheckpointError(
                f"cannot resume from {path}: these settings differ from the run that wrote it "
                f"and cannot change mid-run: {'; '.join(unsafe)}; set them back, or start a new "
                "run in another output_dir (or overwrite=true)"
            )
    check_fingerprint(state.get("fingerprint", {}), current_fingerprint, path)
    try:
        accelerator.load_state(str(path))
    except Exception as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or incomplete: {type(e).__name__}: "
            f"{one_line(str(e))[:300]}"
        ) from e
    return state


def resume_from(
    accelerator,
    resume: str | None,
    output_dir: str | os.PathLike,
    current_fingerprint: dict,
    current_config: dict | None = None,
) -> tuple[Path, dict] | None:
    """Load the checkpoint ``resume`` names: (its path, its trainer state), or None (fresh).

    With ``resume="auto"`` a corrupt newest checkpoint is reported with a warning and the next
    newest complete one is tried, down to the oldest; a setup mismatch is never skipped over.
    """
    path = resolve_resume(resume, output_dir)
    if path is None:
        return None
    candidates = [path]
    if resume == "auto":
        candidates = list(reversed(list_checkpoints(output_dir)))
    for i, candidate in enumerate(candidates):
        try:
            return candidate, load_checkpoint(
                accelerator, candidate, current_fingerprint, current_config
            )
        except CorruptCheckpointError as e:
            if i == len(candidates) - 1:
                raise
            logger.warning(
                "%s; falling back to the previous complete checkpoint %s",
                one_line(str(e)),
                candidates[i + 1],
            )
    return None


def apply_schedule(scheduler, lr: float, *, betas=None, weight_decay: float | None = None) -> None:
    """Make a restored LambdaLR schedule follow this run's ``lr`` (and AdamW settings).

    ``load_state`` restores the checkpoint's base learning rates into the scheduler and the
    optimizer's param groups; the lambdas are this run's (functions are not saved). Without this
    a resumed run with a new ``trainer.lr`` would train on the old one.
    """
    sched = getattr(scheduler, "scheduler", scheduler)
    groups = sched.optimizer.param_groups
    sched.base_lrs = [lr for _ in groups]
    for group, fn in zip(groups, sched.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(sched.last_epoch)
        if betas is not None:
            group["betas"] = tuple(betas)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
    sched._last_lr = [group["lr"] for group in groups]


def restore(
    accelerator,
    cfg,
    output_dir: Path,
    current_fingerprint: dict,
    schedules: list[tuple[object, float]],
) -> dict | None:
    """Resume a run as ``cfg.resume`` says: load the checkpoint into the prepared models,
    optimizers, schedulers and registered objects, and return its trainer state (``step``,
    ``skipped_total``, ``skipped_in_a_row``); None for a fresh run.

    ``schedules`` pairs each scheduler with this run's base learning rate: the schedule follows
    this run's ``trainer.lr`` / ``max_steps`` / warmup, not the checkpoint's. Metrics rows written
    after the checkpoint are dropped (this run redoes them); a fresh run starts a fresh file.
    """
    metrics = output_dir / "metrics.jsonl"
    current = to_dict(cfg)
    found = resume_from(accelerator, cfg.resume, output_dir, current_fingerprint, current)
    if found is None:
        if accelerator.is_main_process:
            metrics.unlink(missing_ok=True)
        if cfg.resume == "auto":
            logger.info("resume=auto: no complete checkpoint in %s, starting fresh", output_dir)
        return None
    path, state = found
    t = cfg.trainer
    for scheduler, lr in schedules:
        apply_schedule(scheduler, lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    changed, _ = config_changes(state.get("config") or {}, current)
    changed = [c for c in changed if not c.startswith(("resume:", "overwrite:"))]
    if changed and state.get("config"):
        logger.info("resume applies changed settings: %s", "; ".join(changed))
    if accelerator.is_main_process:
        MetricsWriter.truncate_after(metrics, state["step"])
    accelerator.wait_for_everyone()
    logger.info("resumed from %s at step %d", path, state["step"])
    return state


def save_model(accelerator, path: Path, policy, tokenizer, critic=None) -> None:
    """Write the policy (or its LoRA adapter and value head), tokenizer and critic to ``path``.

    ``policy`` and ``critic`` as prepared. Written to ``<path>.tmp`` and renamed into place.
    Under ZeRO-3 every rank takes part in gathering the partitioned weights; the main process
    writes. ``replicas.json`` holds each rank's digest of its parameters; ranks that differ raise
    after the save. A full disk stops every rank with nothing replaced.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    failed: list[BaseException] = []

    def write(*steps) -> None:
        """Main process only; a full disk is remembered so every rank stops together."""
        if not main or failed:
            return
        try:
            for step in steps:
                step()
        except Exception as e:
            if not is_out_of_space(e, path.parent):
                raise
            failed.append(e)

    replicas = {}  # every rank's digest of its own parameters, checked below
    policy = accelerator.unwrap_model(policy)
    with gather_params_for_generation(policy):
        replicas["policy"] = distributed.replica_digests(accelerator, policy)
        write(
            lambda: shutil.rmtree(tmp, ignore_errors=True),
            lambda: policy.save_pretrained(tmp),
            lambda: tokenizer.save_pretrained(tmp),
        )
    if critic is not None:
        critic = accelerator.unwrap_model(critic)
        with gather_params_for_generation(critic):
            replicas["critic"] = distributed.replica_digests(accelerator, critic)
            write(lambda: critic.save_pretrained(tmp / "critic"))
    text = json.dumps(replicas, indent=2) + "\n"
    write(lambda: (tmp / distributed.REPLICAS_FILE).write_text(text))
    flag = distributed.global_sum(
        accelerator, torch.tensor(float(len(failed)), device=accelerator.device)
    )
    if flag > 0:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(
            path.parent,
            f"the model to {path}",
            "nothing was replaced; free space, then resume=auto continues from the newest "
            "checkpoint",
        ) from (failed[0] if failed else None)
    if main:
        replace_folder(tmp, path)
    accelerator.wait_for_everyone()
    distributed.check_replicas(replicas, str(path / distributed.REPLICAS_FILE))
