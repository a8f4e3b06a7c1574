"""Checkpoint folders: completeness marker, ordering, resume resolution, fingerprint checks.
(Saving and exact resume through the trainer are in test_trainer.py.)"""

import logging

import pytest
import torch

from grpo_lab.checkpoint import (
    MARKER,
    CheckpointError,
    check_fingerprint,
    fingerprint,
    list_checkpoints,
    resolve_resume,
)


def _make(root, name, complete=True):
    path = root / "checkpoints" / name
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text("1")
    return path


def test_only_complete_checkpoints_count_in_step_order(tmp_path, caplog):
    _make(tmp_path, "step_0000010")
    _make(tmp_path, "step_0000002")
    _make(tmp_path, "step_0000012", complete=False)  # crashed before the marker
    _make(tmp_path, "step_0000014.tmp")  # crashed before the rename
    with caplog.at_level(logging.WARNING, logger="grpo_lab"):
        names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_0000002", "step_0000010"]
    assert caplog.text.count("ignoring partial checkpoint") == 2


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    newest = _make(tmp_path, "step_0000005")
    _make(tmp_path, "step_0000003")
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume(str(newest), tmp_path) == newest
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_fingerprint_tells_what_differs(tmp_path):
    small = fingerprint({"policy": torch.nn.Linear(4, 2)}, {"algorithm": "grpo"})
    assert small == fingerprint({"policy": torch.nn.Linear(4, 2)}, {"algorithm": "grpo"})
    wide = fingerprint({"policy": torch.nn.Linear(4, 3)}, {"algorithm": "ppo"})
    check_fingerprint(small, small, tmp_path)
    with pytest.raises(CheckpointError) as info:
        check_fingerprint(small, wide, tmp_path)
    message = str(info.value)
    assert "algorithm: checkpoint has 'grpo', this run has 'ppo'" in message
    assert "param_shapes" in message


def test_replace_folder_swaps_in_the_new_folder(tmp_path):
    from grpo_lab.checkpoint import replace_folder

    final, tmp = tmp_path / "final", tmp_path / "final.tmp"
    tmp.mkdir()
    (tmp / "a").write_text("first")
    replace_folder(tmp, final)
    assert (final / "a").read_text() == "first" and not tmp.exists()
    tmp.mkdir()
    (tmp / "b").write_text("second")
    replace_folder(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_config_changes_split_safe_from_unsafe():
    from grpo_lab.checkpoint import config_changes
    from grpo_lab.config import load_config, to_dict

    old = to_dict(load_config(None))
    new = to_dict(load_config(None, ["trainer.lr=0.5", "seed=3", "rollout.group_size=2"]))
    safe, unsafe = config_changes(old, new)
    assert safe == ["trainer.lr: 1e-06 -> 0.5"]
    assert unsafe == ["seed: 0 -> 3", "rollout.group_size: 8 -> 2"]


def test_apply_schedule_replaces_the_restored_base_lr():
    """A LambdaLR restored from a state dict keeps the old base lr; apply_schedule sets the new
    one at the restored step (warmup 4: step 2 of 4 gives 3/4 of the peak)."""
    from grpo_lab.checkpoint import apply_schedule

    def warmup(step):
        return min(1.0, (step + 1) / 4)

    def make(lr):
        opt = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)

    opt, sched = make(0.1)
    for _ in range(2):
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    opt2, sched2 = make(0.5)
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    assert sched2.get_last_lr() == [pytest.approx(0.1 * 3 / 4)]  # the bug: old lr restored
    apply_schedule(sched2, 0.5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5 * 3 / 4)
    sched2.step()
    assert sched2.get_last_lr() == [pytest.approx(0.5)]
