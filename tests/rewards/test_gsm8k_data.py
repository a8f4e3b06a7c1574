"""Every GSM8K reference solution scores 1 against its own answer and 0 against answer + 1.

Data: ``<repo>/../shared/data/gsm8k_train.jsonl`` (fields ``question``, ``answer``; the answer is
the worked solution ending in ``#### N``), or the directory in ``GRPO_LAB_SHARED_DATA``.
"""

import json
import os
import re
import time
from pathlib import Path

import pytest

from grpo_lab.rewards import VerifierPool, score_batch


def _data_file() -> Path:
    override = os.environ.get("GRPO_LAB_SHARED_DATA")
    root = (
        Path(override)
        if override
        else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    )
    return root / "gsm8k_train.jsonl"


DATA = _data_file()
pytestmark = pytest.mark.skipif(
    not DATA.is_file(), reason=f"GSM8K data not found at {DATA} (set GRPO_LAB_SHARED_DATA)"
)


def _rows() -> list[dict]:
    with DATA.open() as f:
        return [json.loads(line) for line in f]


def _plus_one(answer: str) -> str:
    # "1,234" -> "1235": the gold is an integer with optional thousands separators.
    assert re.fullmatch(r"-?[\d,]+", answer), answer
    return str(int(answer.replace(",", "")) + 1)


def test_reference_solutions_score_against_their_answers():
    rows = _rows()
    assert len(rows) > 1000
    solutions = [row["answer"] for row in rows]
    golds = [row["answer"].split("####")[-1].strip() for row in rows]
    wrong_golds = [_plus_one(g) for g in golds]

    unstarted = VerifierPool(num_workers=1)  # must stay unstarted: all of GSM8K is fast path
    start = time.process_time()  # all in this process: its CPU time, whatever else runs
    right = score_batch(solutions, golds, pool=unstarted)
    wrong = score_batch(solutions, wrong_golds, pool=unstarted)
    elapsed = time.process_time() - start

    bad = [(i, r) for i, r in enumerate(right) if r.status != "correct"]
    assert bad == []
    bad = [(i, r) for i, r in enumerate(wrong) if r.status != "wrong"]
    assert bad == []
    assert unstarted.worker_pids() == []
    assert elapsed < 10.0, f"{2 * len(rows)} GSM8K items took {elapsed:.1f} s"
    unstarted.close()
