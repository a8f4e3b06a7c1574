"""Smoke tests of benchmarks/step_bench.py: the W builders at a small scale, the TRL settings,
the report helpers, and one end-to-end tiny run. Anything that runs TRL is marked slow."""

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from grpo_lab.config import load_config

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "step_bench.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_bench"] = module
    spec.loader.exec_module(module)
    return module


sb = _load_script()

SMALL_SHAPE = sb.WShape(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
)


def _small_w_preset():
    # W's settings (fixed length, bf16, sdpa, checkpointing) at a size a CPU runs in seconds.
    return dataclasses.replace(
        sb.PRESETS["w0.5b"], prompts_per_step=2, max_new_tokens=4, prompt_words=8
    )


def test_w_words_fill_the_vocabulary_after_specials_bytes_and_stems():
    # 1000 = 3 specials + 256 bytes + 26 one-letter + 676 two-letter stems + 39 three-letter words.
    assert sb.w_word_length(1000) == 3
    assert sb.w_words(1000)[:2] == ["aaa", "aab"] and len(sb.w_words(1000)) == 39
    # 151936 = 3 + 256 + 26 + 676 + 17576 stems + 133399 four-letter words.
    assert sb.w_word_length(151936) == 4
    assert len(sb.w_words(151936)) == 133399


def test_w_tokenizer_has_exactly_vocab_size_entries_and_one_token_per_word():
    tok = sb.build_w_tokenizer(1000)
    assert len(tok) == 1000
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # " aaa" is the first word, after the 961 entries before it; " abm" (the 39th) is id 999.
    assert tok(" aaa abm")["input_ids"] == [961, 999]
    assert tok.decode([961, 999]) == " aaa abm"


def test_full_w_tokenizer_and_config_match_qwen25_05b_shape():
    tok = sb.build_w_tokenizer(sb.WShape().vocab_size)
    config = sb.build_w_config(sb.WShape(), tok)
    assert len(tok) == 151936 == config.vocab_size
    assert (config.hidden_size, config.num_hidden_layers) == (896, 24)
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert config.intermediate_size == 4864
    assert config.tie_word_embeddings
    assert config.max_position_embeddings == 32768
    assert config.rope_parameters["rope_theta"] == 1e6
    assert config.eos_token_id == tok.eos_token_id == 1


def test_w_config_rejects_a_tokenizer_larger_than_the_vocabulary():
    small = dataclasses.replace(SMALL_SHAPE, vocab_size=999)
    with pytest.raises(ValueError, match="1000 entries, more than 999"):
        sb.build_w_config(small, sb.build_w_tokenizer(1000))


def test_random_word_prompts_are_prompt_words_tokens_long_and_seeded():
    tok = sb.build_w_tokenizer(SMALL_SHAPE.vocab_size)
    prompts = sb.random_word_prompts(5, words=64, vocab_size=SMALL_SHAPE.vocab_size, seed=3)
    ids = tok([p.question for p in prompts])["input_ids"]
    assert [len(i) for i in ids] == [64] * 5
    assert min(min(i) for i in ids) >= 961  # whole words only, no bytes, stems or specials
    assert tok.decode(ids[0]) == prompts[0].question
    again = sb.random_word_prompts(5, words=64, vocab_size=SMALL_SHAPE.vocab_size, seed=3)
    assert again == prompts
    assert sb.random_word_prompts(5, words=64, vocab_size=1000, seed=4) != prompts


def test_save_w_model_round_trips_shape_dtype_and_generation_ids(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sb.save_w_model(
        tmp_path / "m", SMALL_SHAPE, dtype="bfloat16", attn_implementation="sdpa", seed=0
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == SMALL_SHAPE.vocab_size
    # AutoTokenizer may substitute its own class for a qwen2 folder; the ids must not change.
    prompt = sb.random_word_prompts(1, words=16, vocab_size=SMALL_SHAPE.vocab_size, seed=0)[0]
    built = sb.build_w_tokenizer(SMALL_SHAPE.vocab_size)
    assert tok(prompt.question)["input_ids"] == built(prompt.question)["input_ids"]
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_trl_settings_give_one_generation_batch_of_prompts_times_g_per_optimizer_step():
    for preset in sb.PRESETS.values():
        kw = sb.trl_config_kwargs(preset, output_dir="x", max_steps=3, seed=0, use_cpu=True)
        per_step = kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"]
        assert per_step == preset.prompts_per_step * preset.group_size
        assert kw["steps_per_generation"] == kw["gradient_accumulation_steps"]
        assert kw["num_generations"] == preset.group_size
        assert (kw["beta"], kw["num_iterations"], kw["loss_type"]) == (0.0, 1, "dapo")
        assert kw["learning_rate"] == preset.lr
    w = sb.trl_config_kwargs(
        sb.PRESETS["w0.5b"], output_dir="x", max_steps=1, seed=0, use_cpu=False
    )
    assert w["generation_kwargs"] == {"min_new_tokens": 256}
    assert (w["epsilon"], w["epsilon_high"]) == (0.2, 0.28)
    assert w["model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "sdpa"}


@pytest.mark.parametrize("preset", sorted(sb.PRESETS))
@pytest.mark.parametrize("impl", sb.GRPO_LAB_IMPLS)
def test_grpo_lab_overrides_load_and_match_the_preset(preset, impl):
    p = sb.PRESETS[preset]
    overrides = sb.grpo_lab_overrides(
        p,
        impl,
        model_path="some/model",
        prompts_path="prompts.jsonl",
        output_dir="out",
        max_steps=7,
        seed=0,
        threads=3,
    )
    cfg = load_config(sb.RECIPES / p.recipes[sb.impl_spec(impl)[0]], overrides)
    assert cfg.model.name_or_path == "some/model"
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (
        p.prompts_per_step,
        p.group_size,
    )
    assert cfg.rollout.max_new_tokens == p.max_new_tokens
    assert cfg.rollout.ignore_eos == p.fixed_length
    assert (cfg.model.dtype, cfg.trainer.lr, cfg.loss.kl_coef) == (p.dtype, p.lr, 0.0)
    assert (cfg.data.name, cfg.data.path, cfg.data.num_eval) == ("math", "prompts.jsonl", 0)
    assert cfg.trainer.cpu_threads == 3
    # Equal work: every implementation runs the preset's micro-batch.
    assert cfg.trainer.micro_batch_size == p.micro_batch_size
    updates = cfg.trainer.epochs * cfg.trainer.num_minibatches
    if impl.startswith("grpo") or "_matched" in impl:
        assert updates == 1
    assert cfg.algorithm == ("grpo" if impl.startswith("grpo") else "ppo")
    if impl.startswith("ppo"):
        assert cfg.ppo.value == ("head" if "head" in impl else "critic")
        assert cfg.ppo.values_from_rollout == (impl != "ppo_head_matched_values_pass")
    if impl.startswith("grpo"):
        assert cfg.trainer.skip_zero_advantage == (impl == "grpo")


def test_impls_are_the_objectives_plus_trl_and_the_benchmark_variants():
    from grpo_lab.objectives import OBJECTIVES

    assert sb.DEFAULT_IMPLS == ("trl", *OBJECTIVES)
    assert set(sb.IMPLS) == {"trl", *OBJECTIVES, "grpo_all_rows", "ppo_head_matched_values_pass"}
    assert sb.impl_spec("ppo_head_matched") == ("ppo_head", sb.MATCHED_UPDATES)


def test_mid_model_is_a_qwen2_of_10_to_30_million_parameters_with_a_32k_vocabulary():
    from transformers import AutoModelForCausalLM

    config = sb.build_w_config(sb.MID_SHAPE, sb.build_w_tokenizer(sb.MID_SHAPE.vocab_size))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())  # the tied embedding counted once
    assert config.model_type == "qwen2" and config.vocab_size == 32000
    assert 10e6 <= n <= 30e6


def test_compute_ratios_divides_medians_and_memory_by_trl():
    results = {
        "trl": {"step_s_summary": {"median": 2.0}, "mem_gib": 4.0},
        "grpo": {"step_s_summary": {"median": 1.0}, "mem_gib": 1.0},
    }
    results["trl"]["step_s_summary"]["min"] = 1.0
    results["grpo"]["step_s_summary"]["min"] = 0.25
    assert sb.compute_ratios(results) == {
        "trl": {"time": 1.0, "time_best": 1.0, "memory": 1.0},
        "grpo": {"time": 0.5, "time_best": 0.25, "memory": 0.25},
    }
    assert sb.compute_ratios({"grpo": results["grpo"]}) == {}
    # Against GRPO: TRL takes 2/1 = 2x its median time, 1/0.25 = 4x its fastest, 4x its memory.
    assert sb.compute_ratios(results, base="grpo")["trl"] == {
        "time": 2.0,
        "time_best": 4.0,
        "memory": 4.0,
    }


def test_round_orders_alternate_forward_and_reversed():
    assert sb.round_orders(["trl", "grpo", "ppo_head"], 3) == [
        ["trl", "grpo", "ppo_head"],
        ["ppo_head", "grpo", "trl"],
        ["trl", "grpo", "ppo_head"],
    ]


def _result(impl, steps, mem):
    return sb.ImplResult(
        impl=impl,
        step_s=steps,
        warmup_step_s=[9.0],
        phases_s={"rollout": [s / 2 for s in steps]},
        completion_len=[3.0] * len(steps),
        mem_gib=mem,
        mem_metric="m",
        extra={"recipe": "r"},
        step_cpu_s=[s / 4 for s in steps],
    )


def test_merge_rounds_pools_steps_and_keeps_per_round_medians_and_the_highest_memory():
    merged = sb.merge_rounds([_result("grpo", [1.0, 3.0, 2.0], 1.5), _result("grpo", [4.0], 1.0)])
    assert merged.step_s == [1.0, 3.0, 2.0, 4.0]
    assert merged.warmup_step_s == [9.0, 9.0]
    assert merged.phases_s == {"rollout": [0.5, 1.5, 1.0, 2.0]}
    assert merged.mem_gib == 1.5
    assert merged.extra == {
        "recipe": "r",
        "round_median_step_s": [2.0, 4.0],
        "round_median_step_cpu_s": [0.5, 1.0],
        "round_mem_gib": [1.5, 1.0],
    }
    assert merged.step_cpu_s == [0.25, 0.75, 0.5, 1.0]
    # Pooled median of [1, 2, 3, 4] is 2.5.
    assert merged.to_dict()["step_s_summary"] == {
        "median": 2.5,
        "mean": 2.5,
        "min": 1.0,
        "max": 4.0,
    }


def test_ratios_by_round_divide_each_round_median_by_trls():
    trl = sb.merge_rounds([_result("trl", [2.0], 2.0), _result("trl", [4.0], 2.0)]).to_dict()
    grpo = sb.merge_rounds([_result("grpo", [1.0], 1.0), _result("grpo", [3.0], 1.0)]).to_dict()
    ratios = sb.compute_ratios({"trl": trl, "grpo": grpo})
    # Rounds: 1/2 and 3/4; pooled medians 2 / 3.
    assert ratios["grpo"]["time_by_round"] == [0.5, 0.75]
    assert ratios["grpo"]["time"] == 2.0 / 3.0
    assert ratios["grpo"]["memory"] == 0.5
    # CPU seconds are a quarter of the wall seconds on both sides: the same ratios.
    assert ratios["grpo"]["cpu_time_by_round"] == [0.5, 0.75]
    assert ratios["grpo"]["cpu_time"] == 2.0 / 3.0
    assert ratios["grpo"]["cpu_time_mean"] == 2.0 / 3.0  # means 0.5 / 0.75


def test_json_safe_turns_non_finite_floats_into_null():
    out = sb.json_safe({"a": [1.0, math.nan], "b": (math.inf,), "c": "x"})
    assert out == {"a": [1.0, None], "b": [None], "c": "x"}
    json.dumps(out, allow_nan=False)


def test_threads_default_to_the_preset_then_the_grpo_recipe_then_torch():
    assert sb.resolve_threads(sb.PRESETS["tiny"], 2) == 2
    assert sb.resolve_threads(sb.PRESETS["tiny"], None) == 1  # tiny_arith_grpo.yaml
    assert sb.resolve_threads(sb.PRESETS["mid"], None) == 1  # the preset's own
    assert sb.resolve_threads(sb.PRESETS["w0.5b"], None) == torch.get_num_threads()


def test_impls_option_rejects_unknown_and_repeated_names():
    with pytest.raises(SystemExit):
        sb.build_parser().parse_args(["--preset", "tiny", "--impls", "grpo,foo"])
    with pytest.raises(SystemExit):
        sb.build_parser().parse_args(["--preset", "tiny", "--impls", "grpo,grpo"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_w_preset_refuses_to_run_on_cpu_without_allow_cpu(capsys):
    assert sb.main(["--preset", "w0.5b", "--impls", "grpo"]) == 2
    assert "--allow-cpu" in capsys.readouterr().err


@pytest.mark.parametrize(
    "backend", ["shared_prefix", "static", pytest.param("compiled", marks=pytest.mark.slow)]
)
def test_small_w_grpo_lab_step_has_fixed_length_completions(tmp_path, backend):
    """W's code path (bf16, sdpa, gradient checkpointing, EOS suppressed) with each rollout
    engine gpu_suite.sh times on W."""
    preset = _small_w_preset()
    workload = sb.prepare_workload(preset, tmp_path, total_steps=1, seed=0, w_shape=SMALL_SHAPE)
    result = sb.run_grpo_lab(
        "grpo",
        preset,
        workload,
        steps=1,
        warmup=0,
        device=torch.device("cpu"),
        workdir=tmp_path,
        seed=0,
        threads=1,
        extra_overrides=[f"rollout.backend={backend}"],
    )
    assert result.completion_len == [4.0]
    assert len(result.step_s) == 1 and result.step_s[0] > 0
    assert {"rollout", "reward", "update"} <= set(result.phases_s)


def test_tiny_grpo_end_to_end_last_line_is_the_json_report(capsys, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--preset", "tiny", "--steps", "1", "--warmup", "0", "--impls", "grpo"]
    assert sb.main([*argv, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report == json.loads(out.read_text())
    assert {"preset", "device", "device_name", "versions", "results", "ratios"} <= set(report)
    assert report["preset"] == "tiny" and report["versions"]["trl"] is None
    assert set(report["versions"]) >= {"torch", "transformers", "trl"}
    grpo = report["results"]["grpo"]
    assert len(grpo["step_s"]) == 1 and grpo["step_s_summary"]["median"] > 0
    assert {"rollout", "reward", "update"} <= set(grpo["phases_median_s"])
    assert 1 <= grpo["completion_len_mean"] <= 6
    assert report["ratios"] == {}
    assert report["isolation"] == "one process per implementation"
    assert report["reward"] == {"kind": "task", "zero_std_fraction": 0.0, "seed": 0}
    assert 0 <= grpo["zero_std_fraction"] <= 1
    assert grpo["extra"]["static_gib"]["total"] > 0
    assert report["ratios_vs_grpo"]["grpo"]["time"] == 1.0


def test_controlled_reward_gives_every_group_signal_and_equal_rows(capsys):
    """With the controlled reward (zero-std fraction 0) GRPO skips no row, so GRPO and PPO at
    matched updates run the same rows; PPO-head reads its values in the rollout unless the
    values-pass variant asks for the separate forward."""
    impls = "grpo,ppo_head_matched,ppo_head_matched_values_pass"
    argv = ["--preset", "tiny", "--steps", "2", "--warmup", "0", "--impls", impls]
    assert sb.main([*argv, "--reward", "controlled", "--in-process"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["reward"]["kind"] == "controlled" and report["isolation"] == "one process"
    results = report["results"]
    for impl in impls.split(","):
        assert results[impl]["zero_std_fraction"] == 0.0
        assert results[impl]["extra"]["zero_advantage_rows_skipped"] == [0.0, 0.0]
        assert results[impl]["extra"]["updates_per_step"] == 1
    assert not results["ppo_head_matched"]["extra"]["values_pass"]
    assert "values" not in results["ppo_head_matched"]["phases_s"]
    assert results["ppo_head_matched_values_pass"]["extra"]["values_pass"]
    statics = {k: r["extra"]["static_gib"] for k, r in results.items()}
    assert statics["ppo_head_matched"]["total"] > statics["grpo"]["total"]  # the head's bytes
    assert set(report["ratios_vs_grpo"]) == set(impls.split(","))


@pytest.mark.slow
def test_tiny_grpo_and_trl_end_to_end_with_ratios(capsys):
    argv = ["--preset", "tiny", "--steps", "1", "--warmup", "0", "--impls", "trl,grpo"]
    assert sb.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["trl_loss_type"] == "dapo"
    assert set(report["ratios"]) == {"trl", "grpo"}
    assert report["ratios"]["trl"] == {
        "time": 1.0,
        "time_best": 1.0,
        "memory": 1.0,
        "cpu_time": 1.0,
        "cpu_time_mean": 1.0,
    }
    assert 1 <= report["results"]["trl"]["completion_len_mean"] <= 6


@pytest.mark.slow
def test_small_w_trl_step_has_fixed_length_completions(tmp_path):
    preset = _small_w_preset()
    workload = sb.prepare_workload(preset, tmp_path, total_steps=1, seed=0, w_shape=SMALL_SHAPE)
    result = sb.run_trl(
        preset,
        workload,
        steps=1,
        warmup=0,
        device=torch.device("cpu"),
        workdir=tmp_path,
        seed=0,
        threads=1,
    )
    assert result.completion_len == [4.0]
    assert set(result.phases_s) == {"generate", "reward", "rest"}
