"""Completion samples: records built by hand, the file across a resume, the tracker table, and
the samples a short training run writes."""

from __future__ import annotations

import pytest
import torch

from grpo_lab.config import load_config
from grpo_lab.data import Problem
from grpo_lab.harness import MetricsWriter
from grpo_lab.rewards import ScoreResult, score_batch
from grpo_lab.rollout import RolloutBatch
from grpo_lab.samples import TABLE_COLUMNS, SampleLog, is_due, sample_records
from grpo_lab.tiny import build_tokenizer
from grpo_lab.trainer import setup, train_loop


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sample_records_by_hand():
    """Two prompts x G=2; only the first prompt is kept. Advantages are averaged over each
    completion's own tokens: row 0 has 2 tokens (0.5 + 1.5) / 2 = 1.0 (the 9.0 is past its EOS),
    row 1 has 3 tokens (-1 - 2 - 3) / 3 = -2.0."""
    tok = build_tokenizer()
    pad, eos = tok.pad_token_id, tok.eos_token_id
    p0, p1 = _ids(tok, "1+2="), _ids(tok, "10+20=")  # 4 and 6 tokens, left-padded to 6
    prompt_ids = torch.tensor([[pad, pad, *p0]] * 2 + [p1] * 2)
    prompt_mask = (prompt_ids != pad).long()
    three = _ids(tok, "3")[0]
    completion_ids = torch.tensor(
        [[three, eos, pad], [three] * 3, [eos, pad, pad], [eos, pad, pad]]
    )
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0]])
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampling_logp=torch.zeros(4, 3),
        truncated=torch.tensor([False, True, False, False]),
        group_size=2,
    )
    problems = [Problem("1+2=", "3", id="a"), Problem("10+20=", "30", id="b")]
    results = [
        ScoreResult(1.0, "correct", "3"),
        ScoreResult(0.0, "wrong", "333"),
        ScoreResult(0.0, "no_answer", None),
        ScoreResult(0.0, "no_answer", None),
    ]
    advantages = torch.tensor([[0.5, 1.5, 9.0], [-1.0, -2.0, -3.0], [0.0] * 3, [0.0] * 3])
    kwargs = dict(
        problems=problems,
        batch=batch,
        completions=["3", "333", "", ""],
        results=results,
        advantages=advantages,
        tokenizer=tok,
    )
    records = sample_records(7, num_prompts=1, **kwargs)
    common = {"step": 7, "group": 0, "id": "a", "prompt": "1+2=", "gold": "3"}
    assert records == [
        {**common, "sample": 0, "completion": "3", "extracted": "3", "reward": 1.0,
         "status": "correct", "truncated": False, "advantage": 1.0, "length": 2},
        {**common, "sample": 1, "completion": "333", "extracted": "333", "reward": 0.0,
         "status": "wrong", "truncated": True, "advantage": -2.0, "length": 3},
    ]  # fmt: skip
    everything = sample_records(7, num_prompts=5, **kwargs)
    assert [(r["group"], r["sample"], r["prompt"]) for r in everything[2:]] == [
        (1, 0, "10+20="),
        (1, 1, "10+20="),
    ]
    assert sample_records(7, num_prompts=0, **kwargs) == []


def test_is_due_every_n_steps_and_the_last():
    assert [s for s in range(1, 13) if is_due(s, every=5, last_step=12)] == [5, 10, 12]
    assert [s for s in range(1, 13) if is_due(s, every=0, last_step=12)] == [12]


def _record(step: int, sample: int = 0) -> dict:
    row = {c: f"{c}-{step}" for c in TABLE_COLUMNS}
    return {**row, "step": step, "group": 0, "sample": sample}


class _Tracker:
    def __init__(self, name):
        self.name, self.calls = name, []

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def log_table(self, table_name, columns=None, data=None, step=None):
        self.calls.append(("log_table", table_name, columns, data, step))


class _Accelerator:
    def __init__(self, *names):
        self.trackers = [_Tracker(n) for n in names]


def test_sample_log_resume_fresh_start_and_tracker_table(tmp_path):
    acc = _Accelerator("wandb", "tensorboard", "trackio")
    log = SampleLog(tmp_path, start_step=0, every=2, num_prompts=1, last_step=5, accelerator=acc)
    assert [s for s in range(1, 6) if log.due(s)] == [2, 4, 5]
    for step in (2, 4):
        log.write([_record(step, 0), _record(step, 1)])
    file = tmp_path / "samples.jsonl"
    assert [r["step"] for r in MetricsWriter.read(file)] == [2, 2, 4, 4]

    wandb, tensorboard, trackio = acc.trackers
    kind, name, columns, data, step = wandb.calls[-1]
    assert (kind, name, columns, step) == ("log_table", "samples", list(TABLE_COLUMNS), 4)
    assert data == [[_record(4, i)[c] for c in TABLE_COLUMNS] for i in (0, 1)]
    kind, values, step = tensorboard.calls[-1]
    assert kind == "log" and step == 4
    table = values["samples"].splitlines()
    assert table[0] == "| " + " | ".join(TABLE_COLUMNS) + " |" and len(table) == 2 + 2
    assert trackio.calls == []  # no table support

    # Resumed from a step-2 checkpoint: the step-4 records are dropped, step 2 kept.
    SampleLog(tmp_path, start_step=2, every=2, num_prompts=1, last_step=5)
    assert [r["step"] for r in MetricsWriter.read(file)] == [2, 2]
    # Another process than the main one never touches the file.
    SampleLog(tmp_path, start_step=0, every=2, num_prompts=1, last_step=5, enabled=False)
    assert file.exists()
    # A fresh run starts a fresh file.
    off = SampleLog(tmp_path, start_step=0, every=2, num_prompts=0, last_step=5)
    assert not file.exists() and not off.due(2) and not off.due(5)


def test_a_short_run_writes_samples_that_match_its_rollouts(tiny_model_dir, tmp_path):
    """Steps 2 (sample_every) and 3 (the last) are sampled: one prompt with its G=4 completions.
    Each record's reward and status agree with rescoring its completion independently, GRPO's
    group-normalised advantages sum to 0 over a group and follow the reward's sign, and a
    truncated completion used the whole token budget."""
    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path}",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "data.num_eval=4",
            "trainer.lr=1e-3",
            "trainer.max_steps=3",
            "trainer.progress_bar=false",
            "harness.sample_every=2",
            "harness.sample_prompts=1",
        ],
    )
    train_loop(setup(cfg))
    records = MetricsWriter.read(tmp_path / "samples.jsonl")
    assert [(r["step"], r["group"], r["sample"]) for r in records] == [
        (step, 0, i) for step in (2, 3) for i in range(4)
    ]
    rescored = score_batch([r["completion"] for r in records], [r["gold"] for r in records])
    for r, again in zip(records, rescored):
        assert (r["reward"], r["status"], r["extracted"]) == (
            again.score,
            again.status,
            again.extracted,
        )
        assert 1 <= r["length"] <= 4 and (not r["truncated"] or r["length"] == 4)
        assert r["prompt"] == r["id"].removeprefix("arith:")  # template plain: the question
    for step in (2, 3):
        group = [r for r in records if r["step"] == step]
        mean = sum(r["reward"] for r in group) / 4
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5)
        for r in group:
            assert (r["advantage"] > 0) == (r["reward"] > mean)
            assert (r["advantage"] == 0) == (r["reward"] == mean)
