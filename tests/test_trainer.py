"""The RL loop: split invariance of the update, short runs of each objective, kill-and-resume."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grpo_lab import distributed, phases
from grpo_lab import update as update_module
from grpo_lab.config import load_config
from grpo_lab.harness import MetricsWriter
from grpo_lab.trainer import setup, step, train_loop, write_checkpoint

OBJECTIVES = {
    "grpo": ["algorithm=grpo"],
    "ppo_head": ["algorithm=ppo", "ppo.value=head"],
    "ppo_critic": ["algorithm=ppo", "ppo.value=critic"],
}


def small_config(model_dir: str, out: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.name_or_path={model_dir}",
            f"output_dir={out}",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "data.num_eval=8",
            "trainer.lr=1e-3",
            "trainer.progress_bar=false",
            *extra,
        ],
    )


def _grads(module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_update_does_not_depend_on_micro_batch_split(objective, tiny_model_dir, tmp_path):
    """Same loss and gradients for 1x8, 4x2 and 8x1 micro-batches of one minibatch of 8."""
    cfg = small_config(
        tiny_model_dir, tmp_path, *OBJECTIVES[objective], "trainer.epochs=2", "loss.kl_coef=0.1"
    )
    run = setup(cfg)
    run.harness.start_step()
    torch.manual_seed(1)
    problems = run.sampler.next_batch()
    batch = phases.rollout(run, [p.question for p in problems])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    exp = phases.make_experience(run, batch, rewards)
    # Move the behaviour policy away from the current one so clipping and dual paths are exercised.
    exp.old_logp = exp.old_logp + 0.3 * torch.randn_like(exp.old_logp) * batch.completion_mask
    idx = torch.arange(batch.num_sequences)
    models = [run.policy] + ([run.critic] if run.critic is not None else [])

    results = {}
    for micro in (8, 2, 1):
        run.cfg.trainer.micro_batch_size = micro
        for m in models:
            m.zero_grad(set_to_none=True)
        acc = update_module.accumulate_gradients(run, exp, idx)
        totals, n_micro = acc.tally, acc.micro_batches
        assert n_micro == 8 // micro
        results[micro] = (
            totals["loss/total"],
            totals["loss/policy"],
            [g for m in models for g in _grads(m)],
        )

    ref_total, ref_policy, ref_grads = results[8]
    assert torch.isfinite(ref_total)
    assert any(g.abs().sum() > 0 for g in ref_grads)
    for micro in (2, 1):
        total, policy, grads = results[micro]
        torch.testing.assert_close(total, ref_total)
        torch.testing.assert_close(policy, ref_policy)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref)


REQUIRED_KEYS = {
    "step", "reward/mean", "reward/std", "reward/accuracy", "rollout/completion_len_mean",
    "rollout/truncated_frac", "loss/policy", "policy/clipfrac", "policy/approx_kl",
    "policy/entropy", "optim/grad_norm", "optim/lr", "time/step_s", "time/rollout_s",
    "time/reward_s", "time/update_s",
}  # fmt: skip


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_short_run_of_each_objective(objective, tiny_model_dir, tmp_path):
    extra = ["trainer.max_steps=2", "trainer.num_minibatches=2", "trainer.micro_batch_size=2"]
    if objective == "grpo":
        extra.append("loss.kl_coef=0.05")
    cfg = small_config(tiny_model_dir, tmp_path, *OBJECTIVES[objective], *extra)
    run = setup(cfg)
    history = train_loop(run)
    assert [r["step"] for r in history] == [1, 2]
    rows = MetricsWriter.read(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "reward/mean" in r]
    eval_rows = [r for r in rows if "eval/greedy_acc" in r]
    assert [r["step"] for r in eval_rows] == [0, 2]
    assert len(train_rows) == 2
    for r in train_rows:
        assert REQUIRED_KEYS <= r.keys(), REQUIRED_KEYS - r.keys()
        assert r["rollout/old_logprob_pass"] == 1.0  # two minibatches: the batch is reused
    if objective == "grpo":
        assert "policy/kl_ref" in train_rows[0] and "time/ref_s" in train_rows[0]
        assert "loss/value" not in train_rows[0]
    else:
        assert {"loss/value", "value/explained_variance"} <= train_rows[0].keys()
        # PPO-head: the old-log-prob pass of the shared trunk also yields the values.
        assert ("time/values_s" in train_rows[0]) == (objective == "ppo_critic")
    assert (tmp_path / "final" / "config.json").is_file()
    assert (tmp_path / "config.yaml").is_file()
    if objective == "ppo_critic":
        assert (tmp_path / "final" / "critic").is_dir()


def test_single_update_skips_old_logprob_forward(tiny_model_dir, tmp_path):
    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=1")
    history = train_loop(setup(cfg))
    assert history[0]["rollout/old_logprob_pass"] == 0.0
    assert "time/old_logprob_s" not in history[0]
    assert "time/ref_s" not in history[0]  # kl_coef 0: no reference model at all


def test_reward_num_workers_sizes_the_pool_that_training_and_evaluation_use(
    tiny_model_dir, tmp_path
):
    from grpo_lab.rewards import get_default_pool, set_default_pool

    try:
        setup(small_config(tiny_model_dir, tmp_path / "two", "reward.num_workers=2"))
        pool = get_default_pool()
        assert pool.num_workers == 2
        # null leaves the process-wide pool alone (its own default size).
        setup(small_config(tiny_model_dir, tmp_path / "default"))
        assert get_default_pool() is pool
    finally:
        set_default_pool(None)


# ------------------------------------------------------------------ kill and resume

VOLATILE = ("time/", "perf/", "mem/")


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _launch(recipe_args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "grpo_lab.train", *recipe_args],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    """A run killed with SIGKILL after step 3 and resumed with resume=auto (from its step-2
    checkpoint) writes the same metrics rows and completion samples and ends with the same
    parameters as a run that was never interrupted."""
    common = [
        "recipes/tiny_arith_ppo_head.yaml", f"model.name_or_path={tiny_model_dir}",
        "trainer.max_steps=5", "checkpoint.every=2", "checkpoint.keep=2", "data.num_eval=8",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "trainer.micro_batch_size=8",
        "trainer.progress_bar=false", "trainer.warmup_steps=0", "harness.sample_every=1",
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    os.chdir(root)

    clean = tmp_path / "clean"
    assert _launch([*common, f"output_dir={clean}"], tmp_path / "clean.log").wait(timeout=300) == 0

    killed = tmp_path / "killed"
    proc = _launch([*common, f"output_dir={killed}"], tmp_path / "killed.log")
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = (
            [json.loads(line).get("step") for line in metrics.open()] if metrics.exists() else []
        )
        if 3 in steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step_0000002" / "COMPLETE").is_file()
    assert not (killed / "final").exists()

    resumed = _launch([*common, f"output_dir={killed}", "resume=auto"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resumed.log").read_text()

    clean_rows = _stable(MetricsWriter.read(clean / "metrics.jsonl"))
    resumed_rows = _stable(MetricsWriter.read(killed / "metrics.jsonl"))
    assert resumed_rows == clean_rows
    # The completion samples of the steps redone after the checkpoint are not written twice.
    clean_samples = MetricsWriter.read(clean / "samples.jsonl")
    assert [r["step"] for r in clean_samples] == [s for s in range(1, 6) for _ in range(2 * 4)]
    assert MetricsWriter.read(killed / "samples.jsonl") == clean_samples

    from safetensors.torch import load_file

    a = load_file(clean / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # Only the newest `keep` checkpoints remain.
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "step_0000002",
        "step_0000004",
    ]


def test_resume_with_a_different_algorithm_is_refused(tiny_model_dir, tmp_path):
    from grpo_lab.checkpoint import CheckpointError

    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=1", "checkpoint.every=1")
    train_loop(setup(cfg))
    other = small_config(
        tiny_model_dir, tmp_path, "algorithm=ppo", "resume=auto", "trainer.max_steps=2"
    )
    with pytest.raises(CheckpointError, match="algorithm"):
        setup(other)


def test_partial_checkpoint_is_ignored(tiny_model_dir, tmp_path, caplog):
    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=1", "checkpoint.every=1")
    train_loop(setup(cfg))
    partial = tmp_path / "checkpoints" / "step_0000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    resumed = setup(small_config(tiny_model_dir, tmp_path, "resume=auto", "trainer.max_steps=2"))
    assert resumed.step == 1
    assert "partial checkpoint" in caplog.text


# ------------------------------------------------------------------ LoRA, robustness


def test_lora_uses_the_policy_without_adapters_as_reference(tiny_model_dir, tmp_path):
    """LoRA: no second model; KL against the adapter-free policy; the value head still trains;
    final/ holds an adapter, and `grpo-lab merge` writes a model with the same outputs."""
    from peft import PeftModel

    from grpo_lab.cli import main
    from grpo_lab.models import load_causal_lm

    cfg = small_config(
        tiny_model_dir, tmp_path, "algorithm=ppo", "ppo.value=head", "loss.kl_coef=0.1",
        "model.lora.r=4", "model.lora.alpha=8", "trainer.max_steps=2",
        "model.lora.target_modules=[q_proj,v_proj,up_proj]",
    )  # fmt: skip
    run = setup(cfg)
    assert run.reference is None
    head_before = run.policy.v_head.linear.weight.detach().clone()
    base_before = {
        n: p.detach().clone()
        for n, p in run.policy.named_parameters()
        if "lora_" not in n and "v_head" not in n
    }
    history = train_loop(run)
    # LoRA B starts at zero, so at step 1 the policy equals its reference: KL exactly 0.
    assert history[0]["policy/kl_ref"] == 0.0
    assert history[1]["policy/kl_ref"] > 0.0
    assert not torch.equal(run.policy.v_head.linear.weight, head_before)
    for n, p in run.policy.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen base weight {n} changed"
    assert (tmp_path / "final" / "adapter_config.json").is_file()

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(tmp_path), str(merged_dir), "--base", tiny_model_dir]) == 0
    merged = load_causal_lm(str(merged_dir))
    adapter = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), tmp_path / "final")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(merged(ids).logits, adapter(ids).logits)


def test_out_of_memory_names_the_phase_and_the_knobs(tiny_model_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(phases, "generate", oom)
    run = setup(small_config(tiny_model_dir, tmp_path, "trainer.max_steps=1"))
    with pytest.raises(RuntimeError, match="'rollout' phase") as info:
        step(run)
    for knob in (
        "trainer.micro_batch_size",
        "rollout.batch_size",
        "gradient_checkpointing",
        "zero3",
        "model.lora.r",
    ):
        assert knob in str(info.value)


def test_non_finite_gradients_skip_updates_then_stop(tiny_model_dir, tmp_path, monkeypatch):
    cfg = small_config(
        tiny_model_dir, tmp_path, "trainer.max_steps=5", "trainer.max_skipped_steps=2"
    )
    run = setup(cfg)
    before = [p.detach().clone() for p in run.policy.parameters()]
    real = update_module.accumulate_gradients

    def poisoned(run, exp, idx):
        out = real(run, exp, idx)
        next(run.policy.parameters()).grad.fill_(float("nan"))
        return out

    monkeypatch.setattr(update_module, "accumulate_gradients", poisoned)
    record = step(run)
    assert record["optim/skipped_steps"] == 1
    for p, b in zip(run.policy.parameters(), before):
        assert torch.equal(p, b)  # the update was skipped, not applied with NaNs
    with pytest.raises(RuntimeError, match="2 consecutive updates had non-finite gradients"):
        step(run)


def test_global_whitening_stats_match_the_masked_statistics(tiny_model_dir, tmp_path):
    from grpo_lab.algos import masked_mean, masked_var

    run = setup(small_config(tiny_model_dir, tmp_path))
    x = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).long()
    mean, var = distributed.global_masked_stats(run.acc, x, mask)
    torch.testing.assert_close(mean, masked_mean(x, mask))
    torch.testing.assert_close(var, masked_var(x, mask))


@pytest.mark.parametrize(
    "engine",
    [["rollout.backend=hf"], ["rollout.backend=static", "rollout.sampler=inverse_cdf"]],
    ids=["hf", "static-inverse_cdf"],
)
def test_other_rollout_engines_drive_the_loop(tiny_model_dir, tmp_path, engine):
    # The default engine is shared_prefix with multinomial sampling (every other test).
    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=2", *engine)
    run = setup(cfg)
    if "rollout.sampler=inverse_cdf" in engine:
        assert run.engine.sampler == "inverse_cdf"
    history = train_loop(run)
    assert [r["step"] for r in history] == [1, 2]
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in history)


def test_failed_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """A full disk during a save: the save fails cleanly, the run goes on, step 1's checkpoint
    stays complete and no temporary folder is left behind."""
    import errno

    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=2", "checkpoint.every=1")
    run = setup(cfg)
    step(run)
    write_checkpoint(run)
    real_save = run.acc.save_state

    def full_disk(output_dir, **kwargs):
        real_save(output_dir, **kwargs)  # partly written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run.acc, "save_state", full_disk)
    step(run)
    write_checkpoint(run)
    assert "No space left on device" in caplog.text and "previous checkpoint is kept" in caplog.text
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000001"]
    assert (tmp_path / "checkpoints" / "step_0000001" / "COMPLETE").is_file()


def test_corrupt_checkpoint_is_a_clear_error(tiny_model_dir, tmp_path):
    from grpo_lab.checkpoint import CheckpointError

    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=1", "checkpoint.every=1")
    train_loop(setup(cfg))
    ckpt = tmp_path / "checkpoints" / "step_0000001"
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"step_0000001 is corrupt"):
        setup(small_config(tiny_model_dir, tmp_path, "resume=auto", "trainer.max_steps=2"))
    (ckpt / "trainer_state.json").write_text("{ truncated")
    with pytest.raises(CheckpointError, match=r"corrupt: cannot read trainer_state.json"):
        setup(small_config(tiny_model_dir, tmp_path, "resume=auto", "trainer.max_steps=2"))


def test_resume_with_a_different_model_shape_is_refused(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from grpo_lab.checkpoint import CheckpointError

    train_loop(
        setup(small_config(tiny_model_dir, tmp_path, "trainer.max_steps=1", "checkpoint.every=1"))
    )
    wider = tmp_path / "wider"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    config.intermediate_size = config.intermediate_size * 2
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    for f in Path(tiny_model_dir).glob("tokenizer*"):
        (wider / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="param_shapes"):
        setup(small_config(tiny_model_dir, tmp_path, "resume=auto", f"model.name_or_path={wider}"))


def test_skipping_zero_advantage_rows_leaves_the_update_unchanged(tiny_model_dir, tmp_path):
    """Rows of a group with identical rewards have advantage 0: running them or not gives the
    same loss and gradients, since the loss is normalised by the whole minibatch's counts."""
    cfg = small_config(tiny_model_dir, tmp_path, "trainer.micro_batch_size=2")
    run = setup(cfg)
    run.harness.start_step()
    torch.manual_seed(3)
    batch = phases.rollout(run, [p.question for p in run.sampler.next_batch()])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # second group: no signal
    exp = phases.make_experience(run, batch, rewards)
    idx = torch.arange(batch.num_sequences)
    results = {}
    for skip in (False, True):
        run.cfg.trainer.skip_zero_advantage = skip
        run.policy.zero_grad(set_to_none=True)
        acc = update_module.accumulate_gradients(run, exp, idx)
        totals, n_micro = acc.tally, acc.micro_batches
        results[skip] = (
            totals["loss/policy"],
            _grads(run.policy),
            n_micro,
            acc.rows_skipped,
        )
    assert results[False][2] == 4 and results[True][2] == 2  # 8 rows vs the 4 with signal
    assert results[True][3] == 4
    torch.testing.assert_close(results[True][0], results[False][0])
    for a, b in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(a, b)


EXPERIENCE_FIELDS = ("old_logp", "ref_logp", "old_values", "advantages", "returns")


def rollout_for_update(objective: str, model_dir: str, out: Path, seed: int):
    """A trainer (2 epochs, micro-batches of 2 that cut groups in half, KL in the loss), one
    rollout from it, fixed rewards and its trained modules."""
    cfg = small_config(
        model_dir,
        out,
        *OBJECTIVES[objective],
        "trainer.micro_batch_size=2",
        "trainer.epochs=2",
        "loss.kl_coef=0.1",
    )
    run = setup(cfg)
    run.harness.start_step()
    torch.manual_seed(seed)
    batch = phases.rollout(run, [p.question for p in run.sampler.next_batch()])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    models = [run.policy] + ([run.critic] if run.critic is not None else [])
    return run, batch, rewards, models


def experience_and_gradients(run, batch, rewards, models):
    """(experience, minibatch loss, every trained parameter's gradient) of one whole batch."""
    exp = phases.make_experience(run, batch, rewards)
    for m in models:
        m.zero_grad(set_to_none=True)
    totals = update_module.accumulate_gradients(run, exp, torch.arange(batch.num_sequences)).tally
    return exp, totals["loss/total"], [g for m in models for g in _grads(m)]


def assert_same_update(got, expected, columns: int | None = None) -> None:
    """Same experience (in its first ``columns`` completion columns; after them advantages are
    0 and nothing else is read), loss and gradients."""
    (exp, loss, grads), (ref_exp, ref_loss, ref_grads) = got, expected
    if columns is not None:
        assert (exp.advantages[:, columns:] == 0).all()
    for name in EXPERIENCE_FIELDS:
        ref = getattr(ref_exp, name)
        if ref is not None:
            value = getattr(exp, name)[:, :columns]
            torch.testing.assert_close(value, ref, msg=name)
    torch.testing.assert_close(loss, ref_loss)
    assert any(g.abs().sum() > 0 for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_shared_prompt_forward_leaves_the_update_unchanged(
    objective, tiny_model_dir, tmp_path, monkeypatch
):
    """trainer.share_prompts runs each prompt once per micro-batch (its G rows share its keys
    and values): the same old/reference log-probs, values, loss and gradients as the full
    forward, with micro-batches that cut groups in half."""
    run, batch, rewards, models = rollout_for_update(objective, tiny_model_dir, tmp_path, 5)
    calls = []
    shared_forward = phases.shared_prompt_completion_forward
    monkeypatch.setattr(
        phases,
        "shared_prompt_completion_forward",
        lambda *a, **k: calls.append(1) or shared_forward(*a, **k),
    )
    run.cfg.trainer.share_prompts = False
    full = experience_and_gradients(run, batch, rewards, models)
    assert not calls  # nothing shared while share_prompts was off
    run.cfg.trainer.share_prompts = True
    assert_same_update(experience_and_gradients(run, batch, rewards, models), full)
    assert calls  # the shared path did run


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_padding_completions_leaves_the_update_unchanged(objective, tiny_model_dir, tmp_path):
    """Several processes pad their completions to the longest of any rank; the extra masked
    columns must change no log-prob, advantage, loss or gradient."""
    run, batch, rewards, models = rollout_for_update(objective, tiny_model_dir, tmp_path, 7)
    c = batch.completion_len
    plain = experience_and_gradients(run, batch, rewards, models)
    padded = batch.pad_completions(c + 3, run.tokenizer.pad_token_id)
    assert padded.completion_len == c + 3
    assert_same_update(experience_and_gradients(run, padded, rewards, models), plain, c)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_chunked_lm_head_leaves_the_update_unchanged(objective, tiny_model_dir, tmp_path):
    """trainer.max_logit_elements reaches every forward: at 1 the LM head runs chunk by chunk
    on the hidden states (the model returns no logits), with the same update as at null."""
    run, batch, rewards, models = rollout_for_update(objective, tiny_model_dir, tmp_path, 9)
    assert batch.completion_len > 2  # so the model's own path would call the head on C-1 > 1
    run.cfg.trainer.max_logit_elements = None
    whole = experience_and_gradients(run, batch, rewards, models)
    head = run.generation_model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    run.cfg.trainer.max_logit_elements = 1
    experience_and_gradients(run, batch, rewards, models)  # the one-time head check
    seen.clear()
    chunked = experience_and_gradients(run, batch, rewards, models)
    hook.remove()
    assert seen and max(seen) == 1  # only single-position chunks (or no positions at all)
    assert_same_update(chunked, whole)


def test_rollout_time_values_leave_the_ppo_head_update_unchanged(tiny_model_dir, tmp_path):
    """PPO with a value head at matched updates (one epoch, one minibatch) takes its old values
    from the rollout engine, which reads the head off the sampling forwards: the same old
    values, advantages, loss and gradients as the extra no-grad values pass, which it skips."""
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        *OBJECTIVES["ppo_head"],
        "trainer.epochs=1",
        "trainer.num_minibatches=1",
        "trainer.micro_batch_size=2",
        "rollout.backend=shared_prefix",
    )
    run = setup(cfg)
    run.harness.start_step()
    torch.manual_seed(11)
    batch = phases.rollout(run, [p.question for p in run.sampler.next_batch()])
    assert batch.values is not None
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    read = experience_and_gradients(run, batch, rewards, [run.policy])
    assert "time/values_s" not in run.harness.end_step()
    run.harness.start_step()
    extra_pass = experience_and_gradients(
        run, dataclasses.replace(batch, values=None), rewards, [run.policy]
    )
    assert_same_update(read, extra_pass)
    # A whole step: no values phase at all.
    record = step(run)
    assert "time/values_s" not in record and "value/explained_variance" in record


@pytest.mark.parametrize(
    "overrides", [["rollout.backend=hf"], ["ppo.values_from_rollout=false"]], ids=["hf", "off"]
)
def test_ppo_head_falls_back_to_a_values_pass(overrides, tiny_model_dir, tmp_path):
    """An engine that cannot read values (hf), or the readout switched off: the old values come
    from a separate no-grad pass, timed as the values phase."""
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        *OBJECTIVES["ppo_head"],
        "trainer.epochs=1",
        "trainer.num_minibatches=1",
        *overrides,
    )
    record = step(setup(cfg))
    assert "time/values_s" in record and "value/explained_variance" in record


def test_max_time_s_stops_after_the_step_that_spends_the_budget(tiny_model_dir, tmp_path):
    # A clock that advances 1 s per reading makes every step cost a few "seconds", the same on
    # any machine. The run must stop after the first step whose cumulative step time reaches
    # the 100 s budget: every earlier prefix is under it, and max_steps (50) is never reached.
    cfg = small_config(tiny_model_dir, tmp_path, "trainer.max_steps=50", "trainer.max_time_s=100")
    run = setup(cfg)
    ticks = iter(range(10**6))
    run.harness.clock = lambda: float(next(ticks))
    history = train_loop(run)
    spent = [r["time/total_s"] for r in history]
    assert spent[-1] >= 100 and all(s < 100 for s in spent[:-1]), spent
    assert 1 < len(history) < 50
    assert spent == sorted(spent) and spent[-1] == sum(r["time/step_s"] for r in history)


# ----------------------------------------------------------------------------- DAPO-era knobs
def test_dapo_recipe_logs_refill_and_mismatch_metrics(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        root / "recipes" / "tiny_arith_dapo.yaml",
        [f"output_dir={tmp_path}", "trainer.max_steps=2", "data.num_eval=8"],
    )
    cfg.trainer.progress_bar = False
    train_loop(setup(cfg))
    rows = [r for r in MetricsWriter.read(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert len(rows) == 2
    B = cfg.rollout.prompts_per_step
    for r in rows:
        sampled, filtered = r["rollout/groups_sampled"], r["rollout/groups_filtered"]
        assert sampled == B * (1 + r["rollout/extra_rounds"])
        assert 0 <= filtered <= sampled and r["rollout/groups_with_signal"] <= B
        assert r["rollout/groups_with_signal"] == min(B, sampled - filtered)
        # fp32 on CPU: the rollout engine and the training forward agree to float precision.
        assert 0 <= r["rollout/logprob_diff_mean"] <= r["rollout/logprob_diff_max"] < 1e-4
        assert 0 <= r["rollout/logprob_kl"] < 1e-8


def _policy_update(run, exp):
    run.policy.zero_grad(set_to_none=True)
    totals = update_module.accumulate_gradients(
        run, exp, torch.arange(exp.batch.num_sequences)
    ).tally
    return totals["loss/policy"], _grads(run.policy)


def _experience_with_sampling_logp(tiny_model_dir, tmp_path, *extra):
    """A trainer, and an experience whose sampling log-probs are exactly the training forward's
    (the engines agree), with rewards that give every group signal."""
    run = setup(small_config(tiny_model_dir, tmp_path, "trainer.micro_batch_size=2", *extra))
    run.harness.start_step()
    torch.manual_seed(11)
    batch = phases.rollout(run, [p.question for p in run.sampler.next_batch()])
    run.cfg.trainer.micro_batch_size = 8  # one forward, as the no-grad pass below
    (train_logp,) = phases.no_grad_forward(run, run.policy, batch, "logp")
    batch.sampling_logp = train_logp * batch.completion_mask
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    return run, phases.make_experience(run, batch, rewards)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_correction_is_the_identity_when_the_engines_agree(
    mode, level, tiny_model_dir, tmp_path
):
    run, exp = _experience_with_sampling_logp(tiny_model_dir, tmp_path)
    loss_off, grads_off = _policy_update(run, exp)
    L = run.cfg.loss
    L.rollout_is, L.rollout_is_level, L.rollout_is_cap = mode, level, 1.0
    loss_on, grads_on = _policy_update(run, exp)
    assert loss_off != 0
    torch.testing.assert_close(loss_on, loss_off)
    for a, b in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(a, b)


def test_injected_mismatch_metrics_and_correction_match_hand_values(tiny_model_dir, tmp_path):
    """The sampler gives every sampled token 0.1 less log-prob than the trainer: rho = e^0.1.

    Mismatch: mean and max |delta log p| = 0.1; k3 KL = e^0.1 - 1 - 0.1 = 0.00517092. On one
    on-policy update the per-token loss is -A, so token-level TIS with cap 2 multiplies the
    loss by e^0.1 = 1.10517, with cap 1.05 by 1.05, and MIS with cap 1.05 drops every token."""
    run, exp = _experience_with_sampling_logp(tiny_model_dir, tmp_path)
    exp.batch.sampling_logp = (exp.batch.sampling_logp - 0.1) * exp.batch.completion_mask
    run.cfg.trainer.micro_batch_size = 2  # the reductions run over several micro-batches
    loss_off, _ = _policy_update(run, exp)
    L = run.cfg.loss
    for mode, cap, scale in (("truncate", 2.0, math.exp(0.1)), ("truncate", 1.05, 1.05),
                             ("mask", 1.05, 0.0)):  # fmt: skip
        L.rollout_is, L.rollout_is_cap = mode, cap
        loss_on, _ = _policy_update(run, exp)
        torch.testing.assert_close(loss_on, loss_off * scale, msg=f"{mode} {cap}")
    L.rollout_is = None
    metrics = update_module.update(run, exp, run.skips, step=1).metrics
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(0.1, rel=1e-5)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.1, rel=1e-5)
    assert metrics["rollout/logprob_kl"] == pytest.approx(math.exp(0.1) - 1.1, rel=1e-4)


def test_overlong_shaping_and_truncation_mask_reach_the_experience(tiny_model_dir, tmp_path):
    """max_new_tokens=3, overlong_buffer=2: a completion of 1 token gets 0, of 2 tokens
    (1 - 2) / 2 = -0.5, of 3 tokens -1. With loss.mask_truncated the truncated rows leave the
    loss mask, and every advantage stays what it is without the mask."""
    run = setup(
        small_config(
            tiny_model_dir, tmp_path, "rollout.max_new_tokens=3", "reward.overlong_buffer=2"
        )
    )
    run.harness.start_step()
    torch.manual_seed(2)
    batch = phases.rollout(run, [p.question for p in run.sampler.next_batch()])
    assert batch.truncated.any() and not batch.truncated.all()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    plain = phases.make_experience(run, batch, rewards)
    penalty = {1: 0.0, 2: -0.5, 3: -1.0}
    expected = rewards + torch.tensor([penalty[int(n)] for n in batch.completion_lengths])
    torch.testing.assert_close(plain.rewards, expected)
    run.cfg.loss.mask_truncated = True
    masked = phases.make_experience(run, batch, rewards)
    lengths = masked.batch.completion_mask.sum(1)
    assert (lengths[batch.truncated] == 0).all()
    assert torch.equal(lengths[~batch.truncated], batch.completion_lengths[~batch.truncated])
    torch.testing.assert_close(masked.advantages, plain.advantages)
    totals = update_module.accumulate_gradients(
        run, masked, torch.arange(batch.num_sequences)
    ).tally
    assert torch.isfinite(totals["loss/total"]) and totals["loss/total"] != 0
    # Every completion truncated: nothing left to train on, a zero loss rather than NaN.
    nothing = torch.zeros_like(batch.completion_mask)
    empty = dataclasses.replace(masked, batch=dataclasses.replace(batch, completion_mask=nothing))
    totals = update_module.accumulate_gradients(run, empty, torch.arange(batch.num_sequences)).tally
    assert all(torch.isfinite(v) for v in totals.values.values()) and totals["loss/total"] == 0


def test_entropy_bonus_is_subtracted_from_the_loss(tiny_model_dir, tmp_path):
    """token-mean loss: total = policy - coef * entropy, entropy the token mean over every row
    (the bonus turns off zero-advantage skipping)."""
    run, exp = _experience_with_sampling_logp(tiny_model_dir, tmp_path, "loss.entropy_coef=0.01")
    run.cfg.trainer.micro_batch_size = 2
    totals = update_module.accumulate_gradients(
        run, exp, torch.arange(exp.batch.num_sequences)
    ).tally
    expected = totals["loss/policy"] - 0.01 * totals["policy/entropy"]
    torch.testing.assert_close(totals["loss/total"], expected)


def test_setup_takes_the_sampler_and_reward_the_run_uses_and_saves(tiny_model_dir, tmp_path):
    """A sampler and a reward passed to setup are the ones each step draws from and scores
    with, and the sampler's position is what a checkpoint saves and a resume restores."""
    from grpo_lab.data import PromptSampler, make_arith
    from grpo_lab.rewards import ScoreResult

    def always_right(completions, golds):
        return [ScoreResult(1.0, "correct", g) for g in golds]

    def sampler():
        return PromptSampler(make_arith(8, seed=3), batch_size=2, seed=11)

    extra = ("trainer.max_steps=2", "checkpoint.every=1", "data.num_eval=0")
    cfg = small_config(tiny_model_dir, tmp_path, *extra)
    mine = sampler()
    run = setup(cfg, reward_fn=always_right, sampler=mine)
    assert run.sampler is mine and run.reward_fn is always_right
    history = train_loop(run)
    assert [r["reward/mean"] for r in history] == [1.0, 1.0]
    assert mine.position == 4  # two steps of two prompts
    again = sampler()
    cfg = small_config(tiny_model_dir, tmp_path, *extra, "resume=auto", "trainer.max_steps=3")
    resumed = setup(cfg, reward_fn=always_right, sampler=again)
    assert resumed.step == 2 and again.position == 4
