"""One RL update on a fixed global batch, for comparing 1 process with 2 (DDP / ZeRO-2 / ZeRO-3).

Run directly (one process) or under ``accelerate launch --config_file ...`` (several). Every
process builds the same deterministic global batch of prompts and completions, keeps its own
slice of whole groups, makes the experience (values, advantages) and takes optimizer steps
through the trainer's own code. The main process writes the summed losses and the full
parameters after the update to ``--out``; under several processes it also checks that every
rank holds the same parameters.

    python tests/distributed_update.py MODEL_DIR OUT.pt --objectives grpo
    accelerate launch --config_file recipes/accelerate/zero2_cpu.yaml \\
        tests/distributed_update.py MODEL_DIR OUT.pt --objectives grpo,ppo_critic
"""

from __future__ import annotations

import argparse
import sys

import torch

from grpo_lab.config import load_config
from grpo_lab.phases import make_experience
from grpo_lab.rollout import RolloutBatch, gather_params_for_generation
from grpo_lab.trainer import setup
from grpo_lab.update import update

OBJECTIVES = {
    "grpo": ["algorithm=grpo", "loss.kl_coef=0.05", "advantage.scale=batch"],
    # No KL, so zero-advantage rows are skipped: rank 0 has 4 rows with signal, rank 1 none.
    "grpo_skip": ["algorithm=grpo", "loss.kl_coef=0"],
    "ppo_head": ["algorithm=ppo", "ppo.value=head"],
    "ppo_critic": ["algorithm=ppo", "ppo.value=critic"],
}
PROMPTS, G, P, C = 4, 4, 5, 4  # prompts, group size, prompt length, completion length


def global_batch(vocab: int, eos: int, pad: int) -> tuple[RolloutBatch, torch.Tensor]:
    """A fixed batch of N = PROMPTS * G sequences with ragged prompts and completions."""
    g = torch.Generator().manual_seed(1234)
    N = PROMPTS * G
    prompt_ids = torch.randint(3, vocab, (PROMPTS, P), generator=g).repeat_interleave(G, 0)
    prompt_mask = torch.ones(N, P, dtype=torch.long)
    for i in range(PROMPTS):  # left padding, ragged prompts
        prompt_mask[i * G : (i + 1) * G, : i % 3] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, pad)
    completion_ids = torch.randint(3, vocab, (N, C), generator=g)
    lengths = torch.randint(1, C + 1, (N,), generator=g)
    completion_mask = (torch.arange(C)[None, :] < lengths[:, None]).long()
    ended = lengths < C
    completion_ids[torch.arange(N)[ended], lengths[ended] - 1] = eos
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampling_logp=torch.zeros(N, C),
        truncated=~ended,
        group_size=G,
    )
    rewards = torch.randint(0, 2, (N,), generator=g).float()
    rewards[:G] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # group 0 has signal, groups 1-3 none
    rewards[G:] = 1.0
    return batch, rewards


def run_objective(objective: str, args) -> tuple[dict, object]:
    cfg = load_config(
        None,
        [
            f"model.name_or_path={args.model_dir}",
            f"output_dir={args.out}.{objective}",
            f"rollout.prompts_per_step={PROMPTS}",
            f"rollout.group_size={G}",
            f"rollout.max_new_tokens={C}",
            "data.num_eval=0",
            "trainer.lr=1e-3",
            "trainer.micro_batch_size=2",
            "trainer.max_grad_norm=1.0",
            "trainer.progress_bar=false",
            *OBJECTIVES[objective],
        ],
    )
    run = setup(cfg)
    tok = run.tokenizer
    batch, rewards = global_batch(len(tok), tok.eos_token_id, tok.pad_token_id)
    per_rank = batch.num_sequences // run.world
    local = slice(run.rank * per_rank, (run.rank + 1) * per_rank)
    batch, rewards = batch.select(local).to(run.acc.device), rewards[local]

    losses, skipped = [], []
    for i in range(args.steps):
        run.harness.start_step()
        exp = make_experience(run, batch, rewards)
        updated = update(run, exp, run.skips, step=i + 1)
        run.skips, metrics = updated.skips, updated.metrics
        losses.append(
            [metrics.get("loss/policy", 0.0), metrics.get("loss/value", 0.0), metrics["loss/total"]]
        )
        skipped.append(metrics["update/zero_advantage_rows_skipped"])

    models = {"policy": run.policy} | ({"critic": run.critic} if run.critic is not None else {})
    params = {}
    for name, model in models.items():
        unwrapped = run.acc.unwrap_model(model)
        with gather_params_for_generation(unwrapped):
            for pname, p in unwrapped.named_parameters():
                params[f"{name}.{pname}"] = p.detach().float().cpu().clone()

    if run.world > 1:
        # Every rank must hold exactly the parameters rank 0 holds.
        flat = torch.cat([p.flatten() for p in params.values()])
        gathered = run.acc.gather(flat[None].to(run.acc.device)).cpu()
        for r in range(1, run.world):
            torch.testing.assert_close(gathered[r], gathered[0], rtol=0, atol=0)
    result = {"losses": torch.tensor(losses), "params": params, "world": run.world}
    return result | {"skipped": skipped}, run.acc


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument(
        "--objectives", default="grpo", help=f"comma-separated, from {list(OBJECTIVES)}"
    )
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps on the same batch")
    args = ap.parse_args(argv)

    results = {}
    for objective in args.objectives.split(","):
        results[objective], acc = run_objective(objective, args)
    if acc.is_main_process:
        torch.save(results, args.out)
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
