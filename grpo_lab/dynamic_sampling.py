"""DAPO dynamic sampling with refill (Yu et al. 2025, arXiv:2503.14476, section 3.2, eq. 11).

A group whose G rewards are all equal has group-relative advantage 0: it adds nothing to the
gradient but still dilutes the loss normaliser, and such groups become common as the policy
gets good (all right) or stays bad (all wrong) at a prompt. Dynamic sampling drops them and
samples further rounds of prompts until the batch holds the configured number of groups with
signal. Departures from the paper, on purpose:

- The number of extra rounds is capped (``rollout.max_extra_rounds``). When the cap is reached
  the batch is topped up with dropped groups (earliest first), so every step trains on the same
  number of sequences and the trainer's batch split stays valid; the top-up rows have advantage
  0 and GRPO skips them in the update.
- Several processes: each process samples its own share of prompts, and groups never move
  between processes, so each must fill its own share. Whether to run another round is decided
  globally (another round runs while any process is short), so every process makes the same
  rollout calls and collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from grpo_lab.rollout import RolloutBatch, concat_batches

# One rollout round: (batch [n rows], rewards [n], per-row reward results).
Round = tuple[RolloutBatch, Tensor, Sequence]


def sample_with_signal(
    draw: Callable[[], Round],
    signal: Callable[[RolloutBatch, Tensor], Tensor],
    *,
    groups_wanted: int,
    max_extra_rounds: int,
    global_sum: Callable[[Tensor], Tensor],
    pad_id: int,
) -> tuple[RolloutBatch, Tensor, list, dict[str, float], Round]:
    """Draw rounds until this and every other process hold ``groups_wanted`` groups with signal,
    or ``max_extra_rounds`` extra rounds have run; return this process's batch of exactly
    ``groups_wanted`` groups, its rewards and results, the step's metrics, and everything the
    rounds sampled as one round (for reward statistics and token counts that describe what the
    policy produced, not the filtered selection).

    ``draw()`` runs one rollout round of this process's share of prompts and scores it;
    ``signal(batch, rewards)`` -> [groups] bool marks groups worth training on
    (``algos.groups_with_signal``); ``global_sum`` sums a tensor over every process (identity on
    one). Groups with signal come first, in the order they were drawn, then top-up groups.

    Metrics (summed over processes): ``rollout/groups_sampled``, ``rollout/groups_filtered``
    (sampled without signal), ``rollout/groups_with_signal`` (in the returned batch),
    ``rollout/extra_rounds``.
    """
    if groups_wanted < 1 or max_extra_rounds < 0:
        raise ValueError(
            f"need groups_wanted >= 1 and max_extra_rounds >= 0, got {groups_wanted}, "
            f"{max_extra_rounds}"
        )
    rounds: list[Round] = []
    keeps: list[Tensor] = []  # each [groups] bool
    for _ in range(max_extra_rounds + 1):
        batch, rewards, results = draw()
        rounds.append((batch, rewards, results))
        keeps.append(signal(batch, rewards).cpu())
        short = int(sum(k.sum() for k in keeps) < groups_wanted)
        # A global decision: every process runs the same number of rounds.
        if int(global_sum(torch.tensor([short], device=rewards.device))[0]) == 0:
            break
    keep = torch.cat(keeps)  # [groups sampled]
    # Groups with signal first (stable order), then the dropped ones to top up.
    # The first round alone has groups_wanted groups, so there are always enough.
    chosen = torch.argsort((~keep).to(torch.int8), stable=True)[:groups_wanted]
    group_size = rounds[0][0].group_size
    rows = (chosen[:, None] * group_size + torch.arange(group_size)).reshape(-1)  # [wanted * G]
    batch = concat_batches([r[0] for r in rounds], pad_id)
    rewards = torch.cat([r[1] for r in rounds])
    results = [x for r in rounds for x in r[2]]
    totals = global_sum(
        torch.tensor(
            [len(keep), int((~keep).sum()), int(keep[chosen].sum())],
            dtype=torch.float32,
            device=rewards.device,
        )
    ).tolist()
    metrics = {
        "rollout/groups_sampled": totals[0],
        "rollout/groups_filtered": totals[1],
        "rollout/groups_with_signal": totals[2],
        "rollout/extra_rounds": float(len(rounds) - 1),
    }
    rows_dev = rows.to(rewards.device)
    chosen_results = [results[i] for i in rows.tolist()]
    return (
        batch.select(rows_dev),
        rewards[rows_dev],
        chosen_results,
        metrics,
        (batch, rewards, results),
    )
