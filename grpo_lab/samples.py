"""Completion samples: what the model writes, with its reward, written to ``samples.jsonl``.

Every ``harness.sample_every`` training steps, and at the last step, the first
``harness.sample_prompts`` prompts of the main process's batch are written with all their G
completions, one JSON record per completion::

    {"step": 10, "group": 0, "sample": 3, "id": "gsm8k/train/17", "prompt": "...",
     "completion": "...", "extracted": "72", "gold": "72", "reward": 1.0, "status": "correct",
     "truncated": false, "advantage": 0.87, "length": 41}

``status`` is the reward's (:data:`grpo_lab.rewards.STATUSES`); ``truncated`` says the completion
hit ``rollout.max_new_tokens`` without an end-of-sequence token. ``advantage`` is the mean of the
completion's per-token advantages (the same value at every token for GRPO / RLOO), ``length`` its
token count (EOS included). Everything comes from the step's own rollout, reward and advantages,
so sampling costs the decoding of a few prompts and one file write.

The file is written with :class:`grpo_lab.harness.MetricsWriter` and read with
``MetricsWriter.read``; a resumed run drops the records after its checkpoint, as it does for
``metrics.jsonl``. The same rows go to the trackers as a table (:func:`grpo_lab.trackers.log_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpo_lab.data import Problem
from grpo_lab.harness import MetricsWriter
from grpo_lab.rewards import ScoreResult
from grpo_lab.rollout import RolloutBatch
from grpo_lab.trackers import log_table

SAMPLES_FILE = "samples.jsonl"

#: Columns of the tracker table, in order (a subset of every record's keys).
TABLE_COLUMNS = (
    "step",
    "group",
    "prompt",
    "completion",
    "extracted",
    "gold",
    "reward",
    "status",
    "truncated",
    "advantage",
    "length",
)


def is_due(step: int, *, every: int, last_step: int) -> bool:
    """Whether training step ``step`` (1-based) is sampled: every ``every`` steps and the last."""
    return step == last_step or (every > 0 and step % every == 0)


@dataclass(frozen=True)
class ScoredRow(ScoreResult):
    """A reward result that keeps its completion text and problem, so the rows of a selection
    (e.g. dynamic sampling's) can still be written as samples."""

    completion: str = ""
    problem: Problem | None = None


def sample_records(
    step: int,
    *,
    problems: Sequence[Problem],
    batch: RolloutBatch,
    completions: Sequence[str],
    results: Sequence[ScoreResult],
    advantages: torch.Tensor,
    tokenizer: Any,
    num_prompts: int,
) -> list[dict[str, Any]]:
    """One record per completion of the first ``num_prompts`` prompts of a step.

    Args:
        step: the training step the rollout belongs to.
        problems: the step's B prompts (this process's share), prompt-major like ``batch``.
        batch: the rollout (N = B * G rows; rows [g*G:(g+1)*G] are the samples of prompt g).
        completions: the N decoded completion texts the reward scored.
        results: the N reward results.
        advantages: [N, C] per-token advantages the update used.
        tokenizer: decodes the prompts of the sampled rows.
        num_prompts: prompts to keep (fewer when the batch has fewer).
    """
    G = batch.group_size
    n_rows = min(num_prompts, len(problems)) * G
    if n_rows == 0:
        return []
    mask = batch.completion_mask[:n_rows].float()  # [n, C]
    lengths = mask.sum(dim=1)  # [n]
    advantage = (advantages[:n_rows].float() * mask).sum(dim=1) / lengths.clamp(min=1)  # [n]
    records = []
    for row in range(n_rows):
        group = row // G
        if row % G == 0:
            prompt_ids = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
            prompt = tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=False)
        problem, result = problems[group], results[row]
        records.append(
            {
                "step": step,
                "group": group,
                "sample": row % G,
                "id": problem.id,
                "prompt": prompt,
                "completion": completions[row],
                "extracted": result.extracted,
                "gold": problem.answer,
                "reward": result.score,
                "status": result.status,
                "truncated": bool(batch.truncated[row]),
                "advantage": float(advantage[row]),
                "length": int(lengths[row]),
            }
        )
    return records


class SampleLog:
    """``samples.jsonl`` of a run folder, plus the same rows as a table to the trackers.

    Args:
        output_dir: the run folder.
        start_step: the step training starts from: 0 starts a fresh file, a resumed step drops
            the records written after it.
        every, num_prompts, last_step: ``harness.sample_every``, ``harness.sample_prompts``,
            ``trainer.max_steps``.
        accelerator: sends the table to its trackers (None: no table).
        enabled: False on every process but the main one (nothing is written).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        start_step: int,
        every: int,
        num_prompts: int,
        last_step: int,
        accelerator: Any = None,
        enabled: bool = True,
    ) -> None:
        self.path = Path(output_dir) / SAMPLES_FILE
        self.every, self.num_prompts, self.last_step = every, num_prompts, last_step
        self.accelerator = accelerator
        self.enabled = enabled and num_prompts > 0
        if enabled:
            if start_step == 0:
                self.path.unlink(missing_ok=True)
            else:
                MetricsWriter.truncate_after(self.path, start_step)

    def due(self, step: int) -> bool:
        return self.enabled and is_due(step, every=self.every, last_step=self.last_step)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` (one step's) to the file and send them to the trackers."""
        if not self.enabled or not records:
            return
        with MetricsWriter(self.path) as writer:
            for record in records:
                writer.write(record)
        rows = [[r[c] for c in TABLE_COLUMNS] for r in records]
        log_table(self.accelerator, "samples", TABLE_COLUMNS, rows, step=records[0]["step"])
