"""benchmarks/revision_bench.py: the interval it reports (the side-by-side runs need two cores and
a git checkout, and are exercised by running the script)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "revision_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("revision_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interval_of_ratios_two_and_a_half(bench):
    # log ratios ln 2 and -ln 2: mean 0 -> geomean 1; sample sd = sqrt(2) ln 2, se = ln 2,
    # t(0.975, 1 dof) = 12.7062 -> CI exp(-+12.7062 ln 2) = 2 ** -+12.7062.
    got = bench._interval([math.log(2.0), math.log(0.5)])
    assert got["geomean"] == pytest.approx(1.0)
    assert got["ci_low"] == pytest.approx(2**-12.7062, rel=1e-4)
    assert got["ci_high"] == pytest.approx(2**12.7062, rel=1e-4)


def test_one_round_has_no_interval(bench):
    got = bench._interval([math.log(1.1)])
    assert got["geomean"] == pytest.approx(1.1)
    assert math.isnan(got["ci_low"]) and math.isnan(got["ci_high"])
