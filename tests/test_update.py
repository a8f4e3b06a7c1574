"""The update's bookkeeping: declared reductions, skip counters, and the LR schedule it steps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from grpo_lab.build import lr_lambda
from grpo_lab.update import MAX, MEAN, SUM, Skips, Tally, count_skip


def test_tally_reduces_each_metric_as_declared():
    tally = Tally()
    for v in (1.0, 3.0, 2.0):
        tally.add("loss/policy", torch.tensor(v), SUM)
        tally.add("policy/clipfrac", torch.tensor(v), MEAN)
        tally.add("rollout/logprob_diff_max", torch.tensor(v), MAX)
    assert float(tally["loss/policy"]) == 6.0
    assert float(tally["policy/clipfrac"]) == 6.0  # divided by micro-batches x processes later
    assert float(tally["rollout/logprob_diff_max"]) == 3.0
    assert tally.how == {
        "loss/policy": SUM,
        "policy/clipfrac": MEAN,
        "rollout/logprob_diff_max": MAX,
    }
    assert list(tally.values) == ["loss/policy", "policy/clipfrac", "rollout/logprob_diff_max"]


def _run(limit: int, deepspeed: bool = False):
    cfg = SimpleNamespace(trainer=SimpleNamespace(max_skipped_steps=limit))
    return SimpleNamespace(cfg=cfg, deepspeed=deepspeed)


def test_skip_counters_count_non_finite_norms_and_reset_on_a_finite_one():
    run = _run(limit=3)
    skips = count_skip(run, Skips(), math.nan, step=1)
    skips = count_skip(run, skips, math.inf, step=1)
    assert skips == Skips(total=2, in_a_row=2)
    skips = count_skip(run, skips, 0.5, step=2)
    assert skips == Skips(total=2, in_a_row=0)
    with pytest.raises(RuntimeError, match="3 consecutive updates"):
        for _ in range(3):
            skips = count_skip(run, skips, math.nan, step=3)
    # DeepSpeed's loss scaler owns overflow: nothing is counted here.
    assert count_skip(_run(limit=1, deepspeed=True), Skips(), math.nan, step=1) == Skips()


def test_lr_schedule_warms_up_from_one_step_then_decays():
    """Warmup starts at lr / warmup (step 0 trains), then constant / linear / cosine to 0 at
    max_steps; past max_steps cosine stays at 0."""
    const, linear, cosine = (lr_lambda(k, 4, 12) for k in ("constant", "linear", "cosine"))
    assert [const(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [linear(s) for s in (4, 8, 12, 13)] == [1.0, 0.5, 0.0, 0.0]
    assert cosine(8) == pytest.approx(0.5) and cosine(12) == cosine(20) == pytest.approx(0.0)
    assert lr_lambda("constant", 0, 10)(0) == 1.0
