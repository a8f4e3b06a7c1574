import json
import math
import time

import pytest
import torch

from grpo_lab import harness
from grpo_lab.harness import (
    GIB,
    PEAK_TFLOPS,
    Harness,
    MetricsWriter,
    device_peak_flops,
    footprint_metrics,
    format_duration,
    format_step_line,
    model_footprint,
    peak_rss_gib,
    process_rss_gib,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_phase_time_covers_a_sleep():
    h = Harness("cpu")
    h.start_step()
    with h.phase("rollout"):
        time.sleep(0.05)
    out = h.end_step()
    assert out["time/rollout_s"] >= 0.05
    assert out["time/step_s"] >= out["time/rollout_s"]


def test_phase_entered_twice_adds_up():
    clock = FakeClock()
    h = Harness("cpu", clock=clock)
    h.start_step()
    with h.phase("ref"):
        clock.advance(1.0)
    with h.phase("update"):
        clock.advance(4.0)
    with h.phase("ref"):
        clock.advance(0.5)
    out = h.end_step()
    assert out["time/ref_s"] == 1.5
    assert out["time/update_s"] == 4.0
    assert out["time/step_s"] == 5.5


def test_start_step_clears_previous_phases():
    clock = FakeClock()
    h = Harness("cpu", clock=clock)
    h.start_step()
    with h.phase("reward"):
        clock.advance(1.0)
    h.end_step()
    h.start_step()
    with h.phase("update"):
        clock.advance(2.0)
    out = h.end_step()
    assert "time/reward_s" not in out
    assert out["time/update_s"] == 2.0


def test_throughput_and_mfu_on_hand_numbers():
    clock = FakeClock()
    h = Harness("cpu", n_params=1000, peak_flops=1e7, clock=clock)
    h.start_step()
    with h.phase("rollout"):
        clock.advance(2.0)
    h.add_tokens(generated=400, samples=16)
    with h.phase("update"):
        clock.advance(3.0)
    h.add_tokens(trained=1200)
    clock.advance(3.0)  # untimed work: only in the step time
    out = h.end_step()
    # step = 2 + 3 + 3 = 8 s
    # gen tokens/s   = 400 / 2 = 200;  train tokens/s = 1200 / 3 = 400;  samples/s = 16 / 8 = 2
    # FLOPs = 6 * 1000 * 1200 + 2 * 1000 * 400 = 7.2e6 + 0.8e6 = 8e6
    # MFU   = 8e6 / (8 s * 1e7 FLOP/s) = 0.1
    assert out["time/step_s"] == 8.0
    assert out["perf/gen_tokens_per_s"] == 200.0
    assert out["perf/train_tokens_per_s"] == 400.0
    assert out["perf/samples_per_s"] == 2.0
    assert out["perf/mfu"] == 0.1


def test_mfu_left_out_without_peak_or_param_count():
    for kwargs in ({"n_params": 1000}, {"peak_flops": 1e12}):
        clock = FakeClock()
        h = Harness("cpu", clock=clock, **kwargs)
        h.start_step()
        h.add_tokens(generated=10, trained=10)
        clock.advance(1.0)
        out = h.end_step()
        assert "perf/mfu" not in out
        assert out["perf/samples_per_s"] == 0.0


def test_rates_left_out_when_their_phase_is_missing():
    clock = FakeClock()
    h = Harness("cpu", clock=clock)
    h.start_step()
    h.add_tokens(generated=10, trained=10, samples=2)
    clock.advance(1.0)
    out = h.end_step()
    assert "perf/gen_tokens_per_s" not in out
    assert "perf/train_tokens_per_s" not in out
    assert out["perf/samples_per_s"] == 2.0


def test_end_step_keys_on_cpu():
    h = Harness("cpu", n_params=10)
    h.start_step()
    with h.phase("rollout"):
        pass
    with h.phase("update"):
        pass
    h.add_tokens(generated=3, trained=5, samples=1)
    out = h.end_step()
    # A zero-length phase is possible on a coarse clock; the rate keys then go missing.
    rates = {"perf/gen_tokens_per_s", "perf/train_tokens_per_s"}
    assert set(out) - rates == {
        "time/step_s",
        "time/rollout_s",
        "time/update_s",
        "perf/samples_per_s",
        "mem/rss_gib",
        "mem/rss_peak_gib",
        "mem/rss_delta_gib",
        "time/total_s",
        "perf/total_gen_tokens",
        "perf/total_train_tokens",
    }
    assert all(isinstance(v, float) for v in out.values())
    assert 0 < out["mem/rss_gib"]


def test_cumulative_counters_and_state_dict_roundtrip():
    clock = FakeClock()
    h = Harness("cpu", clock=clock)
    for seconds, tokens in ((1.0, 5), (2.0, 7)):
        h.start_step()
        h.add_tokens(generated=tokens, trained=2 * tokens, samples=1)
        clock.advance(seconds)
        out = h.end_step()
    assert out["time/total_s"] == 3.0
    assert out["perf/total_gen_tokens"] == 12.0
    assert out["perf/total_train_tokens"] == 24.0

    resumed = Harness("cpu", clock=clock)
    resumed.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert resumed.state_dict() == h.state_dict()
    resumed.start_step()
    resumed.add_tokens(generated=1)
    clock.advance(0.5)
    out = resumed.end_step()
    assert out["time/total_s"] == 3.5
    assert out["perf/total_gen_tokens"] == 13.0
    assert resumed.state_dict()["steps"] == 3


def test_load_state_dict_names_missing_key():
    with pytest.raises(KeyError, match="total_gen_tokens"):
        Harness("cpu").load_state_dict({"total_s": 1.0})


def test_misuse_is_reported():
    h = Harness("cpu")
    with pytest.raises(RuntimeError, match="start_step"):
        with h.phase("rollout"):
            pass
    with pytest.raises(RuntimeError, match="start_step"):
        h.end_step()
    h.start_step()
    with pytest.raises(RuntimeError, match="already open"):
        with h.phase("update"):
            with h.phase("update"):
                pass
    with pytest.raises(ValueError, match="trained"):
        h.add_tokens(trained=-1)


def test_device_peak_flops_matches_longest_name(monkeypatch):
    names = {
        "NVIDIA H100 PCIe": PEAK_TFLOPS["H100 PCIe"],
        "NVIDIA H100 80GB HBM3": PEAK_TFLOPS["H100"],
        "NVIDIA A100-SXM4-80GB": PEAK_TFLOPS["A100"],
        "NVIDIA A10G": PEAK_TFLOPS["A10"],
        "NVIDIA L40S": PEAK_TFLOPS["L40S"],
        "NVIDIA GeForce RTX 4090": PEAK_TFLOPS["RTX 4090"],
    }
    for name, tflops in names.items():
        monkeypatch.setattr(harness, "_cuda_device_name", lambda device, name=name: name)
        assert device_peak_flops("cuda") == tflops * 1e12, name
        assert device_peak_flops("cuda", dtype=torch.float32) == tflops * 0.5e12, name
    assert PEAK_TFLOPS["H100 PCIe"] != PEAK_TFLOPS["H100"]
    assert PEAK_TFLOPS["A100"] != PEAK_TFLOPS["A10"]

    monkeypatch.setattr(harness, "_cuda_device_name", lambda device: "Some Future GPU")
    assert device_peak_flops("cuda:0") is None
    assert device_peak_flops("cuda:0", override_tflops=100.0) == 100e12


def test_device_peak_flops_cpu_and_bad_input():
    assert device_peak_flops("cpu") is None
    assert device_peak_flops("cpu", override_tflops=2.0) == 2e12
    assert Harness("cpu").peak_flops is None
    with pytest.raises(ValueError, match="dtype"):
        device_peak_flops("cpu", dtype=torch.int8)
    with pytest.raises(ValueError, match="override_tflops"):
        device_peak_flops("cpu", override_tflops=0.0)


def test_model_footprint_linear_with_adam_after_one_step():
    model = torch.nn.Linear(3, 2)  # weight 2x3 = 6, bias 2: 8 float32 values
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    fp = model_footprint(model, optimizer)
    # params = 8 * 4 B = 32; grads the same; Adam = exp_avg 32 + exp_avg_sq 32 + two float32
    # scalar step tensors (one per parameter tensor) 2 * 4 = 8, so 72.
    assert fp == {
        "params_bytes": 32,
        "grads_bytes": 32,
        "optimizer_bytes": 72,
        "n_params": 8,
        "n_trainable": 8,
    }


def test_model_footprint_frozen_bf16_and_tied():
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    model.bias.requires_grad_(False)
    # Before backward: grads predicted for the trainable weight only, 6 * 2 B = 12.
    fp = model_footprint(model)
    assert fp == {
        "params_bytes": 16,
        "grads_bytes": 12,
        "optimizer_bytes": 0,
        "n_params": 8,
        "n_trainable": 6,
    }
    # The same module twice shares its parameters; they count once.
    assert model_footprint(torch.nn.Sequential(model, model)) == fp


def test_footprint_metrics_keys_and_values():
    policy = {
        "params_bytes": 2 * 2**30,
        "grads_bytes": 2**30,
        "optimizer_bytes": 2**29,
        "n_params": 5,
        "n_trainable": 5,
    }
    reference = {"params_bytes": 2**30, "grads_bytes": 0, "optimizer_bytes": 0, "n_params": 5}
    out = footprint_metrics({"policy": policy, "reference": reference})
    assert out == {
        "mem/static/policy_params_gib": 2.0,
        "mem/static/policy_grads_gib": 1.0,
        "mem/static/policy_optimizer_gib": 0.5,
        "mem/static/reference_params_gib": 1.0,
        "mem/static/reference_grads_gib": 0.0,
        "mem/static/reference_optimizer_gib": 0.0,
        "mem/static/total_gib": 4.5,  # 2 + 1 + 0.5 + 1
    }


def test_rss_readings():
    rss = process_rss_gib()
    peak = peak_rss_gib()
    assert rss > 0
    # Read second, the lifetime peak cannot be below the current RSS; the slack of 1 MiB covers
    # the kernel's per-CPU counter approximation. A KiB/bytes mix-up would be off by 1024x.
    assert peak >= rss - 1 / 1024
    # An independent reading: VmRSS in /proc/self/status, in kB.
    with open("/proc/self/status") as f:
        vm_rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert abs(vm_rss_kib * 1024 / GIB - rss) < 16 / 1024


def test_metrics_writer_append_read_truncate(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write({"step": 1, "loss/policy": torch.tensor(0.5), "reward/mean": 0.25})
        writer.write({"step": 2, "n": torch.tensor(3), "name": "grpo"})
    # A resumed run reopens the same file and continues it.
    with MetricsWriter(tmp_path / "metrics.jsonl") as writer:
        writer.write({"step": 3, "flag": True})
    rows = MetricsWriter.read(tmp_path)
    assert rows == [
        {"step": 1, "loss/policy": 0.5, "reward/mean": 0.25},
        {"step": 2, "n": 3, "name": "grpo"},
        {"step": 3, "flag": True},
    ]
    assert MetricsWriter.truncate_after(tmp_path, 1) == 2
    assert MetricsWriter.read(tmp_path) == rows[:1]
    assert MetricsWriter.truncate_after(tmp_path / "missing", 0) == 0


def test_metrics_writer_nonfinite_as_null(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write({"step": 1, "a": math.nan, "b": torch.tensor(-math.inf), "c": [1.0, math.inf]})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    (row,) = MetricsWriter.read(tmp_path)
    assert row["a"] is None and row["b"] is None and row["c"] == [1.0, None]
    assert row["nonfinite"] == {"a": "nan", "b": "-inf", "c[1]": "inf"}


def test_metrics_writer_rejects_unknown_types(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(TypeError, match="'cfg'"):
            writer.write({"step": 1, "cfg": object()})


def test_truncate_after_drops_torn_last_line_only(tmp_path):
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1}\n{"note": "no step"}\n{"step": 2}\n{"step": 3, "lo')
    assert MetricsWriter.truncate_after(file, 1) == 2
    assert MetricsWriter.read(file) == [{"step": 1}, {"note": "no step"}]
    file.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        MetricsWriter.truncate_after(file, 5)
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        MetricsWriter.read(file)


def test_metrics_writer_disabled_and_accelerator(tmp_path):
    MetricsWriter(tmp_path / "off", enabled=False).write({"step": 1})
    assert not (tmp_path / "off").exists()

    class FakeAccelerator:
        def __init__(self, trackers):
            self.trackers = trackers
            self.calls = []

        def log(self, values, step=None):
            self.calls.append((values, step))

    with_trackers, without = FakeAccelerator(["tb"]), FakeAccelerator([])
    for accelerator in (with_trackers, without):
        with MetricsWriter(tmp_path, accelerator=accelerator) as writer:
            writer.write({"step": 4, "loss/value": 0.5, "bad": math.nan, "name": "ppo"})
    assert with_trackers.calls == [({"loss/value": 0.5, "name": "ppo"}, 4)]
    assert without.calls == []


def test_format_duration():
    assert [format_duration(s) for s in (0, 3.4, 59.6, 123, 3723)] == [
        "0s",
        "3s",
        "1m00s",
        "2m03s",
        "1h02m03s",
    ]


def test_format_step_line():
    record = {
        "step": 7,
        "reward/mean": 0.5,
        "reward/accuracy": 0.25,
        "policy/kl_ref": 0.002,
        "time/step_s": 1.234,
        "loss/policy": -0.01,
        "loss/value": None,
    }
    line = format_step_line(record)
    assert line == (
        "step 7 | reward 0.500 | acc 0.250 | kl 0.0020 | 1.23 s/step | loss policy -0.0100 value nan"
    )
    assert format_step_line({"step": 1}) == "step 1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_phase_peaks():
    device = torch.device("cuda")
    h = Harness(device, n_params=10)
    h.start_step()
    with h.phase("rollout"):
        big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 0.25 GiB
        del big
    with h.phase("update"):
        small = torch.empty(2**20, dtype=torch.uint8, device=device)
        del small
    with h.phase("rollout"):
        pass
    out = h.end_step()
    assert out["mem/rollout_peak_gib"] >= 0.25  # max over re-entries keeps the first peak
    assert out["mem/update_peak_gib"] < out["mem/rollout_peak_gib"]
    assert out["mem/peak_alloc_gib"] >= out["mem/rollout_peak_gib"]
    assert out["mem/peak_reserved_gib"] >= out["mem/peak_alloc_gib"]
    assert not any(key.startswith("mem/rss") for key in out)
    if h.peak_flops is not None:
        assert "perf/mfu" in out


def test_metrics_read_skips_a_torn_last_line(tmp_path, caplog):
    # A killed (or still running) writer leaves its last record half-written: skipped, with a
    # warning naming the file and line.
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with caplog.at_level("WARNING", logger="grpo_lab"):
        assert MetricsWriter.read(file) == [{"step": 1}, {"step": 2}]
    assert "metrics.jsonl:3" in caplog.text
    # Also when the torn record did get its newline, and with blank lines after it.
    file.write_text('{"step": 1}\n{"step": 2, "lo\n\n')
    assert MetricsWriter.read(file) == [{"step": 1}]
    # A whole last line without its newline is a record.
    file.write_text('{"step": 1}\n{"step": 2}')
    assert MetricsWriter.read(file) == [{"step": 1}, {"step": 2}]


def test_metrics_read_bad_line_in_the_middle_names_file_and_line(tmp_path):
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record"):
        MetricsWriter.read(file)
    file.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        MetricsWriter.read(file)
