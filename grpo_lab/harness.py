"""Measuring harness: per-phase wall time, peak memory, throughput, MFU, and a JSONL metrics log.

The trainer wraps each part of a training step in a named phase::

    harness = Harness(device, n_params=count_params(policy))
    harness.start_step()
    with harness.phase("rollout"):
        ...  # sample completions
    harness.add_tokens(generated=n_completion_tokens, samples=n_sequences)
    with harness.phase("update"):
        ...  # forward + backward + optimizer step
    harness.add_tokens(trained=n_trained_tokens)
    metrics = harness.end_step()  # time/*, perf/*, mem/* floats

Conventions:

- Wall time comes from an injectable ``clock`` (``time.perf_counter`` by default). On CUDA with
  ``sync=True`` the device is synchronised at every phase entry and exit, and nowhere else, so a
  phase's time includes the kernels it queued. Work outside any phase is only counted in
  ``time/step_s`` and may still be in flight when ``end_step`` reads the clock.
- Memory is reported in GiB (2**30 bytes).
- MFU counts 6 N FLOPs per trained token (forward + backward) and 2 N per generated token
  (forward), with N the policy's parameter count, over ``step time * peak FLOP/s``. Forward-only
  scoring passes (reference, old log-probs, values) and the critic's own parameters are not
  counted, so the figure is conservative for PPO.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GIB = float(2**30)

ROLLOUT_PHASE = "rollout"
UPDATE_PHASE = "update"

# Dense (no 2:4 sparsity) bf16 tensor-core peak in TFLOP/s, keyed by a substring of
# torch.cuda.get_device_name(); the longest matching key wins, so "H100 PCIe" beats "H100".
# NOTE: "H100" alone is the SXM part, whose name ("NVIDIA H100 80GB HBM3") does not say "SXM".
# The A10G is matched by "A10" and given the A10 datasheet figure.
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.5,
    "H100 NVL": 835.0,
    "H100": 989.4,
    "H200 NVL": 835.0,
    "H200": 989.4,
    "A100": 312.0,
    "A40": 149.7,
    "A10": 125.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
}


def _cuda_device_name(device: torch.device) -> str:
    """Name of a CUDA device; a separate function so tests can substitute it."""
    return torch.cuda.get_device_name(device)


def device_peak_flops(
    device: torch.device | str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    override_tflops: float | None = None,
) -> float | None:
    """Peak FLOP/s of ``device`` for matmuls in ``dtype``, or None when unknown.

    ``override_tflops`` (TFLOP/s) wins over everything. Otherwise CPUs and CUDA devices whose name
    matches no key of ``PEAK_TFLOPS`` give None. bf16 and fp16 use the table's figure; float32 uses
    half of it, which is the dense TF32 tensor-core peak on every listed part.
    """
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"override_tflops must be positive, got {override_tflops}")
        return override_tflops * 1e12
    if dtype in (torch.bfloat16, torch.float16):
        scale = 1.0
    elif dtype == torch.float32:
        scale = 0.5
    else:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = _cuda_device_name(device).lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name:
            return PEAK_TFLOPS[key] * scale * 1e12
    return None


def process_rss_gib() -> float:
    """Current resident set size of this process in GiB (Linux ``/proc``; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except OSError:
        return math.nan
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / GIB


def peak_rss_gib() -> float:
    """Peak resident set size of this process since it started, in GiB."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # NOTE: ru_maxrss is in KiB on Linux but in bytes on macOS.
    bytes_per_unit = 1 if sys.platform == "darwin" else 1024
    return max_rss * bytes_per_unit / GIB


class Harness:
    """Times named phases of each training step and turns token counts into throughput and MFU.

    Args:
        device: where the model runs; CUDA devices get synchronisation and peak-memory tracking,
            other devices get process RSS.
        n_params: parameter count of the policy, used for MFU (None leaves MFU out).
        peak_flops: peak FLOP/s; overrides ``device_peak_flops(device)`` (bf16 table).
        sync: synchronise CUDA at phase edges so phase times include queued kernels.
        clock: monotonic seconds; injectable for tests.

    Rates whose denominator is zero or missing (e.g. no "update" phase this step) are left out of
    ``end_step``'s result rather than reported as 0 or inf.
    """

    _STATE_KEYS = ("total_s", "total_gen_tokens", "total_train_tokens", "total_samples", "steps")

    def __init__(
        self,
        device: torch.device | str,
        *,
        n_params: int | None = None,
        peak_flops: float | None = None,
        sync: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.n_params = n_params
        self.peak_flops = peak_flops if peak_flops is not None else device_peak_flops(self.device)
        self.sync = sync
        self.clock = clock
        self.total_s = 0.0
        self.total_gen_tokens = 0
        self.total_train_tokens = 0
        self.total_samples = 0
        self.steps = 0
        self._in_step = False
        self._reset_step()

    def _reset_step(self) -> None:
        self._step_start = 0.0
        self._phase_s: dict[str, float] = {}
        self._phase_peak_gib: dict[str, float] = {}
        self._open_phases: list[str] = []
        self._generated = 0
        self._trained = 0
        self._samples = 0
        self._step_peak_alloc_gib = 0.0
        self._step_peak_reserved_gib = 0.0
        self._rss_start_gib = 0.0

    def _synchronize(self) -> None:
        if self.is_cuda and self.sync:
            torch.cuda.synchronize(self.device)

    def _fold_cuda_peaks(self) -> None:
        """Fold the allocator's peaks since the last reset into the step and every open phase."""
        alloc = torch.cuda.max_memory_allocated(self.device) / GIB
        reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        self._step_peak_alloc_gib = max(self._step_peak_alloc_gib, alloc)
        self._step_peak_reserved_gib = max(self._step_peak_reserved_gib, reserved)
        for name in self._open_phases:
            self._phase_peak_gib[name] = max(self._phase_peak_gib.get(name, 0.0), alloc)

    def start_step(self) -> None:
        """Begin a step: clear per-step counters and CUDA peak stats, note the RSS baseline."""
        self._reset_step()
        self._in_step = True
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss_start_gib = process_rss_gib()
        self._step_start = self.clock()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a named part of the step; re-entering the same name adds to its time and peak.

        Phases may nest (each keeps its own time and peak) but a name cannot nest inside itself.
        """
        if not self._in_step:
            raise RuntimeError(f"phase {name!r} entered outside a step; call start_step() first")
        if name in self._open_phases:
            raise RuntimeError(f"phase {name!r} is already open")
        self._synchronize()
        if self.is_cuda:
            # Peaks reached so far belong to the step and the enclosing phases, not to this one.
            self._fold_cuda_peaks()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open_phases.append(name)
        start = self.clock()
        try:
            yield
        finally:
            self._synchronize()
            elapsed = self.clock() - start
            if self.is_cuda:
                self._fold_cuda_peaks()
            self._open_phases.remove(name)
            self._phase_s[name] = self._phase_s.get(name, 0.0) + elapsed

    def add_tokens(self, *, generated: int = 0, trained: int = 0, samples: int = 0) -> None:
        """Count work done this step.

        Args:
            generated: completion tokens sampled.
            trained: non-pad tokens (prompt + completion) through forward and backward, counted
                once per update pass (two PPO epochs over a batch count it twice).
            samples: sequences produced.
        """
        for field, value in (("generated", generated), ("trained", trained), ("samples", samples)):
            if value < 0:
                raise ValueError(f"add_tokens: {field} must be >= 0, got {value}")
        self._generated += int(generated)
        self._trained += int(trained)
        self._samples += int(samples)

    def end_step(self) -> dict[str, float]:
        """Finish the step and return its metrics (see the class docstring for omitted rates)."""
        if not self._in_step:
            raise RuntimeError("end_step() called without start_step()")
        step_s = self.clock() - self._step_start
        self._in_step = False
        self.total_s += step_s
        self.total_gen_tokens += self._generated
        self.total_train_tokens += self._trained
        self.total_samples += self._samples
        self.steps += 1

        out: dict[str, float] = {"time/step_s": step_s}
        for name, seconds in self._phase_s.items():
            out[f"time/{name}_s"] = seconds
        rollout_s = self._phase_s.get(ROLLOUT_PHASE, 0.0)
        update_s = self._phase_s.get(UPDATE_PHASE, 0.0)
        if rollout_s > 0:
            out["perf/gen_tokens_per_s"] = self._generated / rollout_s
        if update_s > 0:
            out["perf/train_tokens_per_s"] = self._trained / update_s
        if step_s > 0:
            out["perf/samples_per_s"] = self._samples / step_s
            if self.peak_flops is not None and self.n_params is not None:
                flops = 6 * self.n_params * self._trained + 2 * self.n_params * self._generated
                out["perf/mfu"] = flops / (step_s * self.peak_flops)

        if self.is_cuda:
            self._fold_cuda_peaks()
            out["mem/peak_alloc_gib"] = self._step_peak_alloc_gib
            out["mem/peak_reserved_gib"] = self._step_peak_reserved_gib
            for name, peak in self._phase_peak_gib.items():
                out[f"mem/{name}_peak_gib"] = peak
        else:
            rss = process_rss_gib()
            out["mem/rss_gib"] = rss
            out["mem/rss_peak_gib"] = peak_rss_gib()
            out["mem/rss_delta_gib"] = rss - self._rss_start_gib

        out["time/total_s"] = self.total_s
        out["perf/total_gen_tokens"] = float(self.total_gen_tokens)
        out["perf/total_train_tokens"] = float(self.total_train_tokens)
        return out

    def state_dict(self) -> dict[str, float | int]:
        """Cumulative counters, saved with a checkpoint so a resumed run continues them."""
        return {key: getattr(self, key) for key in self._STATE_KEYS}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        missing = [key for key in self._STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f"harness state is missing {missing}")
        self.total_s = float(state["total_s"])
        for key in self._STATE_KEYS[1:]:
            setattr(self, key, int(state[key]))


def model_footprint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """Static memory of a model and its optimizer.

    Returns bytes ``params_bytes``, ``grads_bytes``, ``optimizer_bytes`` and counts ``n_params``,
    ``n_trainable``. Shared (tied) parameters are counted once. ``grads_bytes`` covers trainable
    parameters only: the actual ``.grad`` where one exists, otherwise the size a gradient in the
    parameter's dtype will take, so the figure does not depend on whether backward has run.
    ``optimizer_bytes`` sums every tensor in ``optimizer.state`` (Adam: two moments per parameter
    plus a scalar step tensor each).
    """
    params_bytes = grads_bytes = n_params = n_trainable = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        params_bytes += size
        n_params += p.numel()
        if p.requires_grad:
            n_trainable += p.numel()
            grads_bytes += size if p.grad is None else p.grad.numel() * p.grad.element_size()
    optimizer_bytes = 0
    if optimizer is not None:
        for param_state in optimizer.state.values():
            for value in param_state.values():
                if torch.is_tensor(value):
                    optimizer_bytes += value.numel() * value.element_size()
    return {
        "params_bytes": params_bytes,
        "grads_bytes": grads_bytes,
        "optimizer_bytes": optimizer_bytes,
        "n_params": n_params,
        "n_trainable": n_trainable,
    }


def footprint_metrics(footprints: dict[str, dict[str, int]]) -> dict[str, float]:
    """Flatten ``{"policy": model_footprint(...), ...}`` into ``mem/static/<model>_<kind>_gib``.

    Only the ``*_bytes`` entries are reported (kinds ``params``, ``grads``, ``optimizer``), plus
    ``mem/static/total_gib``, their plain sum. NOTE: models that share tensors (a reference that is
    the policy with adapters disabled) are counted once per model, so the total can overstate.
    """
    out: dict[str, float] = {}
    total = 0
    for model_name, footprint in footprints.items():
        for key, value in footprint.items():
            if key.endswith("_bytes"):
                out[f"mem/static/{model_name}_{key.removesuffix('_bytes')}_gib"] = value / GIB
                total += value
    out["mem/static/total_gib"] = total / GIB
    return out


def _metrics_file(path: str | os.PathLike) -> Path:
    """A path ending in ``.jsonl`` is the file itself; anything else is the output directory."""
    path = Path(path)
    return path if path.suffix == ".jsonl" else path / "metrics.jsonl"


def _to_json(value: Any, key: str, nonfinite: dict[str, str]) -> Any:
    """Convert one metric value to plain JSON, recording NaN/inf (written as null) by key."""
    if hasattr(value, "tolist"):  # tensors and numpy values; a 0-d one gives a Python scalar
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        nonfinite[key] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{key}[{i}]", nonfinite) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _to_json(v, f"{key}.{k}", nonfinite) for k, v in value.items()}
    raise TypeError(f"metric {key!r} has unsupported type {type(value).__name__}")


class MetricsWriter:
    """Appends one JSON object per line to a metrics file, flushed after every line.

    Args:
        path: the ``.jsonl`` file, or an output directory (then ``<path>/metrics.jsonl``).
        accelerator: optional ``accelerate.Accelerator``; when it has trackers configured, each
            record's int/float/str values are also sent to ``accelerator.log(values, step=...)``.
        enabled: False makes every call a no-op and creates no file (use on non-main ranks).

    NaN and infinities are written as null, and the record gains a ``"nonfinite"`` entry mapping
    each such key to ``"nan"``, ``"inf"`` or ``"-inf"`` so the cause is not lost. The file is
    opened in append mode so a resumed run continues it (see ``truncate_after``).
    """

    def __init__(
        self, path: str | os.PathLike, *, accelerator: Any = None, enabled: bool = True
    ) -> None:
        self.path = _metrics_file(path)
        self.accelerator = accelerator
        self.enabled = enabled
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        nonfinite: dict[str, str] = {}
        row = {key: _to_json(value, key, nonfinite) for key, value in record.items()}
        if nonfinite:
            row["nonfinite"] = nonfinite
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            scalars = {
                key: value
                for key, value in row.items()
                if key != "step" and isinstance(value, int | float | str)
            }
            self.accelerator.log(scalars, step=row.get("step"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        """All records of a metrics file (or of ``samples.jsonl``, written the same way).

        One rule for bad lines: a last line that is not JSON is a record a killed (or still
        running) writer left half-written, and is skipped with a warning; a bad line anywhere
        else raises ValueError naming ``file:line``. Blank lines are ignored.
        """
        return [record for _, record in _parse_records(_metrics_file(path))[0]]

    @staticmethod
    def truncate_after(path: str | os.PathLike, step: int) -> int:
        """Drop records with ``step`` greater than ``step``; return how many were dropped.

        Used on resume so the file matches an uninterrupted run. Records without a ``"step"`` key
        are kept. A missing file is left missing. Bad lines follow :meth:`read`'s rule: a torn
        last line is dropped (and counted), a bad line elsewhere raises. The file is rewritten
        atomically.
        """
        file = _metrics_file(path)
        if not file.exists():
            return 0
        records, torn = _parse_records(file)
        kept = [line for line, r in records if r.get("step") is None or r["step"] <= step]
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, file)
        return len(records) - len(kept) + torn


def _parse_records(file: Path) -> tuple[list[tuple[str, dict[str, Any]]], int]:
    """((line, record) for every record of ``file``, 1 if a torn last line was skipped else 0),
    by :meth:`MetricsWriter.read`'s rule."""
    lines = file.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == last:
                logger.warning(
                    "%s:%d: incomplete last line (a killed writer?), skipped", file, lineno
                )
                return out, 1
            raise ValueError(f"{file}:{lineno}: not a JSON record ({e})") from e
        if not isinstance(record, dict):
            raise ValueError(f"{file}:{lineno}: not a JSON object")
        out.append((line, record))
    return out, 0


# Keys shown by format_step_line, in order: (label, record key, format).
_CONSOLE_FIELDS = (
    ("reward", "reward/mean", "{:.3f}"),
    ("acc", "reward/accuracy", "{:.3f}"),
    ("kl", "policy/kl_ref", "{:.4f}"),
)


def format_duration(seconds: float) -> str:
    """``seconds`` rounded to whole seconds as ``1h02m03s``, ``2m03s`` or ``3s``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_step_line(record: dict[str, Any]) -> str:
    """One short console line: step, reward, accuracy, KL, step time, then every ``loss/*``.

    Missing keys are skipped and null values shown as ``nan``, so any record can be printed.
    """

    def show(fmt: str, value: Any) -> str:
        return "nan" if value is None else fmt.format(float(value))

    parts = [f"step {record['step']}"] if "step" in record else []
    for label, key, fmt in _CONSOLE_FIELDS:
        if key in record:
            parts.append(f"{label} {show(fmt, record[key])}")
    if "time/step_s" in record:
        parts.append(f"{show('{:.2f}', record['time/step_s'])} s/step")
    losses = [
        f"{key.removeprefix('loss/')} {show('{:.4f}', value)}"
        for key, value in record.items()
        if key.startswith("loss/")
    ]
    if losses:
        parts.append("loss " + " ".join(losses))
    return " | ".join(parts)
