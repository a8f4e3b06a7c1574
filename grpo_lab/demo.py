"""``grpo-lab demo`` / ``make demo``: GRPO, PPO-head and PPO-critic on the embedded tiny model.

Builds (or reuses) the embedded tiny arithmetic model, trains a copy of it with each of the three
objectives from ``recipes/tiny_arith_*.yaml`` for the same number of optimizer steps, and prints
held-out accuracy before and after, with the mean step time. CPU only, a few minutes in all.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from grpo_lab.config import load_config
from grpo_lab.data import load_problems
from grpo_lab.evaluation import evaluate
from grpo_lab.models import load_causal_lm, load_tokenizer

logger = logging.getLogger("grpo_lab")

OBJECTIVES = {
    "GRPO": "tiny_arith_grpo.yaml",
    "PPO (value head)": "tiny_arith_ppo_head.yaml",
    "PPO (critic)": "tiny_arith_ppo_critic.yaml",
}


def recipes_dir() -> Path:
    """The repository's recipes/ folder (next to the package), else ./recipes."""
    here = Path(__file__).resolve().parents[1] / "recipes"
    return here if here.is_dir() else Path("recipes")


def _accuracy(model_path: str, cfg, problems) -> dict[str, float]:
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    return evaluate(
        model,
        tokenizer,
        problems,
        max_new_tokens=cfg.rollout.max_new_tokens,
        k=8,
        temperature=cfg.rollout.temperature,
        template=cfg.data.template,
    )


def run_demo(
    *, steps: int | None = None, seed: int = 0, output_dir: str = "runs/demo"
) -> list[dict]:
    from grpo_lab.trainer import train

    rows = []
    start_cache: dict[str, dict[str, float]] = {}
    for name, recipe in OBJECTIVES.items():
        overrides = [
            f"seed={seed}",
            f"output_dir={Path(output_dir) / Path(recipe).stem}",
            "trainer.progress_bar=true",
            "overwrite=true",  # the demo's own folder: a rerun replaces the previous demo
        ]
        if steps is not None:
            overrides.append(f"trainer.max_steps={steps}")
        cfg = load_config(recipes_dir() / recipe, overrides)
        if cfg.trainer.cpu_threads is not None:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        d = cfg.data
        problems = load_problems(
            d.name,
            split="test",
            limit=d.num_eval,
            seed=seed,
            max_value=d.max_value,
            num_operands=d.num_operands,
            ops=tuple(d.ops),
        )
        if cfg.model.name_or_path not in start_cache:
            from grpo_lab.tiny import resolve_model_path

            start_cache[cfg.model.name_or_path] = _accuracy(
                resolve_model_path(cfg.model.name_or_path), cfg, problems
            )
        before = start_cache[cfg.model.name_or_path]
        t0 = time.perf_counter()
        history = train(cfg)
        wall = time.perf_counter() - t0
        after = _accuracy(str(Path(cfg.output_dir) / "final"), cfg, problems)
        step_s = sorted(r["time/step_s"] for r in history)[len(history) // 2]
        rows.append(
            {
                "objective": name,
                "steps": len(history),
                "before": before,
                "after": after,
                "median_step_s": step_s,
                "wall_s": wall,
            }
        )
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'objective':<18} {'steps':>5}  {'greedy acc: start -> end':>25}  "
        f"{'sampled acc: start -> end':>26}  {'step s':>7}  {'wall s':>7}"
    )
    lines = ["", "Held-out accuracy on the embedded tiny arithmetic task", head, "-" * len(head)]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"{r['objective']:<18} {r['steps']:>5}  "
            f"{b['eval/greedy_acc']:>11.1%} -> {a['eval/greedy_acc']:>8.1%}    "
            f"{b['eval/pass@1']:>12.1%} -> {a['eval/pass@1']:>8.1%}  "
            f"{r['median_step_s']:>7.3f}  {r['wall_s']:>7.1f}"
        )
    return "\n".join(lines)
