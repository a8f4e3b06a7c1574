"""Rollouts under DeepSpeed ZeRO-3 whose ranks decode different numbers of steps.

Launched by ``tests/test_zero3.py``::

    accelerate launch --config_file recipes/accelerate/zero3_cpu.yaml \\
        tests/zero3_rollout.py MODEL_DIR OUT_DIR

For each policy kind the trainer builds (the plain causal LM of GRPO and PPO-critic, the
shared-trunk ``PolicyWithValueHead`` of PPO-head) and each rollout engine that runs under ZeRO-3,
the ZeRO-3 engine samples with ``max_new_tokens`` 2 on rank 0 and 7 on rank 1 (``ignore_eos``:
exactly that many decode steps), while every collective call is counted and compared with those
of gathering the parameters alone. The same sampling from
a plain, unpartitioned copy of the model must give the same tokens. Then the bare module inside
the engine is offered to the rollout (it must be refused), one training step runs (the engine's
hooks are back), and each rank writes ``rank<r>.json`` for the test to compare across ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from grpo_lab import distributed
from grpo_lab.config import load_config
from grpo_lab.models import load_causal_lm
from grpo_lab.rollout import generate
from grpo_lab.trainer import setup, step
from grpo_lab.zero3 import gather_params_for_generation

KINDS = {"lm": ["algorithm=grpo"], "value_head": ["algorithm=ppo", "ppo.value=head"]}
ENGINES = ("hf", "shared_prefix", "static")
PROMPTS = ["1+2=", "34+56=", "7+8="]  # ragged: left padding inside a chunk
STEPS_BY_RANK = (2, 7)

# Collective methods of DeepSpeed's communication backend and of torch.distributed.
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced",
    "all_gather_object", "broadcast", "broadcast_object_list", "all_to_all", "all_to_all_single",
    "gather", "scatter", "barrier", "send", "recv", "isend", "irecv",
)  # fmt: skip


@contextmanager
def counting_collectives() -> Iterator[list[str]]:
    """The names of the collectives called inside the block, in order: DeepSpeed's calls go
    through its backend object (which bound torch's functions when it was created), everything
    else through ``torch.distributed``'s module functions; both are wrapped."""
    import deepspeed.comm.comm as ds_comm

    calls: list[str] = []
    saved = []  # (owner, name, whether the owner itself held it, its value there)
    for owner in (ds_comm.cdb, torch.distributed):
        for name in COLLECTIVES:
            fn = getattr(owner, name, None)
            if not callable(fn):
                continue

            def counted(*args, _fn=fn, _name=name, **kwargs):
                calls.append(_name)
                return _fn(*args, **kwargs)

            saved.append((owner, name, name in vars(owner), vars(owner).get(name)))
            setattr(owner, name, counted)
    try:
        yield calls
    finally:
        for owner, name, held, value in saved:
            if held:
                setattr(owner, name, value)
            else:
                delattr(owner, name)


def sample(model, tokenizer, engine: str, max_new_tokens: int):
    return generate(
        model,
        tokenizer,
        PROMPTS,
        group_size=2,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        ignore_eos=True,
        generator=torch.Generator().manual_seed(7),
        backend=engine,
    )


def run_kind(kind: str, args) -> dict:
    cfg = load_config(
        None,
        [
            f"model.name_or_path={args.model_dir}",
            f"output_dir={args.out_dir / kind}",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.max_new_tokens=4",
            "data.num_eval=0",
            "trainer.micro_batch_size=2",
            "trainer.progress_bar=false",
            *KINDS[kind],
        ],
    )
    run = setup(cfg)
    tok, rank = run.tokenizer, run.rank
    plain = load_causal_lm(args.model_dir)  # unpartitioned: what the engine must sample from
    steps = STEPS_BY_RANK[rank]
    with counting_collectives() as calls:
        with gather_params_for_generation(run.policy):
            pass
    record: dict = {"gather_only": calls, "engines": {}}
    for engine in ENGINES:
        with counting_collectives() as calls:
            got = sample(run.policy, tok, engine, steps)
        want = sample(plain, tok, engine, steps)
        record["engines"][engine] = {
            "collectives": calls,
            "completion_len": got.completion_len,
            "same_tokens": torch.equal(got.completion_ids, want.completion_ids),
            "max_logp_diff": float((got.sampling_logp - want.sampling_logp).abs().max()),
        }

    bare = run.acc.unwrap_model(run.policy)
    try:
        sample(bare, tok, "shared_prefix", steps)
        record["bare_module"] = "accepted"
    except ValueError as err:
        record["bare_module"] = str(err)

    # A real rollout and update with the engine's hooks restored.
    record["step_loss"] = step(run)["loss/total"]
    with gather_params_for_generation(run.policy):
        record["digests"] = distributed.replica_digests(run.acc, bare)
    return record


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    results = {kind: run_kind(kind, args) for kind in KINDS}
    rank = torch.distributed.get_rank()
    (args.out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
