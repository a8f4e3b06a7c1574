"""Models: loading them, the value models, and the training forwards that score completions."""

from grpo_lab.models.shared_prompt import *  # noqa: F403
from grpo_lab.models.shared_prompt import _HEAD_CHECKS as _HEAD_CHECKS
from grpo_lab.models.shared_prompt import _is_non_reentrant as _is_non_reentrant
