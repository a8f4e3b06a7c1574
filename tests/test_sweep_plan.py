"""grpo_lab.sweep.plan: sweep files, their errors, and the runs they expand into."""

import sys
from pathlib import Path

import pytest
from sweep_helpers import RECIPES, base_body, write_sweep

from grpo_lab.sweep import SweepError, check_runs, load_sweep, plan_runs


@pytest.mark.parametrize("path", sorted((RECIPES / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_files_load_and_their_runs_validate(path):
    spec = load_sweep(path)
    runs = plan_runs(spec)
    assert len(runs) == len(spec.variants) * len(spec.seeds) >= 6
    check_runs(spec, runs)
    assert path.read_text().startswith(f"# grpo-lab sweep recipes/sweeps/{path.name}\n")


def test_relative_paths_are_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "recipes" / "sweeps").mkdir(parents=True)
    (tmp_path / "recipes" / "r.yaml").write_text("algorithm: grpo\n")
    path = write_sweep(tmp_path / "recipes" / "sweeps", {"base": "../r.yaml"})
    spec = load_sweep(path)
    assert spec.base == (tmp_path / "recipes" / "r.yaml").resolve()
    assert spec.name == "s" and spec.output_dir == Path("runs/sweeps/s")
    assert list(spec.variants) == ["r"] and spec.baseline == "r" and spec.seeds == (0,)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sedes": [0]}, r"unknown key sedes \(did you mean 'seeds'\?\)"),
        ({"base": None}, r"base: missing"),
        ({"base": "nope.yaml"}, r"base: file 'nope.yaml' not found"),
        ({"baseline": "ppo"}, r"baseline: unknown variant 'ppo'; variants: grpo, ppo_head"),
        ({"variants": {"grpo": {"recpie": "x"}}}, r"unknown key variants\.grpo\.recpie"),
        ({"variants": {"a/b": {}}}, r"variants\.a/b: a variant name is a folder name"),
        ({"seeds": [0, 0]}, r"seeds: values repeat"),
        ({"seeds": 3}, r"seeds: expected a non-empty list of integers"),
        ({"overrides": {"seed": 1}}, r"overrides\.seed: the sweep sets each run's seed"),
        ({"overrides": {"trainer": {"lr": 1}}}, r"overrides\.trainer: a mapping"),
        (
            {"grid": {"rollout.group_size": 4}},
            r"grid\.rollout\.group_size: expected a non-empty list",
        ),
        ({"target_accuracy": 2}, r"target_accuracy: expected a number in \[0, 1\]"),
        ({"launch": "missing.yaml"}, r"launch: file 'missing.yaml' not found"),
    ],
)
def test_sweep_file_errors_name_the_file_and_key(tmp_path, change, message):
    path = write_sweep(tmp_path, base_body(tmp_path, **change))
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SweepError, match="sweep file not found"):
        load_sweep(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0\n")
    with pytest.raises(SweepError, match=f"{bad}: not valid YAML"):
        load_sweep(bad)


def test_command_line_overrides(tmp_path):
    path = write_sweep(tmp_path, base_body(tmp_path, grid={"rollout.group_size": [4, 8]}))
    spec = load_sweep(path, ["seeds=[3]", f"output_dir={tmp_path / 'o2'}", "trainer.lr=1.0e-5"])
    assert spec.seeds == (3,) and spec.output_dir == tmp_path / "o2"
    assert spec.extra_overrides == ("trainer.lr=1.0e-5",)
    for bad, message in [
        ("seed=1", "override seed: the sweep sets each run's seed"),
        ("grid={}", "override grid: edit `grid` in the sweep file"),
        ("rollout.group_size=2", "override rollout.group_size: the grid sweeps it"),
        ("novalue", "override 'novalue': expected key=value"),
    ]:
        with pytest.raises(SweepError, match=message):
            load_sweep(path, [bad])


def test_plan_folders_order_and_overrides(tmp_path):
    body = base_body(tmp_path, grid={"rollout.group_size": [4, 8]},
                     overrides={"trainer.max_steps": 30, "trainer.lr": 1e-6, "data.ops": ["+", "-"],
                                "trainer.micro_batch_size": 16})  # fmt: skip
    body["variants"]["ppo_head"]["overrides"] = {"ppo.vf_coef": 0.5}
    spec = load_sweep(write_sweep(tmp_path, body), ["model.dtype=float32"])
    runs = plan_runs(spec)
    out = tmp_path / "out"
    # Seed-major: every configuration of seed 0 first.
    assert [r.dir for r in runs[:4]] == [
        out / "grpo__rollout.group_size=4" / "seed0",
        out / "grpo__rollout.group_size=8" / "seed0",
        out / "ppo_head__rollout.group_size=4" / "seed0",
        out / "ppo_head__rollout.group_size=8" / "seed0",
    ]
    assert runs[4].dir == out / "grpo__rollout.group_size=4" / "seed1"
    assert runs[2].overrides == (
        "trainer.max_steps=30",
        "trainer.lr=1.0e-06",  # not "1e-06", which YAML 1.1 reads as a string
        "data.ops=[+, -]",
        "trainer.micro_batch_size=16",
        "ppo.vf_coef=0.5",
        "rollout.group_size=4",
        "model.dtype=float32",
        f"output_dir={out / 'ppo_head__rollout.group_size=4' / 'seed0'}",
        "seed=0",
    )
    cmd = runs[2].command(resume=True)
    assert cmd[:3] == [sys.executable, "-m", "grpo_lab.train"]
    assert cmd[-1] == "resume=auto"
    check_runs(spec, runs)


def test_launch_builds_an_accelerate_command(tmp_path):
    body = base_body(tmp_path, launch=str(RECIPES / "accelerate" / "cpu.yaml"))
    run = plan_runs(load_sweep(write_sweep(tmp_path, body)))[0]
    cmd = run.command()
    i = cmd.index("--config_file")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert Path(cmd[i + 1]).resolve() == (RECIPES / "accelerate" / "cpu.yaml").resolve()
    assert cmd[i + 2 : i + 4] == ["-m", "grpo_lab.train"]


def test_objective_variants_take_their_recipe_and_overrides_from_objectives(tmp_path):
    from grpo_lab.objectives import MATCHED_UPDATES

    body = base_body(
        tmp_path,
        seeds=[0],
        variants={
            "grpo": {"objective": "grpo"},
            "head": {"objective": "ppo_head_matched", "overrides": {"trainer.epochs": 3}},
        },
    )
    spec = load_sweep(write_sweep(tmp_path, body))
    head = spec.variants["head"]
    assert head.recipe == (RECIPES / "tiny_arith_ppo_head.yaml").resolve()
    assert spec.variants["grpo"].recipe == (RECIPES / "tiny_arith_grpo.yaml").resolve()
    # The objective's overrides (1 epoch x 1 minibatch), the variant's own on top.
    assert head.overrides == {**MATCHED_UPDATES, "trainer.epochs": 3}
    runs = plan_runs(spec)
    assert "trainer.num_minibatches=1" in runs[1].overrides
    assert "trainer.epochs=3" in runs[1].overrides and "trainer.epochs=1" not in runs[1].overrides
    bad = base_body(tmp_path, variants={"x": {"objective": "ppo_value"}})
    with pytest.raises(SweepError, match=r"variants.x.objective: unknown objective 'ppo_value'"):
        load_sweep(write_sweep(tmp_path, bad, "bad.yaml"))
