"""Fixtures for the reward tests: one worker pool per test module (start-up costs ~0.5 s)."""

import pytest

from grpo_lab.rewards import VerifierPool


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=1) as module_pool:
        yield module_pool
