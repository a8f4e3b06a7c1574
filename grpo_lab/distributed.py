"""Process-group plumbing for the trainer: the accelerator, DeepSpeed engine settings,
collectives over ranks, the backward / step that differ between DDP and DeepSpeed, and the
check that every rank ends with the same parameters.

Everything here takes the ``Accelerator`` explicitly; on one process every collective is the
identity, so single-process runs pay nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object
from torch import Tensor, nn

from grpo_lab.config import Config
from grpo_lab.trackers import require_trackers


def build_accelerator(cfg: Config) -> Accelerator:
    """The run's accelerator (trackers from ``harness.report_to``, project dir = output dir).

    A tracker that is not installed stops here (accelerate would drop it without a word).
    """
    require_trackers(cfg.harness.report_to)
    # NOTE: on CPU, DeepSpeed + several processes needs an explicit gloo process group, or every
    # rank believes it is rank 0 of 1.
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = (
        [InitProcessGroupKwargs(backend="gloo")]
        if multi_process and not torch.cuda.is_available()
        else []
    )
    return Accelerator(
        log_with=list(cfg.harness.report_to) or None,
        project_dir=cfg.output_dir,
        kwargs_handlers=kwargs,
    )


def is_deepspeed(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc: Accelerator) -> int:
    """The DeepSpeed ZeRO stage of the launch config (0 without DeepSpeed)."""
    if not is_deepspeed(acc):
        return 0
    ds = acc.state.deepspeed_plugin.deepspeed_config
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(
    acc: Accelerator, *, micro_batch_size: int, max_grad_norm: float | None
) -> None:
    """Fill the DeepSpeed config: one engine step per minibatch, the recipe's clipping.

    Gradient accumulation is driven by the trainer (the engine is told where each minibatch
    ends, see :func:`backward`), so DeepSpeed's own accumulation count stays 1 and it never
    rescales the loss.
    """
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro_batch_size * acc.num_processes
    ds["gradient_clipping"] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    acc.gradient_accumulation_steps = 1


def prepare_reference(acc: Accelerator, model: nn.Module, *, bf16: bool) -> nn.Module:
    """Frozen reference: ZeRO-3 partitions it like the policy; otherwise a plain copy."""
    if zero_stage(acc) == 3:
        import deepspeed

        ds = acc.state.deepspeed_plugin.deepspeed_config
        config = {
            "train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
            "train_batch_size": ds["train_batch_size"],
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": bf16},
        }
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # NOTE: DeepSpeedEngine.eval() returns None, unlike nn.Module.eval()
        return engine
    return model.to(acc.device).eval()


def global_sum(acc: Accelerator, x: Tensor) -> Tensor:
    """Sum a tensor over all processes (identity on one process)."""
    if acc.num_processes == 1:
        return x
    return acc.reduce(x.to(acc.device).clone(), reduction="sum")


def global_max(acc: Accelerator, value: int) -> int:
    """The largest ``value`` of any process."""
    if acc.num_processes == 1:
        return value
    return int(acc.gather(torch.tensor([value], device=acc.device)).max())


def global_amax(acc: Accelerator, x: Tensor) -> Tensor:
    """Element-wise maximum of a tensor over all processes (identity on one process)."""
    if acc.num_processes == 1:
        return x
    return acc.gather(x.to(acc.device)[None]).amax(0)


def global_masked_stats(acc: Accelerator, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Masked mean and unbiased variance (0-dim each) of x [N, T] over every process's tokens."""
    m = mask.to(x.dtype)
    s = global_sum(acc, torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
    mean = s[0] / s[2].clamp(min=1)
    var = (s[1] - s[2] * mean**2) / (s[2] - 1).clamp(min=1)
    return mean, var.clamp(min=0)


def backward(acc: Accelerator, model: nn.Module, loss: Tensor, *, last: bool) -> None:
    """Backward one micro-batch's share of the minibatch loss; ``last`` closes the minibatch.

    DDP and DeepSpeed average gradients over ranks; the loss is already a share of the global
    sum, so multiplying by the world size makes the averaged gradient that sum's. Gradient
    synchronisation happens once, on the last micro-batch.
    """
    scaled = loss * acc.num_processes
    if is_deepspeed(acc):
        # The engine accumulates until told this micro-batch closes the minibatch.
        model.set_gradient_accumulation_boundary(last)
        model.backward(scaled)
        return
    ctx = nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model)
    with ctx:
        acc.backward(scaled)


def engine_step(model: nn.Module) -> float:
    """DeepSpeed: the engine clips (``gradient_clipping``), steps and zeroes the gradients;
    returns its global gradient norm (NaN when it reports none)."""
    model.step()
    norm = model.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan


# Written next to a saved model: each rank's parameter_digest of every model it saved.
REPLICAS_FILE = "replicas.json"


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 (hex) of ``module``'s parameters: names, dtypes, shapes and bytes, in
    ``named_parameters`` order. Under ZeRO-3 call it where the parameters are gathered."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)};".encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def replica_digests(acc: Accelerator, module: nn.Module) -> list[str]:
    """Every rank's :func:`parameter_digest` of its own copy of ``module``, in rank order (a
    collective: every rank calls it)."""
    digest = parameter_digest(module)
    return gather_object([digest]) if acc.num_processes > 1 else [digest]


def check_replicas(replicas: dict[str, list[str]], where: str) -> None:
    """Raise if the ranks' digests of any model (``{model: [digest per rank]}``) differ."""
    differ = {name: d for name, d in replicas.items() if len(set(d)) > 1}
    if differ:
        raise RuntimeError(
            f"ranks hold different parameters after training ({', '.join(differ)}; digests per "
            f"rank in {where}): a rank missed or repeated an update; the saved model is rank 0's"
        )
