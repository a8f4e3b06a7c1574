"""DeepSpeed ZeRO-3 around a rollout: gather the parameters once, pause the engine's hooks.

Under ZeRO-3 each rank holds a slice of every parameter. The engine registers a forward hook on
every submodule that all-gathers the module's parameters before its forward and may release
them after it, keeping a trace of the module order that it checks across ranks. During
training every rank makes the same forward calls, so these collectives line up. A rollout does
not: each rank decodes its own prompts and stops when its own rows have finished, so ranks make
different numbers of forward calls. Any collective a forward makes then pairs with a different
collective on another rank (gloo: ``op.preamble.length <= op.nbytes``), or waits forever.

:func:`gather_params_for_generation` removes every collective from the rollout's forwards: it
all-gathers every parameter once (one collective, the same on every rank) and takes the
engine's module hooks off until the rollout ends, so nothing releases the gathered parameters
after a layer and nothing re-gathers them one layer at a time. With the hooks on, a gather alone
is not enough: the hooks release what it gathered as soon as their module trace no longer
matches, at once when the sampled module is not the engine's root (the causal LM inside
:class:`grpo_lab.models.PolicyWithValueHead`, whose root-level start-of-forward hook never runs),
and the decode-step counts then decide the collectives.

The hooks are found on the engine, so a ZeRO-3 model must be given to the rollout with its
engine (the model ``accelerator.prepare`` returned, or any wrapper around it); the bare module
inside an engine is refused (:func:`check_generation_model`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

# id() of the modules whose parameters gather_params_for_generation currently holds gathered.
_GATHERED: set[int] = set()


def is_partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitioned (they carry ``ds_id``)."""
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_status") for p in module.parameters())


def parameter_offload(model: nn.Module):
    """The ZeRO-3 ``DeepSpeedZeRoOffload`` (which owns the module hooks) of the DeepSpeed
    engine that is ``model`` or wraps it (found through ``.module``), or None."""
    try:
        from deepspeed import DeepSpeedEngine
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    except ImportError:
        return None
    while isinstance(model, nn.Module):
        if isinstance(model, DeepSpeedEngine):
            # With an optimizer the stage-3 optimizer holds it; an engine without one (a frozen
            # reference) keeps the offload object itself as its "optimizer".
            opt = model.optimizer
            offload = getattr(opt, "parameter_offload", opt)
            return offload if isinstance(offload, DeepSpeedZeRoOffload) else None
        model = getattr(model, "module", None)
    return None


def check_generation_model(model: nn.Module, lm: nn.Module) -> None:
    """Refuse to sample from a ZeRO-3 module whose engine is not in ``model``'s wrappers.

    Raises:
        ValueError: ``lm`` is partitioned and carries an engine's module hooks (modules with a
            ``ds_id``) but ``model`` does not lead to that engine, so the hooks could not be
            paused and the rollout's collectives would depend on each rank's decode steps.
    """
    if not is_partitioned(lm) or parameter_offload(model) is not None:
        return
    if any(hasattr(m, "ds_id") for m in lm.modules()):
        raise ValueError(
            "model: under DeepSpeed ZeRO-3 pass the engine (the model accelerator.prepare "
            "returned), not the module inside it: its parameter hooks must be paused for the "
            "rollout"
        )


@contextmanager
def gather_params_for_generation(model: nn.Module) -> Iterator[None]:
    """Under DeepSpeed ZeRO-3 gather every parameter once for the whole block; else a no-op.

    ``model`` is a ZeRO-3 engine (or a wrapper around one): every parameter of the engine's
    module is all-gathered (read-only, no modifier rank) and the engine's module hooks are
    removed for the block, then put back (DeepSpeed re-records its module trace on the next
    forward). Forwards inside the block make no collective call. A partitioned module without
    an engine (e.g. to save it) is gathered only; its hooks, if any, stay.

    NOTE: entering is a collective, so every rank must enter, and the full model must fit in
    one device's memory for the block. Re-entrant: inside an enclosing gather of the same
    parameters it does nothing.
    """
    offload = parameter_offload(model)
    module = offload.module if offload is not None else model
    if id(module) in _GATHERED or not is_partitioned(module):
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(module.parameters())
    if offload is None and all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params):
        # Already gathered by an enclosing call on the engine around this module.
        yield
        return
    _GATHERED.add(id(module))
    try:
        with deepspeed.zero.GatheredParameters(params), _hooks_paused(offload):
            yield
    finally:
        _GATHERED.discard(id(module))


@contextmanager
def _hooks_paused(offload) -> Iterator[None]:
    """The engine's per-module fetch/release hooks and its start-of-forward hook removed for
    the block, then registered again in the same order (no-op when ``offload`` is None).

    NOTE: DeepSpeed has no public switch for this; it uses ``DeepSpeedZeRoOffload``'s hook
    handles and ``_register_deepspeed_module`` (as TRL's ``unwrap_model_for_generation`` does),
    checked against the pinned deepspeed 0.19 by ``tests/test_zero3.py``."""
    if offload is None:
        yield
        return
    root = offload.module
    for p in root.parameters():
        p.ds_active_sub_modules.clear()
    start_of_forward = root._forward_pre_hooks[offload.fwd_pre_hook.id]
    for handle in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]:
        handle.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        # Registering on the root invalidates the coordinator's module trace; every rank
        # re-records it on its next (identical) training forward.
        offload._register_deepspeed_module(root)
        offload.fwd_pre_hook = root.register_forward_pre_hook(start_of_forward, prepend=True)
