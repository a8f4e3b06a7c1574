"""Rule-based rewards for verifiable math (GSM8K, MATH).

Public API::

    math_reward(completion, gold, *, timeout_s=2.0) -> float
    score_batch(completions, golds, *, timeout_s=2.0, max_chars=2000, pool=None) -> list[ScoreResult]
    ScoreResult(score: float, status: str, extracted: str | None)     # frozen dataclass
    extract_answer(text) -> str | None          # None also when the completion hedges
    extract_final(text) -> Extraction           # answer, rule, candidates, hedged
    is_equiv(pred, gold, *, timeout_s=2.0, max_chars=2000, pool=None) -> bool
    trl_math_reward / trl_reward_func           # TRL GRPOTrainer reward, gold column "answer"
    make_trl_reward(answer_column="answer", *, timeout_s=2.0, name="math_reward")
    VerifierPool, PoolStats, get_default_pool(), set_default_pool(pool)

Module map: ``extract`` (final answer, thinking, hedging), ``normalize`` (plain numbers, compact
LaTeX; no evaluation), ``equivalence`` (decisions, fast path, pre-screen), ``sandbox`` (killable
worker pool), ``score`` (statuses, batching), ``trl`` (TRL adapter). sympy and math-verify are only
imported inside worker processes.
"""

from grpo_lab.rewards.equivalence import is_equiv
from grpo_lab.rewards.extract import Extraction, extract_answer, extract_final
from grpo_lab.rewards.sandbox import PoolStats, VerifierPool, get_default_pool, set_default_pool
from grpo_lab.rewards.score import STATUSES, ScoreResult, math_reward, score_batch
from grpo_lab.rewards.trl import TrlMathReward, make_trl_reward, trl_math_reward

# Generic alias: the same object as `trl_math_reward`.
trl_reward_func = trl_math_reward

__all__ = [
    "STATUSES",
    "Extraction",
    "PoolStats",
    "ScoreResult",
    "TrlMathReward",
    "VerifierPool",
    "extract_answer",
    "extract_final",
    "get_default_pool",
    "is_equiv",
    "make_trl_reward",
    "math_reward",
    "score_batch",
    "set_default_pool",
    "trl_math_reward",
    "trl_reward_func",
]
