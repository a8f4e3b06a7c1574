"""Rollout engines (the module's contents, moved into a package)."""

from grpo_lab.rollout.shared_prefix import *  # noqa: F403
