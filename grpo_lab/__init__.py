"""grpo_lab: GRPO and PPO for language models on verifiable math rewards."""

__version__ = "0.1.0"
