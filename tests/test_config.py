"""Tests for grpo_lab.config and grpo_lab.recipe: YAML + overrides, types, errors, validation,
round trip, help."""

import copy
import pickle
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from grpo_lab import algos, recipe
from grpo_lab.config import Config, ConfigError, format_help, load_config, save_config, to_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def leaf_keys(obj, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a config instance, walked through its values (not its schema)."""
    keys = []
    for name, value in obj:
        if isinstance(value, BaseModel):
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def get(cfg: Config, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --- defaults and loading --------------------------------------------------------------------


def test_defaults_construct_and_validate():
    cfg = Config()
    cfg.validate()
    assert load_config(None) == cfg
    assert cfg.trainer.lr == 1e-6 and cfg.rollout.group_size == 8
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # default_factory: two configs never share a list.
    assert Config().trainer.adam_betas is not cfg.trainer.adam_betas


@pytest.mark.parametrize(
    "overrides, estimator, whiten",
    [
        ([], "grpo", False),
        (["algorithm=ppo"], "gae", True),
        (["advantage.estimator=rloo"], "rloo", False),
        (["algorithm=ppo", "advantage.whiten=false"], "gae", False),
        (["advantage.whiten=true"], "grpo", True),
    ],
)
def test_resolved_estimator_and_whiten(overrides, estimator, whiten):
    cfg = load_config(None, overrides)
    assert cfg.resolved_estimator() == estimator
    assert cfg.resolved_whiten() is whiten


def test_yaml_merges_onto_defaults(tmp_path):
    path = write(
        tmp_path,
        """
        # header comment, as recipes have
        algorithm: ppo
        trainer:
          lr: 1e-5            # YAML 1.1 reads this as a string
          adam_betas: [0.9, 0.95]
        model:
          lora: {r: 8}
        checkpoint:           # a section with everything commented out reads as null
        """.replace("\n        ", "\n"),
    )
    cfg = load_config(path)
    assert cfg.algorithm == "ppo"
    assert cfg.trainer.lr == 1e-5 and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.adam_betas == [0.9, 0.95]
    assert cfg.model.lora.r == 8
    # Keys the file does not mention keep their defaults, also inside touched sections.
    assert cfg.trainer.max_steps == 100 and cfg.model.lora.alpha == 16
    assert cfg.checkpoint == Config().checkpoint
    assert load_config(str(path)) == cfg
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_win_over_yaml_and_later_overrides_win(tmp_path):
    path = write(tmp_path, "trainer: {lr: 1.0e-5, epochs: 3}\n")
    cfg = load_config(path, ["trainer.lr=2e-6", "trainer.lr=3e-6"])
    assert cfg.trainer.lr == 3e-6 and cfg.trainer.epochs == 3


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("rollout.group_size=4", "rollout.group_size", 4),
        ("trainer.lr=1e-6", "trainer.lr", 1e-6),
        ("trainer.lr=3", "trainer.lr", 3.0),
        ("trainer.max_steps=1e4", "trainer.max_steps", 10000),
        ("trainer.progress_bar=false", "trainer.progress_bar", False),
        ("advantage.whiten=true", "advantage.whiten", True),
        ("rollout.top_k=null", "rollout.top_k", None),
        ("rollout.top_k=5", "rollout.top_k", 5),
        ("ppo.value_clip=null", "ppo.value_clip", None),
        (
            "model.lora.target_modules=[q_proj,v_proj]",
            "model.lora.target_modules",
            ["q_proj", "v_proj"],
        ),
        ("trainer.adam_betas=[0.9, 0.95]", "trainer.adam_betas", [0.9, 0.95]),
        ("harness.report_to=[]", "harness.report_to", []),
        ("data.ops=[+, -, '*']", "data.ops", ["+", "-", "*"]),
        ("output_dir=runs/a", "output_dir", "runs/a"),
        ("resume=auto", "resume", "auto"),
        ("model.dtype=bfloat16", "model.dtype", "bfloat16"),
        # String fields take the raw text where YAML would read something else.
        ("model.attn_implementation=123", "model.attn_implementation", "123"),
        ("data.system_prompt=Answer: briefly", "data.system_prompt", "Answer: briefly"),
        ("data.system_prompt=null", "data.system_prompt", None),
        ("model.name_or_path=builtin:tiny-arith", "model.name_or_path", "builtin:tiny-arith"),
    ],
)
def test_override_types(override, key, expected):
    value = get(load_config(None, [override]), key)
    assert value == expected
    assert type(value) is type(expected)


def test_override_of_a_whole_section_merges():
    cfg = load_config(None, ["trainer={lr: 2e-6, epochs: 2}"])
    assert (cfg.trainer.lr, cfg.trainer.epochs, cfg.trainer.max_steps) == (2e-6, 2, 100)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, overrides, key, suggestion",
    [
        ("sed: 1\n", [], "sed", "seed"),
        ("trainer: {lrr: 1.0e-6}\n", [], "trainer.lrr", "trainer.lr"),
        ("model: {lora: {rr: 4}}\n", [], "model.lora.rr", "model.lora.r"),
        ("trainr: {lr: 1.0e-6}\n", [], "trainr", "trainer"),
        (None, ["trainer.lrr=1e-6"], "trainer.lrr", "trainer.lr"),
        (None, ["algoritm=ppo"], "algoritm", "algorithm"),
        (None, ["trainr.lr=1e-6"], "trainr.lr", "trainer.lr"),
        # A right name in the wrong section points to its section.
        (None, ["lr=1e-6"], "lr", "trainer.lr"),
        (None, ["trainer.group_size=4"], "trainer.group_size", "rollout.group_size"),
    ],
)
def test_unknown_key_names_full_key_source_and_suggestion(
    tmp_path, yaml_text, overrides, key, suggestion
):
    path = write(tmp_path, yaml_text) if yaml_text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    source = str(path) if path else f"override {overrides[0]!r}"
    assert message == f"{source}: unknown key {key!r} (did you mean {suggestion!r}?)"
    assert info.value.keys == (key,)


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError, match=r"^override 'zzzzzz=1': unknown key 'zzzzzz'$"):
        load_config(None, ["zzzzzz=1"])


def test_override_into_a_value_is_not_a_section():
    with pytest.raises(ConfigError, match=r"unknown key 'seed\.x': 'seed' is a value of type int"):
        load_config(None, ["seed.x=1"])


@pytest.mark.parametrize("override", ["trainer.lr", "=3", "  "])
def test_malformed_override_is_named(override):
    with pytest.raises(ConfigError, match=rf"^malformed override {re.escape(repr(override))}"):
        load_config(None, [override])


def test_overrides_must_be_a_sequence_of_strings():
    with pytest.raises(TypeError):
        load_config(None, "trainer.lr=1e-6")


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.lr=abc", "trainer.lr: should be a valid number (got 'abc')"),
        ("trainer.lr=true", "trainer.lr: should be a valid number (got True)"),
        ("rollout.group_size=2.5", "rollout.group_size: should be a valid integer (got 2.5)"),
        ("rollout.group_size=true", "rollout.group_size: should be a valid integer (got True)"),
        (
            "trainer.progress_bar=maybe",
            "trainer.progress_bar: should be a valid boolean (got 'maybe')",
        ),
        ("trainer.progress_bar=1", "trainer.progress_bar: should be a valid boolean (got 1)"),
        ("rollout.top_k=many", "rollout.top_k: should be a valid integer (got 'many')"),
        ("output_dir=", "output_dir: should be a valid string (got None)"),
        ("trainer.adam_betas=0.9", "trainer.adam_betas: should be a valid list (got 0.9)"),
        (
            "trainer.adam_betas=[0.9, x]",
            "trainer.adam_betas[1]: should be a valid number (got 'x')",
        ),
        ("model=3", "model: should be a valid dictionary or instance of ModelConfig (got 3)"),
    ],
)
def test_bad_value_names_key_and_override(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"override {override!r}: {message}"


def test_bad_literal_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm=ppp"])
    assert "algorithm: should be 'grpo' or 'ppo' (got 'ppp') (did you mean 'ppo'?)" in str(
        info.value
    )
    with pytest.raises(ConfigError, match=r"got 'bf16' \(did you mean 'bfloat16'\?\)"):
        load_config(None, ["model.dtype=bf16"])


def test_bad_value_in_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: abc\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: trainer.lr: should be a valid number (got 'abc')"
    # A string field is not silently fed a number from YAML.
    with pytest.raises(ConfigError, match=r"data\.template: should be a valid string \(got 123\)"):
        load_config(write(tmp_path, "data: {template: 123}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("trainer: [1, 2\n", "invalid YAML"),
        ("- 1\n- 2\n", "expected a mapping at the top level"),
        ("trainer: 3\n", "trainer: should be a valid dictionary or instance of TrainerConfig"),
    ],
)
def test_malformed_file_is_named(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: .*{re.escape(message)}"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "rollout.group_size=0",
            "rollout.group_size: should be greater than or equal to 1 (got 0)",
        ),
        ("trainer.lr=0", "trainer.lr: should be greater than 0 (got 0)"),
        ("rollout.top_p=1.5", "rollout.top_p: should be less than or equal to 1 (got 1.5)"),
        ("loss.dual_clip=0.5", "loss.dual_clip: should be greater than 1 (got 0.5)"),
        ("checkpoint.keep=0", "checkpoint.keep: should be greater than or equal to 1 (got 0)"),
        ("trainer.lr=.nan", "trainer.lr: should be a finite number (got nan)"),
        (
            "trainer.adam_betas=[0.9, .inf]",
            "trainer.adam_betas[1]: should be a finite number (got inf)",
        ),
        ("trainer.adam_betas=[0.9, 1]", "trainer.adam_betas[1]: should be less than 1 (got 1)"),
        ("output_dir=''", "output_dir: string should have at least 1 character (got '')"),
        (
            "data.ops=[]",
            "data.ops: list should have at least 1 item after validation, not 0 (got [])",
        ),
        (
            "loss.rollout_is_cap=0.5",
            "loss.rollout_is_cap: should be greater than or equal to 1 (got 0.5)",
        ),
        (
            "rollout.max_extra_rounds=-1",
            "rollout.max_extra_rounds: should be greater than or equal to 0 (got -1)",
        ),
        (
            "reward.overlong_buffer=-1",
            "reward.overlong_buffer: should be greater than or equal to 0 (got -1)",
        ),
        (
            "trainer.adam_betas=[0.9]",
            "trainer.adam_betas: list should have at least 2 items after validation, not 1 (got [0.9])",
        ),
    ],
)
def test_range_errors_name_key_and_where_it_was_set(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == f"override {override!r}: {message}"
    assert info.value.keys == (message.split(":")[0].split("[")[0],)


def test_range_error_from_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "rollout: {group_size: 0}\n")
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(path))}: rollout\.group_size: should be greater than"
    ):
        load_config(path)


def test_an_error_names_the_layer_that_set_the_key(tmp_path):
    # The recipe sets a bad value and an override fixes it: valid. The recipe sets a good value
    # and an override breaks it: the override is named, not the file.
    path = write(tmp_path, "rollout: {group_size: 0, max_new_tokens: 4}\n")
    assert load_config(path, ["rollout.group_size=2"]).rollout.group_size == 2
    with pytest.raises(ConfigError, match=r"^override 'rollout.max_new_tokens=0': "):
        load_config(path, ["rollout.group_size=2", "rollout.max_new_tokens=0"])


def test_optional_bounds_skip_null():
    cfg = load_config(None, ["rollout.top_k=null", "trainer.max_grad_norm=null"])
    assert cfg.rollout.top_k is None and cfg.trainer.max_grad_norm is None


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["rollout.group_size=1"], ["advantage.estimator", "rollout.group_size"]),
        (
            ["advantage.estimator=rloo", "rollout.group_size=1"],
            ["advantage.estimator", "rollout.group_size"],
        ),
        (["advantage.estimator=gae"], ["advantage.estimator", "algorithm"]),
        (["ppo.critic_model=some/critic"], ["ppo.critic_model", "ppo.value"]),
        (["ppo.critic_lr=1e-5"], ["ppo.critic_lr", "ppo.value"]),
        (
            ["model.lora.r=8", "model.lora.target_modules=[]"],
            ["model.lora.target_modules", "model.lora.r"],
        ),
        (
            ["rollout.backend=hf", "rollout.sampler=inverse_cdf"],
            ["rollout.sampler", "rollout.backend"],
        ),
        (
            ["algorithm=ppo", "rollout.dynamic_sampling=true"],
            ["rollout.dynamic_sampling", "advantage.estimator"],
        ),
        (["reward.overlong_buffer=7"], ["reward.overlong_buffer", "rollout.max_new_tokens"]),
        (
            ["loss.mask_truncated=true", "rollout.ignore_eos=true"],
            ["loss.mask_truncated", "rollout.ignore_eos"],
        ),
        # 16 prompts * 8 = 128 sequences do not split into 3 minibatches.
        (
            ["trainer.num_minibatches=3"],
            ["rollout.prompts_per_step", "rollout.group_size", "trainer.num_minibatches"],
        ),
    ],
)
def test_cross_field_errors_name_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for key in keys:
        assert key in str(info.value)
        assert key in info.value.keys


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=ppo", "rollout.group_size=1"],  # gae needs no group
        ["algorithm=ppo", "ppo.value=critic", "ppo.critic_model=x", "ppo.critic_lr=1e-5"],
        [
            "trainer.num_minibatches=16",
            "trainer.micro_batch_size=8",
        ],  # 128 / 16 = 8 = 1 micro-batch
        ["trainer.warmup_steps=100"],
        ["trainer.warmup_steps=101"],  # a short smoke run of a recipe with warm-up
        ["trainer.num_minibatches=4", "trainer.micro_batch_size=12"],  # ragged last micro-batch
        ["rollout.prompts_per_step=2", "trainer.micro_batch_size=32"],  # one short micro-batch
        ["rollout.dynamic_sampling=true", "advantage.estimator=rloo", "reward.overlong_buffer=6"],
        ["loss.rollout_is=mask", "loss.rollout_is_level=sequence", "loss.rollout_is_cap=1"],
    ],
)
def test_valid_combinations_pass(overrides):
    load_config(None, overrides)


def test_validate_checks_values_assigned_after_loading():
    cfg = Config()
    cfg.rollout.group_size = 0
    with pytest.raises(ConfigError, match=r"^rollout\.group_size: should be greater than"):
        cfg.validate()


@pytest.mark.parametrize(
    "num_processes, overrides, key",
    [
        (1, [], None),
        (16, [], None),  # 16 prompts * 8 / 16 = 8 sequences = one micro-batch of 8
        (3, [], "rollout.prompts_per_step"),  # 16 prompts over 3 processes
        (2, ["trainer.num_minibatches=8"], None),  # 128 / 2 / 8 = 8 sequences
        (2, ["trainer.num_minibatches=16"], None),  # 128 / 2 / 16 = 4 < 8: one short micro-batch
        # 4 prompts * 2 = 8 sequences split into 8 minibatches on one process, not on two.
        (
            2,
            [
                "rollout.prompts_per_step=4",
                "rollout.group_size=2",
                "trainer.num_minibatches=8",
                "trainer.micro_batch_size=1",
            ],
            "trainer.num_minibatches",
        ),
    ],
)
def test_validate_for_a_process_count(num_processes, overrides, key):
    cfg = load_config(None, overrides)
    if key is None:
        cfg.validate(num_processes)
        return
    with pytest.raises(ConfigError) as info:
        cfg.validate(num_processes)
    assert key in info.value.keys and key in str(info.value)


@pytest.mark.parametrize(
    "override, key, registry, hint",
    [
        ("loss.policy_loss=ppoo", "loss.policy_loss", algos.POLICY_LOSSES, "ppo"),
        ("advantage.estimator=rlooo", "advantage.estimator", algos.ADVANTAGE_ESTIMATORS, "rloo"),
        ("loss.agg=token_mean", "loss.agg", algos.AGG_MODES, "token-mean"),
        ("data.template=plane", "data.template", None, "plain"),
        ("rollout.backend=shared-prefix", "rollout.backend", None, "shared_prefix"),
    ],
)
def test_choices_come_from_the_registries(override, key, registry, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"{key}: must be one of " in message and f"(did you mean {hint!r}?)" in message
    if registry is not None:
        assert f"must be one of {list(registry)!r}" in message


def test_a_newly_registered_name_is_a_valid_choice(monkeypatch):
    monkeypatch.setitem(algos.POLICY_LOSSES, "my_loss", algos.POLICY_LOSSES["ppo"])
    assert load_config(None, ["loss.policy_loss=my_loss"]).loss.policy_loss == "my_loss"
    assert "my_loss" in format_help()


def test_every_default_choice_is_registered():
    for key, field in recipe.walk(Config):
        names = recipe.choices(field)
        if names is not None and get(Config(), key) is not None:
            assert get(Config(), key) in names, key


# --- round trip, copying ---------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "algorithm=ppo",
            "trainer.lr=3e-7",
            "trainer.adam_betas=[0.8, 0.95]",
            "rollout.top_k=20",
            "model.lora.r=4",
            "model.lora.target_modules=[q_proj]",
            "harness.report_to=[tensorboard]",
            "ppo.value_clip=null",
            # Strings YAML would otherwise read as null, bool, float, int or a mapping.
            "data.system_prompt='null'",
            "data.path='yes'",
            "output_dir='1e-6'",
            "resume='123'",
            "model.attn_implementation=a: b",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.data.system_prompt == "null" and loaded.data.path == "yes"
    assert loaded.output_dir == "1e-6" and loaded.resume == "123"
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)


def test_to_dict_is_plain_and_detached():
    cfg = Config()
    data = to_dict(cfg)
    assert data["trainer"]["lr"] == 1e-6 and data["model"]["lora"]["r"] == 0
    data["trainer"]["adam_betas"].append(0.5)
    assert cfg.trainer.adam_betas == [0.9, 0.999]
    assert Config.model_validate(to_dict(cfg)) == cfg


def test_pickle_and_copy():
    cfg = load_config(None, ["rollout.group_size=4", "model.lora.r=2"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    clone = copy.deepcopy(cfg)
    assert clone == cfg
    clone.model.lora.target_modules.append("up_proj")
    assert clone != cfg


def test_config_error_pickles():
    error = pickle.loads(pickle.dumps(ConfigError("x: bad", ["x"])))
    assert str(error) == "x: bad"


# --- documentation ---------------------------------------------------------------------------


def test_every_key_has_a_doc_and_a_readable_type():
    fields = {key: f for key, f in recipe.walk(Config) if recipe.section(f) is None}
    assert list(fields) == leaf_keys(Config())
    assert [key for key, f in fields.items() if not (f.description or "").strip()] == []
    assert fields["trainer.lr"].description == "Peak learning rate (AdamW)."
    assert "disables LoRA" in fields["model.lora.r"].description
    types = {key: recipe.type_str(f) for key, f in fields.items()}
    assert types["trainer.lr"] == "float" and types["model.lora.r"] == "int"
    assert types["algorithm"] == "{grpo,ppo}"
    assert types["rollout.top_k"] == "int | None"
    assert types["model.lora.target_modules"] == "list[str]"
    assert types["advantage.estimator"] == "{" + ",".join(algos.ADVANTAGE_ESTIMATORS) + "} | None"
    assert recipe.bounds_str(fields["rollout.top_p"]) == "> 0, <= 1"


def test_format_help_has_every_key_doc_bound_and_section():
    text = format_help()
    for key, field in recipe.walk(Config):
        if recipe.section(field) is None:
            assert f"{key}: {recipe.type_str(field)} = " in text
            assert field.description.splitlines()[0] in text
    assert "trainer.lr: float = 1.0e-06  (> 0)\n" in text
    assert "trainer.adam_betas: list[float] = [0.9, 0.999]  (len >= 2, len <= 2)\n" in text
    assert "data.ops: list[str] = [+]  (non-empty)\n" in text
    sections = [key for key, f in recipe.walk(Config) if recipe.section(f) is not None]
    assert "model.lora" in sections
    for section in sections:
        match = re.search(rf"^\s*{re.escape(section)}:  (.*)$", text, flags=re.M)
        assert match and match.group(1).strip(), section
    assert "seed: int = 7  (>= 0)\n" in format_help(load_config(None, ["seed=7"]))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(recipe):
    load_config(recipe)
