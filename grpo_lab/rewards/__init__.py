"""Rule-based rewards for verifiable math (GSM8K, MATH).

Public API::

    math_reward(completion, gold, *, timeout_s=2.0) -> float
    score_batch(completions, golds, *, timeout_s=2.0, max_chars=2000, pool=None) -> list[ScoreResult]
    ScoreResult(score: float, status: str, extracted: str | None)     # frozen dataclass
    extract_answer(text) -> str | None          # None also when the completion hedges
    extract_final(text) -> Extraction           # answer, rule, candidates, hedged, parts
    is_equiv(pred, gold, *, timeout_s=2.0, max_chars=2000, pool=None) -> bool
    trl_math_reward / trl_reward_func           # TRL GRPOTrainer reward, gold column "answer"
    ControlledReward(group_size, zero_std_fraction=0.0, seed=0)   # cost benchmarks: seeded group
        rewards that ignore the text; score_batch's signature, .for_trl() for TRL
    make_trl_reward(answer_column="answer", *, timeout_s=2.0, name="math_reward")
    VerifierPool(num_workers=None, *, memory_limit_bytes=2 GiB, start_timeout_s=60.0)
        .verify_many(pairs, *, timeout_s=2.0) -> list[str]; .stats() -> PoolStats; .close()
    get_default_pool() -> VerifierPool; set_default_pool(pool | None)
    STATUSES = ("correct", "wrong", "no_answer", "hedged", "timeout", "parse_error")

Example::

    from grpo_lab.rewards import math_reward, score_batch
    math_reward("... so she has 72 left.\\n#### 72", "72")                   # 1.0
    score_batch(["The answer is $\\boxed{2\\sqrt{2}}$."], ["\\sqrt{8}"])[0]
    # ScoreResult(score=1.0, status='correct', extracted='2\\sqrt{2}')

Timeouts and worker crashes are counted per pool: ``get_default_pool().stats()``.

Module map: ``extract`` (the rules that choose the final answer), ``markers`` (thinking,
``####`` and ``\\boxed{}``; gold reduction), ``clause`` (reading the answer after a marker),
``hedging`` (agreement, "or" answers, multi-part answers), ``normalize``
(plain numbers, compact LaTeX, word answers, inequalities; no evaluation), ``equivalence``
(decisions, fast path, pre-screen), ``sandbox`` (killable worker pool), ``score`` (statuses,
batching), ``trl`` (TRL adapter), ``controlled`` (benchmark reward). sympy and math-verify are
only imported inside worker processes.
"""

from grpo_lab.rewards.controlled import ControlledReward, TrlControlledReward
from grpo_lab.rewards.equivalence import is_equiv
from grpo_lab.rewards.extract import Extraction, extract_answer, extract_final
from grpo_lab.rewards.sandbox import PoolStats, VerifierPool, get_default_pool, set_default_pool
from grpo_lab.rewards.score import STATUSES, ScoreResult, math_reward, score_batch
from grpo_lab.rewards.trl import TrlMathReward, make_trl_reward, trl_math_reward

# Generic alias: the same object as `trl_math_reward`.
trl_reward_func = trl_math_reward

__all__ = [
    "STATUSES",
    "ControlledReward",
    "Extraction",
    "PoolStats",
    "ScoreResult",
    "TrlControlledReward",
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
