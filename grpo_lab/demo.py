"""``grpo-lab demo`` / ``make demo``: GRPO against PPO on the embedded tiny model, equal budgets.

Builds (or reuses) the embedded tiny arithmetic model and trains a copy of it with each objective
of :mod:`grpo_lab.objectives` (GRPO; PPO with a value head and with a critic, at the recipes'
2 epochs x 2 minibatches and at GRPO's one update per batch) from ``recipes/tiny_arith_*.yaml``.
Every objective gets the same wall-clock budget of training-step time (``trainer.max_time_s``,
45 s by default), so the table compares what each learns for the same compute; with ``steps``
alone, every objective makes the same number of steps (the same samples) instead. The table
shows held-out greedy and sampled accuracy before and after (sampled under the run's seed at
both ends), steps made, median step time and static memory (parameters + gradients + optimizer
state of every model), each also as a ratio to GRPO's.
CPU only, about 5 minutes in all.

Memory is the static footprint, not the process peak: the objectives run one after another in
this one process, whose peak resident memory only grows.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from grpo_lab.config import load_config
from grpo_lab.evaluation import eval_plan, evaluate
from grpo_lab.models import load_causal_lm, load_tokenizer
from grpo_lab.objectives import LABELS, OBJECTIVES, objective, recipe_for

logger = logging.getLogger("grpo_lab")

BUDGET_S = 45.0
BASE_RECIPE = "tiny_arith_grpo.yaml"


def recipes_dir() -> Path:
    """The repository's recipes/ folder (next to the package), else ./recipes."""
    here = Path(__file__).resolve().parents[1] / "recipes"
    return here if here.is_dir() else Path("recipes")


def _accuracy(model_path: str, cfg) -> dict[str, float]:
    """Held-out accuracy of the model at ``model_path`` on the run's evaluation (its
    :func:`~grpo_lab.evaluation.eval_plan`), greedy and over 8 samples at the run's temperature.
    The samples are drawn under the run's seed, so start and end are scored with the same
    random numbers."""
    plan = eval_plan(cfg)
    return evaluate(
        load_causal_lm(model_path),
        load_tokenizer(model_path),
        plan.problems(),
        k=8,
        temperature=cfg.rollout.temperature,
        backend=plan.engine(),
        **plan.settings(),
    )


def run_demo(
    *,
    budget_s: float | None = BUDGET_S,
    steps: int | None = None,
    seed: int = 0,
    output_dir: str = "runs/demo",
    objectives: tuple[str, ...] = tuple(OBJECTIVES),
) -> list[dict]:
    """Train each objective for ``budget_s`` seconds of step time (or ``steps`` steps, or
    whichever comes first when both are given); print and return one row per objective."""
    from grpo_lab.hub import resolve_model_path
    from grpo_lab.trainer import train

    rows = []
    start_cache: dict[str, dict[str, float]] = {}
    for name in objectives:
        _, extra = objective(name)
        overrides = [
            *(f"{k}={v}" for k, v in extra.items()),
            f"seed={seed}",
            f"output_dir={Path(output_dir) / name}",
            "trainer.progress_bar=true",
            f"trainer.max_steps={steps if steps is not None else 1_000_000}",
            "overwrite=true",  # the demo's own folder: a rerun replaces the previous demo
        ]
        if budget_s is not None:
            overrides.append(f"trainer.max_time_s={budget_s}")
        cfg = load_config(recipe_for(name, recipes_dir() / BASE_RECIPE), overrides)
        if cfg.trainer.cpu_threads is not None:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        if cfg.model.name_or_path not in start_cache:
            start_cache[cfg.model.name_or_path] = _accuracy(
                resolve_model_path(cfg.model.name_or_path), cfg
            )
        before = start_cache[cfg.model.name_or_path]
        t0 = time.perf_counter()
        history = train(cfg)
        wall = time.perf_counter() - t0
        after = _accuracy(str(Path(cfg.output_dir) / "final"), cfg)
        rows.append(
            {
                "objective": name,
                "label": LABELS[name],
                "steps": len(history),
                "train_s": history[-1]["time/total_s"],
                "before": before,
                "after": after,
                "median_step_s": statistics.median(r["time/step_s"] for r in history),
                "static_gib": history[0]["mem/static/total_gib"],
                "wall_s": wall,
            }
        )
    base = next((r for r in rows if r["objective"] == "grpo"), None)
    for r in rows:
        r["time_ratio"] = r["median_step_s"] / base["median_step_s"] if base else None
        r["memory_ratio"] = r["static_gib"] / base["static_gib"] if base else None
    print(format_table(rows, budget_s, steps))
    return rows


def format_table(rows: list[dict], budget_s: float | None = None, steps: int | None = None) -> str:
    head = (
        f"{'objective':<34} {'steps':>5}  {'greedy acc: start -> end':>24}  "
        f"{'sampled acc: start -> end':>25}  {'step s':>7} {'x GRPO':>6}  "
        f"{'static MiB':>10} {'x GRPO':>6}"
    )
    if budget_s is not None:
        budget = f", {budget_s:g} s of training each" + (
            f" (at most {steps} steps)" if steps is not None else ""
        )
    else:
        budget = f", {steps} steps each" if steps is not None else ""
    lines = [
        "",
        f"Held-out accuracy on the embedded tiny arithmetic task{budget}",
        head,
        "-" * len(head),
    ]

    def ratio(v: float | None) -> str:
        return f"{v:>5.2f}x" if v is not None else f"{'-':>6}"

    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"{r['label']:<34} {r['steps']:>5}  "
            f"{b['eval/greedy_acc']:>10.1%} -> {a['eval/greedy_acc']:>8.1%}    "
            f"{b['eval/pass@1']:>11.1%} -> {a['eval/pass@1']:>8.1%}  "
            f"{r['median_step_s']:>7.3f} {ratio(r.get('time_ratio'))}  "
            f"{r['static_gib'] * 1024:>10.2f} {ratio(r.get('memory_ratio'))}"
        )
    matched = [r for r in rows if r["objective"].endswith("_matched")]
    if matched and all(r.get("time_ratio") for r in matched):
        lines += [
            "",
            "At matched updates (one epoch, one minibatch per batch, as GRPO): "
            + "; ".join(
                f"{r['label'].split(',')[0]} {r['time_ratio']:.2f}x GRPO's step time, "
                f"{r['memory_ratio']:.2f}x its static memory"
                for r in matched
            )
            + ".",
        ]
    return "\n".join(lines)
