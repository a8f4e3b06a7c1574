"""The ``grpo-lab`` command line.

    grpo-lab train RECIPE.yaml [key=value ...]     train (GRPO / PPO-head / PPO-critic)
    grpo-lab eval MODEL_OR_RUN [--dataset arith]   held-out greedy / pass@1 / maj@k accuracy
    grpo-lab show RUN [--plot]                     a run's status, latest samples, curves
    grpo-lab demo                                  every objective, same time budget, tiny model
    grpo-lab sweep SWEEP.yaml                      GRPO-vs-PPO ablation: runs, report.md, plots
    grpo-lab merge RUN_OR_ADAPTER OUT              fold a LoRA adapter into its base model
    grpo-lab config [RECIPE] [key=value ...]       print a resolved config; --explain lists every key

Overrides are dotted keys into the recipe, e.g. ``trainer.lr=1e-6 rollout.group_size=4
output_dir=runs/x``. Multi-GPU and DeepSpeed runs go through accelerate:
``accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m grpo_lab.train RECIPE``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_train(args: argparse.Namespace) -> int:
    from grpo_lab.config import load_config
    from grpo_lab.errors import DiskFullError, disk_full_error, is_disk_full
    from grpo_lab.trainer import train

    overrides = [*args.overrides, *(["overwrite=true"] if args.overwrite else [])]
    cfg = load_config(args.recipe, overrides)
    try:
        train(cfg)
    except Exception as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        # e.g. metrics.jsonl: a plain write reports ENOSPC without a file name
        raise disk_full_error(
            cfg.output_dir, "the run's files", "free space, then resume=auto continues the run"
        ) from e
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from grpo_lab.config import Config, format_help, load_config, to_dict

    if args.explain:
        print(format_help(Config))
        return 0
    cfg = load_config(args.recipe, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def _resolve_model(model_or_run: str):
    """A run folder (with config.yaml and final/) or a model name/path -> (model path, run config)."""
    from grpo_lab.config import load_config
    from grpo_lab.errors import ModelSourceError

    p = Path(model_or_run)
    if (p / "config.yaml").is_file():
        final = p / "final"
        if not final.is_dir():
            raise ModelSourceError(
                f"{p} is a run folder without a final/ model (has the run finished?)"
            )
        return str(final), load_config(p / "config.yaml")
    return model_or_run, None


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from grpo_lab.evaluation import eval_plan, evaluate
    from grpo_lab.models import load_causal_lm, load_tokenizer
    from grpo_lab.rollout import build_backend

    model_path, run_cfg = _resolve_model(args.model)
    plan = eval_plan(
        run_cfg,
        dataset=args.dataset,
        split=args.split,
        path=args.path,
        limit=args.limit,
        seed=args.seed,
        template=args.template,
        max_new_tokens=args.max_new_tokens,
    )
    problems = plan.problems()
    if not problems:
        print(
            f"grpo-lab: no {plan.dataset} problems to evaluate (limit {plan.limit}); "
            "pass --limit N",
            file=sys.stderr,
        )
        return 2
    m = run_cfg.model if run_cfg is not None else None
    remote = bool(m and m.trust_remote_code)
    tokenizer = load_tokenizer(model_path, trust_remote_code=remote)
    model = load_causal_lm(
        model_path,
        dtype=args.dtype or (m.dtype if m else "float32"),
        attn_implementation=m.attn_implementation if m else None,
        trust_remote_code=remote,
    )
    max_new = plan.max_new_tokens
    problems = _fit_eval_prompts(
        problems, tokenizer, model, run_cfg.data if run_cfg else None, plan.template, max_new
    )
    if args.device:
        model.to(args.device)
    result = evaluate(
        model,
        tokenizer,
        problems,
        k=args.k,
        temperature=args.temperature,
        backend=build_backend(plan.backend, sampler=plan.sampler),
        **plan.settings(),
    )
    for key, value in result.items():
        print(f"{key:>20s}  {value:.4f}")
    print(json.dumps({"model": model_path, "dataset": plan.dataset, "path": plan.path, **result}))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from grpo_lab.show import RunFolderError, show

    try:
        show(args.run, plot=args.plot, plot_dir=args.plot_dir, chars=args.chars)
    except RunFolderError as e:
        print(f"grpo-lab: {e}", file=sys.stderr)
        return 2
    return 0


def _fit_eval_prompts(problems, tokenizer, model, data, template: str, max_new: int):
    """Refuse prompts longer than the model's context minus max_new (or, with the run's
    data.max_prompt_tokens, drop them) before any is generated from."""
    from grpo_lab.config import DataConfig
    from grpo_lab.data import fit_prompts, model_context

    settings = (data or DataConfig()).model_copy(update={"template": template})
    context = model_context(model.config, tokenizer)
    return fit_prompts(
        problems,
        tokenizer=tokenizer,
        data=settings,
        context=context,
        max_new_tokens=max_new,
        what="evaluation",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from grpo_lab.demo import BUDGET_S, run_demo

    budget_s = args.budget_s
    if budget_s is None and args.steps is None:
        budget_s = BUDGET_S
    run_demo(budget_s=budget_s, steps=args.steps, seed=args.seed, output_dir=args.output_dir)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from grpo_lab.sweep import run_sweep

    result = run_sweep(
        args.sweep, overrides=args.overrides, dry_run=args.dry_run, report_only=args.report_only
    )
    return result.exit_code


def _cmd_merge(args: argparse.Namespace) -> int:
    """Fold a LoRA adapter into its base model and write a plain model folder."""
    import shutil

    from peft import PeftModel

    from grpo_lab.models import load_causal_lm, load_tokenizer

    adapter, _ = _resolve_model(args.adapter)
    adapter_cfg = Path(adapter) / "adapter_config.json"
    if not adapter_cfg.is_file():
        from grpo_lab.errors import ModelSourceError

        raise ModelSourceError(f"{adapter}: no adapter_config.json (is this a LoRA run?)")
    import json

    base = args.base or json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_causal_lm(base, dtype=args.dtype), adapter)
    merged = model.merge_and_unload()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(
        adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    ).save_pretrained(tmp)
    if (Path(adapter) / "value_head.safetensors").is_file():
        shutil.copy(Path(adapter) / "value_head.safetensors", tmp / "value_head.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"merged {adapter} into {base} -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``grpo-lab`` parser: global flags, then one subparser per command (``_add_*``)."""
    parser = argparse.ArgumentParser(
        prog="grpo-lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of every error (also GRPO_LAB_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_show, _add_demo, _add_sweep, _add_merge, _add_config):
        add(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a policy from a YAML recipe",
        description="Train from a YAML recipe. Overrides are dotted key=value pairs, "
        "e.g. trainer.lr=1e-6 output_dir=runs/x resume=auto. "
        "`grpo-lab config --explain` lists every key with its meaning.",
    )
    p.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in an output_dir that holds another run, deleting that run first "
        "(same as overwrite=true)",
    )
    p.set_defaults(func=_cmd_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out accuracy of a model or a finished run",
        description="Greedy pass@1, and with --k > 1 sampled pass@1, maj@k and pass@k, "
        "on a held-out split. MODEL_OR_RUN is a hub name, a local model folder, "
        "`builtin:tiny-arith`, or a run folder: its final/ model, scored on the problems the "
        "run's own evaluation scores (dataset, data.eval_path, data.num_eval, seed), with its "
        "prompt template, system prompt, max_new_tokens, rollout engine and dtype. "
        "Flags override the run's settings.",
    )
    p.add_argument("model", metavar="MODEL_OR_RUN")
    p.add_argument(
        "--dataset",
        choices=["arith", "gsm8k", "math"],
        default=None,
        help="dataset name (default: the run's, else arith)",
    )
    p.add_argument(
        "--path", default=None, help="local JSONL for gsm8k/math (default: the run's file)"
    )
    p.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default: test; a run's test split is its data.eval_path)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate only the first N problems (default: the run's data.num_eval, else all)",
    )
    p.add_argument(
        "--k",
        type=int,
        default=1,
        help="samples per problem for pass@1 / maj@k (default 1: greedy only)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for k > 1")
    p.add_argument("--template", default=None, help="prompt template (default: the run's)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the run's rollout.max_new_tokens"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: the run's model.dtype, else float32",
    )
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: cpu)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the arith problems and of the k > 1 samples, so a rerun scores the same "
        "draws (default: the run's, else 0)",
    )
    p.set_defaults(func=_cmd_eval)


def _add_show(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="a run's status, latest completion samples and (--plot) curves",
        description="Prints where a run is (step, reward and accuracy at the start and now, "
        "entropy, KL, step time, memory, held-out accuracy, time left) and its latest "
        "completion samples from samples.jsonl, each with its status, reward, advantage, "
        "length and answer. Works on a finished run and on one still running. --plot writes "
        "PNG curves of reward, accuracy, entropy, KL, clip fraction, step time and memory "
        "against steps into RUN/plots/.",
    )
    p.add_argument("run", metavar="RUN", help="a training run's output_dir")
    p.add_argument("--plot", action="store_true", help="write PNG curves (needs matplotlib)")
    p.add_argument("--plot-dir", default=None, help="where --plot writes (default: RUN/plots)")
    p.add_argument(
        "--chars",
        type=int,
        default=240,
        help="longest prompt / completion shown; longer ones keep their start and end",
    )
    p.set_defaults(func=_cmd_show)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="GRPO vs PPO (head, critic; standard and matched updates) on the tiny model (CPU)",
        description="Builds the embedded tiny model if missing, trains it with each objective "
        "(GRPO; PPO with a value head or a critic, at the recipes' updates and at GRPO's) for "
        "the same wall-clock budget on CPU (or the same number of steps, --steps), and prints "
        "start-vs-end held-out accuracy, step time and static memory with their ratios to "
        "GRPO's. About 5 minutes.",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds of training-step time per objective (default 45; none when only --steps "
        "is given)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per objective: alone, every objective makes this many steps (the same "
        "samples, whatever each step costs); with --budget-s, a cap on the time budget "
        "(default: no cap)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/demo")
    p.set_defaults(func=_cmd_demo)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run a GRPO-vs-PPO ablation sweep and write its report",
        description="Runs every variant x grid point x seed of a sweep file one after "
        "another (a finished run is not redone), then writes report.md, summary.csv "
        "and plots into the sweep's output_dir. See recipes/sweeps/.",
    )
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value: sweep keys (seeds=[0], output_dir=...) or dotted run overrides",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument(
        "--report-only", action="store_true", help="only aggregate the runs already on disk"
    )
    p.set_defaults(func=_cmd_sweep)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model",
        description="Writes a plain model folder (base weights + LoRA folded in) from a "
        "LoRA run folder or adapter folder.",
    )
    p.add_argument("adapter", help="run folder (uses final/) or adapter folder")
    p.add_argument("out", help="output folder for the merged model")
    p.add_argument(
        "--base", default=None, help="base model (default: the adapter's base_model_name_or_path)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_cmd_merge)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print a resolved config, or --explain every key")
    p.add_argument("recipe", nargs="?", default=None)
    p.add_argument("overrides", nargs="*")
    p.add_argument(
        "--explain",
        action="store_true",
        help="list every config key with its type, default and meaning",
    )
    p.set_defaults(func=_cmd_config)


def main(argv: list[str] | None = None) -> int:
    from grpo_lab.errors import exit_code_for

    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("grpo-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # User errors (config, data, model, run folder, sweep, checkpoint, full disk): one line.
        code = exit_code_for(e, debug=args.debug)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
