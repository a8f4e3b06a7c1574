"""The ``backend`` fixture: the rollout tests that state the shared contract run once per engine."""

import pytest

from grpo_lab.rollout.shared_prefix import SharedPrefixBackend
from grpo_lab.rollout.static import StaticCacheBackend


@pytest.fixture(
    params=[
        "hf",
        "shared_prefix",
        pytest.param(SharedPrefixBackend(sampler="inverse_cdf"), id="shared_prefix-inverse_cdf"),
        "static",
        pytest.param(StaticCacheBackend(capacity_multiple=1), id="static-exact"),
    ]
)
def backend(request):
    """Behavioural tests run against every backend: they all promise the same contract."""
    return request.param
