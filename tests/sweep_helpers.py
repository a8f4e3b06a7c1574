"""Sweep folders and files with known numbers, shared by the sweep tests."""

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def write_run(
    run_dir: Path,
    *,
    step_s: float,
    onset: int,
    level: float = 1.0,
    rss: float,
    gen_tps: float,
    eval_acc: float | None = None,
    n: int = 20,
    finished: bool = True,
) -> None:
    """A metrics.jsonl with known numbers.

    Step 1 takes 10 s, the others ``step_s``; reward/accuracy is 0 before ``onset`` and ``level``
    from it. Phases: rollout 0.5 x, update 0.25 x the step time, reward 0.1 s on even steps only.
    RSS peak grows to ``rss`` at the last step. With ``eval_acc``, eval rows at step 0 (0.1) and n.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [] if eval_acc is None else [{"step": 0, "eval/greedy_acc": 0.1, "eval/n": 16}]
    total = 0.0
    for s in range(1, n + 1):
        dt = 10.0 if s == 1 else step_s
        total += dt
        acc = level if s >= onset else 0.0
        row = {
            "step": s,
            "reward/mean": acc,
            "reward/accuracy": acc,
            "time/step_s": dt,
            "time/total_s": total,
            "time/rollout_s": 0.5 * dt,
            "time/update_s": 0.25 * dt,
            "mem/rss_gib": 0.5,
            "mem/rss_peak_gib": rss * s / n,
            "perf/gen_tokens_per_s": gen_tps,
            "perf/mfu": None,
        }
        if s % 2 == 0:
            row["time/reward_s"] = 0.1
        if s == 1:
            row["mem/static/policy_params_gib"] = 0.01
        rows.append(row)
    if eval_acc is not None:
        rows.append({"step": n, "eval/greedy_acc": eval_acc, "eval/n": 16})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (run_dir / "metrics.jsonl").write_text(text)
    if finished:
        (run_dir / "DONE").write_text("{}\n")


# grpo: seed0 step 2 s, accuracy from step 11; seed1 step 2.5 s, from step 13; held-out evals.
# ppo_head: seed0 step 3 s, from 11; seed1 step 3.5 s, 0.8 from 15; no evals (train accuracy).
RUNS = {
    ("grpo", 0): dict(step_s=2.0, onset=11, rss=1.0, gen_tps=100.0, eval_acc=0.6),
    ("grpo", 1): dict(step_s=2.5, onset=13, rss=1.2, gen_tps=120.0, eval_acc=0.7),
    ("ppo_head", 0): dict(step_s=3.0, onset=11, rss=1.5, gen_tps=50.0),
    ("ppo_head", 1): dict(step_s=3.5, onset=15, level=0.8, rss=1.9, gen_tps=70.0),
}


def write_sweep(tmp_path: Path, body: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def base_body(tmp_path: Path, **changes) -> dict:
    body = {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "base": str(RECIPES / "tiny_arith_grpo.yaml"),
        "seeds": [0, 1],
        "overrides": {"trainer.max_steps": 30},
        "variants": {"grpo": {}, "ppo_head": {"recipe": str(RECIPES / "tiny_arith_ppo_head.yaml")}},
        "baseline": "grpo",
        "target_accuracy": 0.5,
    }
    body.update(changes)
    return body
