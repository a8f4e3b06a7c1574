"""Time grpo_lab's rollout backends: transformers ``generate`` ("hf") vs grpo_lab's own engines.

    python benchmarks/rollout_bench.py                       # CPU, both workloads, ~2 minutes
    python benchmarks/rollout_bench.py --workloads tiny --repeats 9 --threads 2
    python benchmarks/rollout_bench.py --backends hf,static,compiled   # compiling takes ~1 min

Workloads (float32, temperature 1, no top-k / top-p):

- ``tiny``: the embedded tiny arithmetic model (``grpo_lab.tiny.ensure_tiny_model()``, built
  locally on first use), 16 arithmetic prompts (``plain`` template, as the tiny recipes) x G=8,
  at most 6 new tokens with EOS allowed, so completion lengths vary with the samples.
- ``qwen2_random``: a randomly initialised Qwen2 (hidden 256, 4 layers, 4 query / 2 KV heads,
  MLP 1024, vocabulary 4000), 16 prompts of 32 random token ids x G=8, exactly 64 new tokens
  (``ignore_eos``).

The rollout engines get the same model object, prompts and arguments: ``hf``,
``shared_prefix``, ``static`` (fixed-shape decode steps over a static KV cache) and
``compiled`` (the same step through ``torch.compile``; CUDA graphs on a GPU) from
``grpo_lab.rollout.ROLLOUT_BACKENDS``, and ``shared_prefix_icdf``, the shared-prefix backend
with ``sampler="inverse_cdf"``; ``--backends`` picks some (``hf`` is always run: it is the
reference). Each call is one whole rollout (one chunk: ``batch_size=None``). After ``--warmup``
untimed calls per engine (the first ``compiled`` one compiles), the timed calls go
round-robin (hf, shared_prefix, ..., hf, ...) so that load from other jobs on a
shared machine hits all alike; call r of each engine runs under ``torch.manual_seed(r)``. A
tiny call takes tens of milliseconds, so it is repeated more often (``--repeats`` overrides
both defaults). The table gives the median (min, max) wall-clock seconds per call, completion
tokens per second and ``speedup`` = hf median / engine median; the LAST stdout line is one JSON
object with everything, including the load averages at the start and end (compare them with
the core count before trusting small differences).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

from grpo_lab.rollout import ROLLOUT_BACKENDS, SharedPrefixBackend, generate  # noqa: E402

# Registry names, plus the shared-prefix backend with its cheaper sampler.
BACKENDS = {
    "hf": "hf",
    "shared_prefix": "shared_prefix",
    "shared_prefix_icdf": SharedPrefixBackend(sampler="inverse_cdf"),
    "static": "static",
    "compiled": "compiled",
}
DEFAULT_BACKENDS = ("hf", "shared_prefix", "shared_prefix_icdf", "static")
WORKLOADS = ("tiny", "qwen2_random")


@dataclass
class Workload:
    name: str
    model: torch.nn.Module
    tokenizer: object
    prompts: list  # strings (tiny) or token-id lists (qwen2_random)
    kwargs: dict  # everything else passed to generate
    repeats: int  # timed calls per engine unless --repeats is given


def tiny_workload(num_prompts: int = 16, group_size: int = 8) -> Workload:
    from grpo_lab.data import make_arith, render_prompt
    from grpo_lab.models import load_causal_lm, load_tokenizer
    from grpo_lab.tiny import MAX_NEW_TOKENS, ensure_tiny_model

    folder = str(ensure_tiny_model())
    problems = make_arith(num_prompts, seed=0, split="train")
    return Workload(
        name="tiny",
        model=load_causal_lm(folder),
        tokenizer=load_tokenizer(folder),
        prompts=[render_prompt(p.question, template="plain") for p in problems],
        kwargs=dict(group_size=group_size, max_new_tokens=MAX_NEW_TOKENS, temperature=1.0),
        repeats=25,
    )


def qwen2_random_workload(
    num_prompts: int = 16, prompt_len: int = 32, group_size: int = 8, new_tokens: int = 64
) -> Workload:
    from transformers import Qwen2Config

    from grpo_lab.models import random_init_causal_lm

    config = Qwen2Config(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=4000,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = random_init_causal_lm(config)
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, config.vocab_size, (num_prompts, prompt_len), generator=generator)
    return Workload(
        name="qwen2_random",
        model=model,
        tokenizer=None,
        prompts=prompts.tolist(),
        kwargs=dict(
            group_size=group_size,
            max_new_tokens=new_tokens,
            temperature=1.0,
            eos_token_id=2,
            ignore_eos=True,
        ),
        repeats=7,
    )


def run_once(workload: Workload, name: str, seed: int) -> tuple[float, int, int]:
    """(seconds, completion tokens, completion length C) of one whole rollout."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    batch = generate(
        workload.model,
        workload.tokenizer,
        workload.prompts,
        backend=BACKENDS[name],
        **workload.kwargs,
    )
    seconds = time.perf_counter() - start
    return seconds, int(batch.completion_mask.sum()), batch.completion_len


def bench(workload: Workload, warmup: int, repeats: int | None, backends: list[str]) -> dict:
    repeats = workload.repeats if repeats is None else repeats
    for backend in backends:
        for r in range(warmup):
            run_once(workload, backend, seed=10_000 + r)
    times = {b: [] for b in backends}
    tokens = {b: [] for b in backends}
    for r in range(repeats):
        for backend in backends:
            seconds, n_tokens, _ = run_once(workload, backend, seed=r)
            times[backend].append(seconds)
            tokens[backend].append(n_tokens)
    out = {
        "backends": backends,
        "repeats": repeats,
        "prompts": len(workload.prompts),
        "group_size": workload.kwargs["group_size"],
        "max_new_tokens": workload.kwargs["max_new_tokens"],
        "ignore_eos": workload.kwargs.get("ignore_eos", False),
        "params": sum(p.numel() for p in workload.model.parameters()),
    }
    for backend in backends:
        t = times[backend]
        out[backend] = {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "times_s": t,
            "mean_completion_tokens": statistics.fmean(tokens[backend]),
            "tokens_per_s": statistics.fmean(tokens[backend]) / statistics.median(t),
        }
    for backend in backends:
        out[backend]["speedup"] = out["hf"]["median_s"] / out[backend]["median_s"]
    return out


def print_table(results: dict) -> None:
    header = f"{'workload':<14} {'backend':<19} {'median s':>9} {'min s':>8} {'max s':>8}"
    header += f" {'tokens/s':>9} {'tokens':>7} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        for backend in res["backends"]:
            r = res[backend]
            speedup = f"{r['speedup']:.2f}x"
            print(
                f"{name:<14} {backend:<19} {r['median_s']:>9.3f} {r['min_s']:>8.3f} "
                f"{r['max_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
                f"{r['mean_completion_tokens']:>7.0f} {speedup:>8}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"engines to time, from {list(BACKENDS)} (hf is always added)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="default: 25 tiny, 7 qwen2")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a busy VM)"
    )
    args = parser.parse_args(argv)
    names = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: {unknown} not in {list(WORKLOADS)}")
    backends = ["hf"] + [b for b in args.backends.split(",") if b and b != "hf"]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"--backends: {unknown} not in {list(BACKENDS)}")
    if args.repeats is not None and args.repeats < 5:
        parser.error("--repeats: at least 5 (medians of fewer are too noisy)")
    assert {b for b in BACKENDS.values() if isinstance(b, str)} <= set(ROLLOUT_BACKENDS)
    torch.set_num_threads(args.threads)

    load_start = os.getloadavg()
    builders = {"tiny": tiny_workload, "qwen2_random": qwen2_random_workload}
    results = {name: bench(builders[name](), args.warmup, args.repeats, backends) for name in names}
    load_end = os.getloadavg()

    print_table(results)
    print(
        f"load average start {load_start[0]:.2f} end {load_end[0]:.2f} on {os.cpu_count()} "
        f"cores; torch {torch.__version__}, {args.threads} thread(s)"
    )
    record = {
        "benchmark": "rollout_backends",
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/rollout_bench.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "load_avg_start": list(load_start),
        "load_avg_end": list(load_end),
        "workloads": results,
        "speedup": {
            name: {b: res[b]["speedup"] for b in backends if b != "hf"}
            for name, res in results.items()
        },
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
