"""Sweeps: one recipe over objectives x grid points x seeds, compared in one report.

    grpo-lab sweep recipes/sweeps/grpo_vs_ppo_tiny.yaml [key=value ...] [--dry-run] [--report-only]

A sweep file names a base recipe, the *variants* to compare (each may switch recipe and add
overrides), an optional grid of dotted keys and the seeds. Every combination is one ordinary
training run, launched as its own subprocess (``python -m grpo_lab.train`` or, with ``launch``,
``accelerate launch --config_file LAUNCH -m grpo_lab.train``), one after another, into

    <output_dir>/<variant>[__<dotted.key>=<value>...]/seed<k>/

which holds the trainer's ``config.yaml``, ``metrics.jsonl`` and ``final/``, plus the sweep's
``train.log`` (the run's console output, appended per attempt) and a ``DONE`` or ``FAILED``
marker. Restarting a sweep skips finished runs (``DONE`` or ``final/``), reruns a started but
unfinished one with ``resume=auto`` and starts the others. Every run's config is loaded and
validated before the first one starts; a run that fails later does not stop the sweep, which then
exits non-zero listing the failures. At the end :func:`aggregate_sweep` writes ``report.md``,
``summary.csv`` and PNG plots into ``output_dir``.

Sweep file keys. Paths written in the file are relative to the file's folder; paths given on the
command line are relative to the current directory; ``output_dir`` is relative to the current
directory, like a recipe's.

    name             str; default: the file's stem
    output_dir       str; default ``runs/sweeps/<name>``
    base             the recipe every variant starts from (required)
    launch           null, or an accelerate config file to launch every run with
    seeds            non-empty list of distinct ints; default [0]
    overrides        {dotted.key: value} applied to every run; default {}
    variants         {name: {recipe: path, overrides: {...}}}, both optional; default {<base stem>: {}}
    grid             {dotted.key: [value, ...]}, cartesian product; default {}
    baseline         the variant every ratio is taken against; default the first variant
    target_accuracy  number in [0, 1] or null: report steps and wall-clock to reach it

A run's overrides are, in order (later wins): ``overrides``, the variant's ``overrides``, the grid
point, extra ``key=value`` arguments, then ``output_dir`` and ``seed`` (owned by the sweep).

Statistics conventions (the pure functions below):

- A confidence interval over seeds is mean +- t_{(1+c)/2, n-1} * s / sqrt(n), with s the sample
  standard deviation (ddof=1) and the Student t quantile computed exactly for integer degrees of
  freedom. One seed gives no interval (half-width NaN, drawn as no band, written as blank).
- A moving average is trailing: entry i is the mean of the last ``window`` values up to and
  including i (fewer at the start). Time to target only counts full windows.
- A ratio is the variant's mean divided by the baseline's mean at the same grid point.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import itertools
import json
import logging
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo_lab.plots import MISSING, Line, figure_class, line_plot

logger = logging.getLogger("grpo_lab")

SWEEP_KEYS = (
    "name",
    "output_dir",
    "base",
    "launch",
    "seeds",
    "overrides",
    "variants",
    "grid",
    "baseline",
    "target_accuracy",
)
# Sweep keys a `key=value` argument may change; the structured ones belong in the file.
CLI_SWEEP_KEYS = ("name", "output_dir", "base", "launch", "seeds", "baseline", "target_accuracy")
VARIANT_KEYS = ("recipe", "overrides")
# Recipe keys the sweep sets itself for every run.
RUN_OWNED_KEYS = ("seed", "output_dir", "resume")

TARGET_WINDOW = 10
FINAL_TRAIN_FRACTION = 0.1
CONFIDENCE = 0.95

MANIFEST = "manifest.json"
DONE = "DONE"
FAILED = "FAILED"
LOG = "train.log"

# Phases in the order a training step runs them; unknown phases follow, sorted.
PHASE_ORDER = ("rollout", "reward", "old_logprob", "ref", "values", "update")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.=+-]")


class SweepError(ValueError):
    """A sweep file, its overrides or a sweep folder is wrong; the message names the file and key."""


# ---------------------------------------------------------------------------------- statistics


def student_t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` >= 1 integer degrees of freedom.

    Closed form for integer df (Abramowitz & Stegun 26.7.3-4): with theta = atan(|t| / sqrt(df)),
    A = P(|T| <= |t|) is a finite series in cos(theta), and P(T <= t) = (1 +- A) / 2.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:
        series, term = 0.0, c
        if df > 1:
            series = term
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                series += term
        a = 2.0 / math.pi * (theta + s * series)
    else:
        series = term = 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        a = s * series
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The t with P(T <= t) = p for Student's t with integer ``df`` (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the two-sided t confidence interval of the mean.

    half-width = t_{(1+confidence)/2, n-1} * s / sqrt(n), s the sample std (ddof=1). With one value
    the half-width is NaN (no interval); an empty sequence is an error.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t_quantile(0.5 + 0.5 * confidence, n - 1) * s / math.sqrt(n)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: entry i is the mean of values[max(0, i - window + 1) : i + 1]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass(frozen=True)
class TargetHit:
    """Where a run first reached the target: its optimizer step and cumulative wall-clock."""

    step: int
    wall_s: float | None


def time_to_target(
    steps: Sequence[int],
    accuracy: Sequence[float],
    target: float,
    *,
    wall_s: Sequence[float | None] | None = None,
    window: int = TARGET_WINDOW,
) -> TargetHit | None:
    """First step whose trailing ``window``-step mean accuracy is >= ``target``, else None.

    ``steps``, ``accuracy`` and ``wall_s`` are aligned (one entry per logged training step, in
    order). Only full windows count, so a lucky first step cannot reach the target alone.
    """
    if not len(steps) == len(accuracy) == (len(wall_s) if wall_s is not None else len(steps)):
        raise ValueError("steps, accuracy and wall_s must have the same length")
    averaged = moving_average(accuracy, window)
    for i in range(window - 1, len(averaged)):
        if averaged[i] >= target:
            return TargetHit(int(steps[i]), None if wall_s is None else wall_s[i])
    return None


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline; None when either is missing or NaN, or the baseline is 0."""
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return None
    if baseline == 0:
        return None
    return value / baseline


# ---------------------------------------------------------------------------------- sweep file


@dataclass(frozen=True)
class Variant:
    """One objective of the comparison: a recipe plus overrides ({dotted.key: value})."""

    name: str
    recipe: Path
    overrides: dict[str, Any]


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep file. Paths are absolute except ``output_dir`` (as written)."""

    path: Path
    name: str
    output_dir: Path
    base: Path
    launch: Path | None
    seeds: tuple[int, ...]
    overrides: dict[str, Any]
    variants: dict[str, Variant]
    grid: dict[str, list[Any]]
    baseline: str
    target_accuracy: float | None
    extra_overrides: tuple[str, ...] = ()  # raw `key=value` arguments for every run

    def to_dict(self) -> dict[str, Any]:
        """The resolved sweep, as plain data (paths shown relative to the current directory)."""
        return {
            "name": self.name,
            "output_dir": str(self.output_dir),
            "base": _display(self.base),
            "launch": None if self.launch is None else _display(self.launch),
            "seeds": list(self.seeds),
            "overrides": dict(self.overrides),
            "variants": {
                v.name: {"recipe": _display(v.recipe), "overrides": dict(v.overrides)}
                for v in self.variants.values()
            },
            "grid": {k: list(v) for k, v in self.grid.items()},
            "baseline": self.baseline,
            "target_accuracy": self.target_accuracy,
            "extra_overrides": list(self.extra_overrides),
        }


def load_sweep(path: str | os.PathLike, overrides: Iterable[str] = ()) -> SweepSpec:
    """Read and validate a sweep file, then apply command-line ``key=value`` overrides.

    A key among ``CLI_SWEEP_KEYS`` changes the sweep itself (its value is parsed as YAML, so
    ``seeds=[0,1]`` works); any other dotted key is passed to every run after the file's own
    overrides. Raises :class:`SweepError` naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of sweep keys, got {type(raw).__name__}")
    raw = dict(raw)
    _check_keys(path, "", raw, SWEEP_KEYS)

    extra: list[str] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SweepError(f"{path}: override {item!r}: expected key=value")
        if key in CLI_SWEEP_KEYS:
            try:
                value = yaml.safe_load(text) if text else None
            except yaml.YAMLError as e:
                raise SweepError(f"{path}: override {key}: not valid YAML: {e}") from e
            if key in ("base", "launch") and isinstance(value, str):
                value = str(Path(value).expanduser().absolute())
            raw[key] = value
        elif key in ("variants", "grid", "overrides"):
            raise SweepError(f"{path}: override {key}: edit `{key}` in the sweep file instead")
        elif key in RUN_OWNED_KEYS:
            raise SweepError(f"{path}: override {key}: {_owned_hint(key)}")
        else:
            extra.append(item)
    return _validate(path, raw, tuple(extra))


def _validate(path: Path, raw: dict[str, Any], extra: tuple[str, ...]) -> SweepSpec:
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SweepError(f"{path}: name: expected letters, digits, '_', '.', '-', got {name!r}")
    output_dir = raw.get("output_dir") or f"runs/sweeps/{name}"
    if not isinstance(output_dir, str):
        raise SweepError(f"{path}: output_dir: expected a path, got {output_dir!r}")
    if "base" not in raw or raw["base"] is None:
        raise SweepError(f"{path}: base: missing; name the recipe every variant starts from")
    base = _resolve_file(path, "base", raw["base"])
    launch = raw.get("launch")
    launch = None if launch is None else _resolve_file(path, "launch", launch)
    seeds = _validate_seeds(path, raw.get("seeds", [0]))
    common = _validate_overrides(path, "overrides", raw.get("overrides"))

    raw_variants = raw.get("variants")
    if raw_variants is None:
        raw_variants = {base.stem: {}}
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise SweepError(f"{path}: variants: expected a non-empty mapping of name -> settings")
    variants: dict[str, Variant] = {}
    for vname, body in raw_variants.items():
        where = f"variants.{vname}"
        if not isinstance(vname, str) or not _NAME_RE.match(vname) or "__" in vname:
            raise SweepError(
                f"{path}: {where}: a variant name is a folder name: letters, digits, "
                "'_', '.', '-' (no '__'), starting with a letter or digit"
            )
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise SweepError(f"{path}: {where}: expected a mapping with recipe / overrides")
        _check_keys(path, f"{where}.", body, VARIANT_KEYS)
        recipe = body.get("recipe")
        recipe = base if recipe is None else _resolve_file(path, f"{where}.recipe", recipe)
        variants[vname] = Variant(
            vname, recipe, _validate_overrides(path, f"{where}.overrides", body.get("overrides"))
        )

    raw_grid = raw.get("grid") or {}
    if not isinstance(raw_grid, dict):
        raise SweepError(f"{path}: grid: expected a mapping of dotted.key -> list of values")
    grid: dict[str, list[Any]] = {}
    for key, values in raw_grid.items():
        _check_dotted_key(path, f"grid.{key}", key)
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key}: expected a non-empty list of values")
        if any(isinstance(v, dict | list) for v in values):
            raise SweepError(f"{path}: grid.{key}: values must be scalars")
        folders = [_safe(_format_value(v)) for v in values]
        if len(set(folders)) != len(folders):
            raise SweepError(f"{path}: grid.{key}: values repeat (or map to the same folder name)")
        grid[key] = list(values)

    for item in extra:
        key = item.partition("=")[0]
        if key in grid:
            raise SweepError(f"{path}: override {key}: the grid sweeps it; edit grid.{key} instead")

    baseline = raw.get("baseline", next(iter(variants)))
    if baseline not in variants:
        raise SweepError(
            f"{path}: baseline: unknown variant {baseline!r}; variants: {', '.join(variants)}"
        )
    target = raw.get("target_accuracy")
    if target is not None:
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 <= target <= 1:
            raise SweepError(f"{path}: target_accuracy: expected a number in [0, 1] or null")
        target = float(target)
    return SweepSpec(
        path=path,
        name=name,
        output_dir=Path(output_dir),
        base=base,
        launch=launch,
        seeds=seeds,
        overrides=common,
        variants=variants,
        grid=grid,
        baseline=baseline,
        target_accuracy=target,
        extra_overrides=extra,
    )


def _check_keys(path: Path, prefix: str, mapping: dict, allowed: Sequence[str]) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(
                f"{path}: unknown key {prefix}{key}{hint}; allowed: {', '.join(allowed)}"
            )


def _owned_hint(key: str) -> str:
    return {
        "seed": "the sweep sets each run's seed; list them in `seeds`",
        "output_dir": "the sweep sets each run's folder under its own `output_dir`",
        "resume": "the sweep passes resume=auto to runs it restarts",
    }[key]


def _check_dotted_key(path: Path, where: str, key: Any) -> None:
    if not isinstance(key, str) or not key or "=" in key or key.startswith("."):
        raise SweepError(f"{path}: {where}: expected a dotted recipe key such as trainer.lr")
    if key in RUN_OWNED_KEYS:
        raise SweepError(f"{path}: {where}: {_owned_hint(key)}")


def _validate_overrides(path: Path, where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{path}: {where}: expected a mapping of dotted.key -> value")
    for key, v in value.items():
        _check_dotted_key(path, f"{where}.{key}", key)
        if isinstance(v, dict):
            raise SweepError(
                f"{path}: {where}.{key}: a mapping; write one dotted key per value, "
                f"e.g. {key}.some_field: 1"
            )
    return dict(value)


def _validate_seeds(path: Path, seeds: Any) -> tuple[int, ...]:
    ok = isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)
    if not ok or any(isinstance(s, bool) for s in seeds):
        raise SweepError(f"{path}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds: values repeat: {seeds}")
    return tuple(seeds)


def _resolve_file(path: Path, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise SweepError(f"{path}: {key}: expected a file path, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = path.parent / p
    if not p.is_file():
        raise SweepError(
            f"{path}: {key}: file {value!r} not found (looked for {p}; paths in a sweep file "
            "are relative to its folder)"
        )
    return p.resolve()


def _display(p: Path) -> str:
    """A path relative to the current directory when it lies under it, else absolute."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(p).resolve())


def _format_value(value: Any) -> str:
    """A YAML scalar/list as a `key=value` argument the trainer parses back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        # NOTE: YAML 1.1 (PyYAML) reads "1e-06" as a string; "1.0e-06" is a float.
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def _safe(text: str) -> str:
    """A folder-name-safe form of an override value."""
    return _UNSAFE_RE.sub("_", text) or "_"


# ---------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunPlan:
    """One run of a sweep: what it trains, where, and how it is launched."""

    variant: str
    grid: tuple[tuple[str, Any], ...]
    seed: int
    group: str  # folder of all seeds of this variant x grid point
    dir: Path
    recipe: Path
    overrides: tuple[str, ...]  # `key=value` arguments, output_dir and seed included
    launch: Path | None

    @property
    def label(self) -> str:
        return f"{self.group}/seed{self.seed}"

    def command(self, *, resume: bool = False) -> list[str]:
        """The subprocess argv; ``resume`` adds ``resume=auto``."""
        args = [_display(self.recipe), *self.overrides, *(["resume=auto"] if resume else [])]
        if self.launch is None:
            return [sys.executable, "-m", "grpo_lab.train", *args]
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            _display(self.launch),
            "-m",
            "grpo_lab.train",
            *args,
        ]

    def is_finished(self) -> bool:
        return is_finished(self.dir)

    def has_started(self) -> bool:
        """The trainer got far enough to write into the folder (so a rerun should resume)."""
        return (self.dir / "config.yaml").exists() or (self.dir / "metrics.jsonl").exists()


def is_finished(run_dir: Path) -> bool:
    """A run is finished when the trainer saved ``final/`` or the sweep wrote ``DONE``."""
    return (run_dir / "final").is_dir() or (run_dir / DONE).exists()


def plan_runs(spec: SweepSpec) -> list[RunPlan]:
    """Every run of the sweep, seed-major: all variants x grid points of seed 0, then seed 1, ...

    Seed-major so that a sweep stopped early still has complete comparisons for its first seeds.
    """
    keys = list(spec.grid)
    points = list(itertools.product(*(spec.grid[k] for k in keys)))
    runs: list[RunPlan] = []
    seen: dict[Path, str] = {}
    for seed in spec.seeds:
        for variant in spec.variants.values():
            for point in points:
                grid = tuple(zip(keys, point))
                group = "__".join(
                    [variant.name, *(f"{k}={_safe(_format_value(v))}" for k, v in grid)]
                )
                run_dir = spec.output_dir / group / f"seed{seed}"
                overrides = (
                    *(f"{k}={_format_value(v)}" for k, v in spec.overrides.items()),
                    *(f"{k}={_format_value(v)}" for k, v in variant.overrides.items()),
                    *(f"{k}={_format_value(v)}" for k, v in grid),
                    *spec.extra_overrides,
                    f"output_dir={run_dir}",
                    f"seed={seed}",
                )
                if run_dir in seen:
                    raise SweepError(
                        f"{spec.path}: runs {seen[run_dir]} and {group} share {run_dir}"
                    )
                seen[run_dir] = group
                runs.append(
                    RunPlan(
                        variant.name,
                        grid,
                        seed,
                        group,
                        run_dir,
                        variant.recipe,
                        overrides,
                        spec.launch,
                    )
                )
    return runs


def check_runs(spec: SweepSpec, runs: Sequence[RunPlan]) -> None:
    """Load every run's config (recipe + overrides) so a typo fails now, not once per run.

    Raises :class:`SweepError` listing each run whose config does not load or validate.
    """
    from grpo_lab.config import ConfigError, load_config

    problems = []
    for run in runs:
        try:
            load_config(run.recipe, run.overrides)
        except ConfigError as e:
            problems.append(f"  {run.label}: {e}")
    if problems:
        raise SweepError(
            f"{spec.path}: {len(problems)} run(s) have an invalid config:\n" + "\n".join(problems)
        )


def run_command(cmd: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None) -> int:
    """Run ``cmd``, streaming its stdout+stderr to this console and appending it to ``log_path``.

    Returns the exit code. Interrupting (Ctrl-C) kills the child and re-raises.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"=== {stamp} $ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            while chunk := proc.stdout.read1(1 << 16):
                log.write(chunk)
                log.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            sys.stdout.write(decoder.decode(b"", final=True))
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


@dataclass
class SweepResult:
    """What :func:`run_sweep` did. ``exit_code`` is 1 when any run failed, else 0."""

    spec: SweepSpec
    runs: list[RunPlan]
    ran: list[RunPlan] = field(default_factory=list)
    skipped: list[RunPlan] = field(default_factory=list)
    failed: list[tuple[RunPlan, int]] = field(default_factory=list)  # (run, exit code)
    summary: SweepSummary | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def run_sweep(
    path: str | os.PathLike,
    *,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    report_only: bool = False,
) -> SweepResult:
    """Run every unfinished run of a sweep file, one after another, then write the report.

    ``overrides`` are ``key=value`` arguments (see :func:`load_sweep`). ``dry_run`` prints each
    run's command (and whether it would be skipped or resumed) and runs nothing. ``report_only``
    only aggregates what ``output_dir`` already holds. A failed run is recorded (``FAILED``, its
    log in ``train.log``) and the sweep goes on; the result lists the failures.
    """
    spec = load_sweep(path, overrides)
    runs = plan_runs(spec)
    result = SweepResult(spec, runs)
    if report_only:
        result.summary = aggregate_sweep(
            spec.output_dir, baseline=spec.baseline, target_accuracy=spec.target_accuracy
        )
        _say(f"report: {result.summary.report_path}")
        return result
    check_runs(spec, runs)
    if dry_run:
        for i, run in enumerate(runs, 1):
            state = (
                "finished, would be skipped"
                if run.is_finished()
                else "would resume"
                if run.has_started()
                else "would start"
            )
            _say(f"[{i}/{len(runs)}] {run.label} ({state})")
            print(shlex.join(run.command(resume=run.has_started())), flush=True)
        return result

    spec.output_dir.mkdir(parents=True, exist_ok=True)
    _write_manifest(spec, runs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    durations: list[float] = []
    todo = sum(not run.is_finished() for run in runs)
    for i, run in enumerate(runs, 1):
        tag = f"[{i}/{len(runs)}] {run.label}"
        if run.is_finished():
            _say(f"{tag}: finished earlier, skipped")
            result.skipped.append(run)
            continue
        resume = run.has_started()
        cmd = run.command(resume=resume)
        eta = ""
        if durations:
            left = todo - len(durations)
            eta = f", about {_hms(left * statistics.fmean(durations))} left"
        _say(
            f"{tag}: {'resuming' if resume else 'starting'} "
            f"(elapsed {_hms(time.monotonic() - start)}{eta})\n  $ {shlex.join(cmd)}"
        )
        run.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        code = run_command(cmd, run.dir / LOG, env=env)
        seconds = time.monotonic() - t0
        durations.append(seconds)
        marker = {
            "command": cmd,
            "exit_code": code,
            "seconds": round(seconds, 3),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if code == 0:
            (run.dir / FAILED).unlink(missing_ok=True)
            (run.dir / DONE).write_text(json.dumps(marker, indent=1) + "\n")
            result.ran.append(run)
            _say(f"{tag}: done in {_hms(seconds)}")
        else:
            (run.dir / FAILED).write_text(json.dumps(marker, indent=1) + "\n")
            result.failed.append((run, code))
            _say(f"{tag}: FAILED (exit {code}) after {_hms(seconds)}; log: {run.dir / LOG}")

    _say(
        f"{len(result.ran)} ran, {len(result.skipped)} skipped, {len(result.failed)} failed "
        f"in {_hms(time.monotonic() - start)}"
    )
    if any(run.is_finished() for run in runs):
        result.summary = aggregate_sweep(
            spec.output_dir, baseline=spec.baseline, target_accuracy=spec.target_accuracy
        )
        _say(f"report: {result.summary.report_path}")
    if result.failed:
        lines = [f"  {run.label}: exit {code}, log {run.dir / LOG}" for run, code in result.failed]
        _say(f"{len(result.failed)} of {len(runs)} runs failed:\n" + "\n".join(lines))
    return result


def _write_manifest(spec: SweepSpec, runs: list[RunPlan]) -> None:
    manifest = {
        "sweep_file": _display(spec.path),
        "sweep_text": spec.path.read_text(encoding="utf-8"),
        "cwd": str(Path.cwd()),
        "spec": spec.to_dict(),
        "runs": [
            {
                "group": run.group,
                "variant": run.variant,
                "grid": {k: v for k, v in run.grid},
                "seed": run.seed,
                "dir": str(run.dir),
                "command": run.command(),
            }
            for run in runs
        ],
    }
    text = json.dumps(manifest, indent=1, default=str)
    (spec.output_dir / MANIFEST).write_text(text + "\n", encoding="utf-8")


def _say(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ---------------------------------------------------------------------------------- metrics


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a metrics.jsonl, each sorted by step, one per step.

    An evaluation row has ``eval/*`` keys and no ``reward/*`` key; every other row with a
    ``step`` is a training row. When a step appears twice (a resumed run rewrites the steps after
    its checkpoint) the row written last wins. A line that is not JSON (a torn last write) is
    skipped with a warning.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    path = Path(path)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: not a JSON line, skipped", path, lineno)
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, bool) or not isinstance(step, int | float):
            continue
        is_eval = any(k.startswith("eval/") for k in row) and not any(
            k.startswith("reward/") for k in row
        )
        (evals if is_eval else train)[int(step)] = row
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _num(row: dict, key: str) -> float | None:
    """A finite number at ``key``, else None (absent, null, NaN, not a number)."""
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _phase_names(keys: Iterable[str], prefix: str, suffix: str, exclude: set[str]) -> list[str]:
    names = {
        k[len(prefix) : -len(suffix)]
        for k in keys
        if k.startswith(prefix) and k.endswith(suffix) and "/" not in k[len(prefix) : -len(suffix)]
    } - exclude
    return _phase_sorted(names)


def _phase_sorted(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [p for p in PHASE_ORDER if p in names]
    return known + sorted(names - set(PHASE_ORDER))


@dataclass
class RunStats:
    """What one run contributes to the report (None: the run did not log it)."""

    group: str
    variant: str
    grid: dict[str, Any]
    seed: int
    dir: Path
    status: str  # finished | failed | partial | not started
    steps: int = 0
    total_s: float | None = None
    peak_mem_gib: float | None = None
    peak_mem_kind: str | None = None  # "cuda" (peak allocated) or "cpu" (peak RSS)
    peak_reserved_gib: float | None = None
    median_step_s: float | None = None
    final_acc: float | None = None
    final_acc_source: str | None = None  # "eval" or "train"
    target: TargetHit | None = None
    phase_s: dict[str, float] = field(default_factory=dict)  # mean seconds per step
    other_s: float | None = None  # step time outside every phase
    phase_peak_gib: dict[str, float] = field(default_factory=dict)
    static_gib: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # perf/* means
    curve_metric: str | None = None
    curve_steps: list[int] = field(default_factory=list)
    curve_values: list[float] = field(default_factory=list)  # moving average, TARGET_WINDOW
    curve_wall_s: list[float | None] = field(default_factory=list)


def summarise_run(
    run_dir: Path,
    *,
    group: str,
    variant: str,
    grid: dict[str, Any],
    seed: int,
    target_accuracy: float | None,
) -> RunStats:
    """Read one run folder into :class:`RunStats` (see the report for each definition)."""
    status = (
        "finished"
        if is_finished(run_dir)
        else "failed"
        if (run_dir / FAILED).exists()
        else "partial"
        if (run_dir / "metrics.jsonl").exists()
        else "not started"
    )
    stats = RunStats(group, variant, grid, seed, run_dir, status)
    if not (run_dir / "metrics.jsonl").exists():
        return stats
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    keys = {k for row in train for k in row}
    if train:
        stats.steps = int(train[-1]["step"])
        totals = [t for row in train if (t := _num(row, "time/total_s")) is not None]
        stats.total_s = totals[-1] if totals else None

    alloc = [v for row in train if (v := _num(row, "mem/peak_alloc_gib")) is not None]
    rss = [v for row in train if (v := _num(row, "mem/rss_peak_gib")) is not None]
    if alloc:
        stats.peak_mem_gib, stats.peak_mem_kind = max(alloc), "cuda"
    elif rss:
        stats.peak_mem_gib, stats.peak_mem_kind = max(rss), "cpu"
    reserved = [v for row in train if (v := _num(row, "mem/peak_reserved_gib")) is not None]
    stats.peak_reserved_gib = max(reserved) if reserved else None
    for phase in _phase_names(keys, "mem/", "_peak_gib", {"rss"}):
        peaks = [v for row in train if (v := _num(row, f"mem/{phase}_peak_gib")) is not None]
        stats.phase_peak_gib[phase] = max(peaks)
    for key in sorted(k for k in keys if k.startswith("mem/static/")):
        values = [v for row in train if (v := _num(row, key)) is not None]
        if values:
            stats.static_gib[key.removeprefix("mem/static/").removesuffix("_gib")] = values[-1]

    step_times = [v for row in train if (v := _num(row, "time/step_s")) is not None]
    stats.median_step_s = statistics.median(step_times) if step_times else None
    timed = [row for row in train if _num(row, "time/step_s") is not None]
    # A phase that did not run in a step counts as 0 s there, so phases add up to the step.
    for phase in _phase_names(keys, "time/", "_s", {"step", "total"}):
        stats.phase_s[phase] = statistics.fmean(_num(r, f"time/{phase}_s") or 0.0 for r in timed)
    if timed:
        stats.other_s = max(0.0, statistics.fmean(step_times) - sum(stats.phase_s.values()))
    for key in ("gen_tokens_per_s", "train_tokens_per_s", "samples_per_s", "mfu"):
        values = [v for row in train if (v := _num(row, f"perf/{key}")) is not None]
        if values:
            stats.rates[key] = statistics.fmean(values)

    acc_rows = [row for row in train if _num(row, "reward/accuracy") is not None]
    accuracy = [_num(row, "reward/accuracy") for row in acc_rows]
    final_eval = [row for row in evals if _num(row, "eval/greedy_acc") is not None]
    # The last eval counts only when it is the end-of-run evaluation, not the one at step 0.
    if final_eval and (not train or final_eval[-1]["step"] >= stats.steps):
        stats.final_acc, stats.final_acc_source = _num(final_eval[-1], "eval/greedy_acc"), "eval"
    elif accuracy:
        tail = max(1, math.ceil(FINAL_TRAIN_FRACTION * len(accuracy)))
        stats.final_acc, stats.final_acc_source = statistics.fmean(accuracy[-tail:]), "train"
    if accuracy and target_accuracy is not None:
        stats.target = time_to_target(
            [int(row["step"]) for row in acc_rows],
            accuracy,
            target_accuracy,
            wall_s=[_num(row, "time/total_s") for row in acc_rows],
        )

    metric = "reward/accuracy" if accuracy else "reward/mean" if "reward/mean" in keys else None
    if metric is not None:
        rows = [row for row in train if _num(row, metric) is not None]
        stats.curve_metric = metric
        stats.curve_steps = [int(row["step"]) for row in rows]
        stats.curve_values = moving_average([_num(row, metric) for row in rows], TARGET_WINDOW)
        stats.curve_wall_s = [_num(row, "time/total_s") for row in rows]
    return stats


# ---------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds with its confidence half-width (NaN for one seed) and the seed count."""

    mean: float
    half_width: float
    n: int


def estimate(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Estimate | None:
    """:func:`mean_ci` of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean, half = mean_ci(present, confidence)
    return Estimate(mean, half, len(present))


@dataclass
class GroupSummary:
    """One variant at one grid point, over its finished seeds."""

    group: str
    variant: str
    grid: dict[str, Any]
    runs: list[RunStats]
    # peak_mem_gib, step_time_s, final_acc, target_steps, target_wall_s, gen_tokens_per_s,
    # train_tokens_per_s, samples_per_s, mfu
    metrics: dict[str, Estimate | None]
    ratios: dict[str, float | None]  # same keys: mean / the baseline group's mean
    peak_mem_kind: str | None
    final_acc_source: str | None  # "eval", "train", "mixed" or None
    target_reached: int
    phase_s: dict[str, Estimate]
    other_s: Estimate | None
    phase_peak_gib: dict[str, Estimate]
    peak_reserved_gib: Estimate | None
    static_gib: dict[str, Estimate]

    @property
    def n_seeds(self) -> int:
        return len(self.runs)


@dataclass
class SweepSummary:
    """The aggregate of a sweep folder and the files written from it."""

    output_dir: Path
    name: str
    baseline: str
    target_accuracy: float | None
    groups: list[GroupSummary]
    runs: list[RunStats]  # every planned or found run, finished or not
    report_path: Path
    csv_path: Path
    plots: list[Path]
    manifest: dict | None


def aggregate_sweep(
    output_dir: str | os.PathLike,
    *,
    baseline: str | None = None,
    target_accuracy: float | None = None,
) -> SweepSummary:
    """Read every run under ``output_dir``; write ``report.md``, ``summary.csv`` and PNG plots.

    Runs come from ``manifest.json`` (written by :func:`run_sweep`) when present, else from the
    folders ``<group>/seed<k>/metrics.jsonl``. Only finished runs enter the statistics; the others
    are listed in the report. ``baseline`` and ``target_accuracy`` default to the manifest's,
    else the first variant and no target.
    """
    out = Path(output_dir)
    manifest = None
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        entries = [
            (
                r["group"],
                r["variant"],
                r["grid"],
                int(r["seed"]),
                out / r["group"] / f"seed{r['seed']}",
            )
            for r in manifest["runs"]
        ]
        spec = manifest.get("spec", {})
        baseline = baseline or spec.get("baseline")
        if target_accuracy is None:
            target_accuracy = spec.get("target_accuracy")
        name = spec.get("name", out.name)
    else:
        entries = _discover_runs(out)
        name = out.name
    if not entries:
        raise SweepError(
            f"{out}: no runs found (expected {MANIFEST} or <variant>/seed<k>/metrics.jsonl)"
        )

    runs = [
        summarise_run(d, group=g, variant=v, grid=grid, seed=s, target_accuracy=target_accuracy)
        for g, v, grid, s, d in entries
    ]
    order = list(dict.fromkeys(r.group for r in runs))
    variants = list(dict.fromkeys(r.variant for r in runs))
    if baseline is None:
        baseline = variants[0]
    if baseline not in variants:
        raise SweepError(
            f"{out}: baseline: unknown variant {baseline!r}; variants: {', '.join(variants)}"
        )
    groups = [
        _summarise_group(
            [r for r in runs if r.group == g and r.status == "finished"],
            [r for r in runs if r.group == g][0],
        )
        for g in order
    ]
    groups = [g for g in groups if g.runs]
    if not groups:
        raise SweepError(f"{out}: no finished runs yet ({len(runs)} found)")
    _add_ratios(groups, baseline)

    csv_path = out / "summary.csv"
    _write_csv(csv_path, groups)
    plots, plot_note = _write_plots(out, groups, target_accuracy)
    summary = SweepSummary(
        output_dir=out,
        name=name,
        baseline=baseline,
        target_accuracy=target_accuracy,
        groups=groups,
        runs=runs,
        report_path=out / "report.md",
        csv_path=csv_path,
        plots=plots,
        manifest=manifest,
    )
    summary.report_path.write_text(_report(summary, plot_note), encoding="utf-8")
    return summary


def _discover_runs(out: Path) -> list[tuple[str, str, dict, int, Path]]:
    entries = []
    for metrics in sorted(out.glob("*/seed*/metrics.jsonl")):
        run_dir = metrics.parent
        m = re.fullmatch(r"seed(-?\d+)", run_dir.name)
        if m is None:
            continue
        group = run_dir.parent.name
        variant, *parts = group.split("__")
        grid = dict(p.partition("=")[::2] for p in parts)
        entries.append((group, variant, grid, int(m.group(1)), run_dir))
    entries.sort(key=lambda e: (e[0], e[3]))
    return entries


def _summarise_group(runs: list[RunStats], first: RunStats) -> GroupSummary:
    est = estimate

    reached = [r.target for r in runs if r.target is not None]
    metrics = {
        "peak_mem_gib": est(r.peak_mem_gib for r in runs),
        "step_time_s": est(r.median_step_s for r in runs),
        "final_acc": est(r.final_acc for r in runs),
        "target_steps": est(float(t.step) for t in reached),
        "target_wall_s": est(t.wall_s for t in reached),
        **{
            f"{k}": est(r.rates.get(k) for r in runs)
            for k in ("gen_tokens_per_s", "train_tokens_per_s", "samples_per_s", "mfu")
        },
    }
    kinds = {r.peak_mem_kind for r in runs} - {None}
    sources = {r.final_acc_source for r in runs} - {None}
    phases = _phase_sorted(p for r in runs for p in r.phase_s)
    peak_phases = _phase_sorted(p for r in runs for p in r.phase_peak_gib)
    static = sorted({k for r in runs for k in r.static_gib})
    return GroupSummary(
        group=first.group,
        variant=first.variant,
        grid=first.grid,
        runs=runs,
        metrics=metrics,
        ratios={},
        peak_mem_kind=kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None),
        final_acc_source=sources.pop() if len(sources) == 1 else ("mixed" if sources else None),
        target_reached=len(reached),
        phase_s={p: est(r.phase_s.get(p, 0.0) for r in runs) for p in phases},
        other_s=est(r.other_s for r in runs),
        phase_peak_gib={p: est(r.phase_peak_gib.get(p) for r in runs) for p in peak_phases},
        peak_reserved_gib=est(r.peak_reserved_gib for r in runs),
        static_gib={k: est(r.static_gib.get(k) for r in runs) for k in static},
    )


def _add_ratios(groups: list[GroupSummary], baseline: str) -> None:
    """Each group's means over the baseline variant's at the same grid point."""
    base = {
        json.dumps(g.grid, sort_keys=True, default=str): g for g in groups if g.variant == baseline
    }
    for g in groups:
        ref = base.get(json.dumps(g.grid, sort_keys=True, default=str))
        for key, e in g.metrics.items():
            r = ref.metrics.get(key) if ref is not None else None
            g.ratios[key] = ratio(e.mean if e else None, r.mean if r else None)


def _write_csv(path: Path, groups: list[GroupSummary]) -> None:
    """One row per group: mean, CI half-width and ratio to baseline of every metric."""
    phases = _phase_sorted(p for g in groups for p in g.phase_s)
    peaks = _phase_sorted(p for g in groups for p in g.phase_peak_gib)
    header = [
        "group",
        "variant",
        "grid",
        "n_seeds",
        "peak_mem_source",
        "final_acc_source",
        "target_reached",
    ]
    for key in groups[0].metrics:
        header += [f"{key}_mean", f"{key}_ci95", f"{key}_ratio"]
    header += [f"time_{p}_s_mean" for p in phases] + ["time_other_s_mean"]
    header += [f"mem_{p}_peak_gib_mean" for p in peaks] + ["mem_peak_reserved_gib_mean"]

    def cell(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g in groups:
            row = [
                g.group,
                g.variant,
                json.dumps(g.grid, default=str) if g.grid else "",
                g.n_seeds,
                g.peak_mem_kind or "",
                g.final_acc_source or "",
                g.target_reached,
            ]
            for key, e in g.metrics.items():
                row += [cell(e and e.mean), cell(e and e.half_width), cell(g.ratios.get(key))]
            row += [cell(g.phase_s[p].mean if p in g.phase_s else None) for p in phases]
            row += [cell(g.other_s and g.other_s.mean)]
            row += [
                cell(g.phase_peak_gib[p].mean if g.phase_peak_gib.get(p) else None) for p in peaks
            ]
            row += [cell(g.peak_reserved_gib and g.peak_reserved_gib.mean)]
            writer.writerow(row)


# ---------------------------------------------------------------------------------- plots


def _write_plots(
    out: Path, groups: list[GroupSummary], target: float | None
) -> tuple[list[Path], str | None]:
    """PNG plots next to the report; (files, a note when plotting was not possible)."""
    Figure = figure_class()
    if Figure is None:
        return [], f"Plots skipped: {MISSING}."
    colors = {g.group: f"C{i % 10}" for i, g in enumerate(groups)}
    plots = []
    for x in ("step", "wallclock"):
        path = out / f"reward_vs_{x}.png"
        if _plot_curves(Figure, path, groups, colors, x, target):
            plots.append(path)
    for fn, name in (
        (_plot_memory, "memory_per_phase.png"),
        (_plot_step_time, "step_time.png"),
        (_plot_tokens, "tokens_per_s.png"),
    ):
        if fn(Figure, out / name, groups, colors):
            plots.append(out / name)
    return plots, None


def _mean_curve(runs: list[RunStats]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Seeds aligned by step: (steps, mean wall-clock, mean value, CI half-width) per step."""
    by_step: dict[int, list[tuple[float, float | None]]] = {}
    for r in runs:
        for s, v, w in zip(r.curve_steps, r.curve_values, r.curve_wall_s):
            by_step.setdefault(s, []).append((v, w))
    steps, walls, means, halves = [], [], [], []
    for s in sorted(by_step):
        values = [v for v, _ in by_step[s]]
        wall = [w for _, w in by_step[s] if w is not None]
        mean, half = mean_ci(values)
        steps.append(s)
        walls.append(statistics.fmean(wall) if wall else math.nan)
        means.append(mean)
        halves.append(half)
    return steps, walls, means, halves


def _plot_curves(Figure, path, groups, colors, x: str, target: float | None) -> bool:
    metrics = {r.curve_metric for g in groups for r in g.runs} - {None}
    if not metrics:
        return False
    metric = "reward/accuracy" if "reward/accuracy" in metrics else metrics.pop()
    lines = []
    for g in groups:
        steps, walls, means, halves = _mean_curve([r for r in g.runs if r.curve_metric == metric])
        xs = steps if x == "step" else walls
        lines.append(Line(f"{g.group} (n={g.n_seeds})", xs, means, halves, color=colors[g.group]))
    show_target = target is not None and metric == "reward/accuracy"
    line_plot(
        Figure,
        path,
        lines,
        xlabel="optimizer step" if x == "step" else "wall-clock (s, cumulative step time)",
        ylabel=f"{metric} ({TARGET_WINDOW}-step moving avg)",
        title=f"{metric} vs {'step' if x == 'step' else 'wall-clock'}: mean ± 95% CI over seeds",
        hline=target if show_target else None,
        hline_label=f"target {target:g}" if show_target else None,
    )
    return True


def _grouped_bars(ax, categories, groups, colors, value_of) -> None:
    """One cluster per category, one bar per group (mean), CI whiskers where defined."""
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        xs, heights, errs = [], [], []
        for j, cat in enumerate(categories):
            e = value_of(g, cat)
            if e is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(e.mean)
            errs.append(0.0 if math.isnan(e.half_width) else e.half_width)
        ax.bar(xs, heights, width, yerr=errs, capsize=3, color=colors[g.group], label=g.group)
    ax.set_xticks(range(len(categories)), categories)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_memory(Figure, path, groups, colors) -> bool:
    phases = _phase_sorted(p for g in groups for p in g.phase_peak_gib)
    if phases:

        def value_of(g, p):
            return g.phase_peak_gib.get(p)

        label = "CUDA peak allocated per phase (GiB)"
    elif any(g.metrics["peak_mem_gib"] for g in groups):
        phases = ["peak RSS"]

        def value_of(g, p):
            return g.metrics["peak_mem_gib"]

        label = "process peak RSS (GiB)"
    else:
        return False
    fig = Figure(
        figsize=(max(5, 1.3 * len(phases) * max(1, len(groups)) / 2 + 3), 4), layout="constrained"
    )
    ax = fig.subplots()
    _grouped_bars(ax, phases, groups, colors, value_of)
    ax.set_ylabel(label)
    ax.set_title("Peak memory: mean over seeds, 95% CI whiskers")
    fig.savefig(path, dpi=110)
    return True


def _plot_step_time(Figure, path, groups, colors) -> bool:
    phases = _phase_sorted(p for g in groups for p in g.phase_s)
    if not phases:
        return False
    parts = [*phases, "other"]
    fig = Figure(figsize=(max(5, 1.2 * len(groups) + 3), 4), layout="constrained")
    ax = fig.subplots()
    bottoms = [0.0] * len(groups)
    for k, part in enumerate(parts):
        heights = []
        for g in groups:
            e = g.other_s if part == "other" else g.phase_s.get(part)
            heights.append(e.mean if e else 0.0)
        ax.bar(
            range(len(groups)),
            heights,
            0.6,
            bottom=bottoms,
            label=part,
            color="lightgrey" if part == "other" else f"C{k % 10}",
        )
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(groups)), [g.group for g in groups], rotation=15)
    ax.set_ylabel("mean seconds per step")
    ax.set_title("Step time by phase (mean over steps, then seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _plot_tokens(Figure, path, groups, colors) -> bool:
    cats = [
        c
        for c in ("gen_tokens_per_s", "train_tokens_per_s")
        if any(g.metrics.get(c) for g in groups)
    ]
    if not cats:
        return False
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    _grouped_bars(ax, cats, groups, colors, lambda g, c: g.metrics.get(c))
    ax.set_xticks(range(len(cats)), [c.replace("_tokens_per_s", "") for c in cats])
    ax.set_ylabel("tokens / s (mean over steps, then seeds)")
    ax.set_title("Throughput: generated tokens / rollout s, trained tokens / update s")
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------------------------- report


def _decimals(x: float, digits: int = 3) -> int:
    if x == 0 or not math.isfinite(x):
        return 2
    return max(0, digits - 1 - math.floor(math.log10(abs(x))))


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.{_decimals(x, digits)}f}"


def _fmt_est(e: Estimate | None, unit: str = "") -> str:
    if e is None:
        return "–"
    d = _decimals(e.mean)
    text = f"{e.mean:.{d}f}"
    if not math.isnan(e.half_width):
        text += f" ± {e.half_width:.{d}f}"
    return text + unit


def _fmt_ratio(r: float | None) -> str:
    return "" if r is None else f" ({r:.2f}×)"


_SOURCE = {
    "eval": "held-out greedy",
    "train": f"train reward/accuracy, last {FINAL_TRAIN_FRACTION:.0%} of steps",
    "mixed": "mixed (see runs)",
}


def _report(s: SweepSummary, plot_note: str | None) -> str:
    groups = s.groups
    n_finished = sum(r.status == "finished" for r in s.runs)
    seeds = sorted({r.seed for r in s.runs})
    conf = f"{CONFIDENCE:.0%}"
    lines = [f"# Sweep `{s.name}`", ""]
    lines += [
        f"{len(groups)} configurations ({', '.join(f'`{g.group}`' for g in groups)}), "
        f"seeds {', '.join(map(str, seeds))}: {n_finished} of {len(s.runs)} runs finished. "
        f"Values are the mean over seeds ± the half-width of a {conf} Student-t confidence "
        "interval (no interval for a single seed); the ratio in brackets is the mean divided by "
        f"the baseline **{s.baseline}**'s mean at the same grid point.",
        "",
        "## Result",
        "",
    ]
    target = s.target_accuracy
    head = [
        "objective",
        "seeds",
        "peak memory (GiB)",
        "median step time (s)",
        "final accuracy",
        "accuracy from",
    ]
    if target is not None:
        head += [f"steps to {target:g}", f"wall-clock to {target:g} (s)"]
    rows = []
    for g in groups:
        m, r = g.metrics, g.ratios
        name = f"**{g.group}** (baseline)" if g.variant == s.baseline else f"**{g.group}**"
        row = [
            name,
            str(g.n_seeds),
            _fmt_est(m["peak_mem_gib"]) + _fmt_ratio(r["peak_mem_gib"]),
            _fmt_est(m["step_time_s"]) + _fmt_ratio(r["step_time_s"]),
            _fmt_est(m["final_acc"]) + _fmt_ratio(r["final_acc"]),
            _SOURCE.get(g.final_acc_source, "–"),
        ]
        if target is not None:
            for key in ("target_steps", "target_wall_s"):
                if g.target_reached == 0:
                    row.append("not reached")
                else:
                    partial = (
                        ""
                        if g.target_reached == g.n_seeds
                        else (f" [{g.target_reached}/{g.n_seeds} seeds]")
                    )
                    row.append(_fmt_est(m[key]) + _fmt_ratio(r[key]) + partial)
        rows.append(row)
    lines += _table(head, rows)
    kinds = {g.peak_mem_kind for g in groups}
    mem_def = (
        "CUDA peak allocated memory over the run"
        if kinds == {"cuda"}
        else "process peak resident memory (RSS) over the run"
        if kinds == {"cpu"}
        else "CUDA peak allocated where available, else peak RSS"
    )
    lines += [
        "",
        f"- *Peak memory*: {mem_def}.",
        "- *Median step time*: the median of a run's `time/step_s`.",
        "- *Final accuracy*: the run's end-of-run held-out greedy accuracy (`eval/greedy_acc`) "
        f"when it was evaluated, else the mean `reward/accuracy` of its last "
        f"{FINAL_TRAIN_FRACTION:.0%} of steps (training samples, not held out).",
    ]
    if target is not None:
        lines.append(
            f"- *To {target:g}*: the first step whose trailing {TARGET_WINDOW}-step mean of "
            "`reward/accuracy` reaches the target, and the run's cumulative step time "
            "(`time/total_s`) there. When only some seeds got there, the mean is over those "
            "(shown as [k/n seeds]), which flatters the configuration."
        )

    lines += ["", "## Time per step by phase", ""]
    phases = _phase_sorted(p for g in groups for p in g.phase_s)
    if phases:
        rows = []
        for g in groups:
            total = g.metrics["step_time_s"]
            mean_total = sum(e.mean for e in g.phase_s.values()) + (
                g.other_s.mean if g.other_s else 0
            )
            cells = [g.group]
            for p in phases:
                e = g.phase_s.get(p)
                share = f" ({e.mean / mean_total:.0%})" if e and mean_total > 0 else ""
                cells.append(_fmt_est(e) + share)
            cells += [_fmt_est(g.other_s), _fmt(mean_total), _fmt_est(total)]
            rows.append(cells)
        lines += _table(["objective", *phases, "other", "mean step", "median step"], rows)
        lines += [
            "",
            "Seconds per step, mean over steps (a phase that did not run counts 0 s) "
            "then over seeds; *other* is step time outside every timed phase.",
        ]
    else:
        lines.append("No per-phase timings were logged.")

    lines += ["", "## Memory", ""]
    peak_phases = _phase_sorted(p for g in groups for p in g.phase_peak_gib)
    static = sorted({k for g in groups for k in g.static_gib})
    rows = []
    for g in groups:
        cells = [
            g.group,
            _fmt_est(g.metrics["peak_mem_gib"]) + _fmt_ratio(g.ratios["peak_mem_gib"]),
        ]
        if any(x.peak_reserved_gib for x in groups):
            cells.append(_fmt_est(g.peak_reserved_gib))
        cells += [_fmt_est(g.phase_peak_gib.get(p)) for p in peak_phases]
        cells += [_fmt_est(g.static_gib.get(k)) for k in static]
        rows.append(cells)
    head = ["objective", "peak (GiB)"]
    if any(x.peak_reserved_gib for x in groups):
        head.append("peak reserved")
    head += [f"{p} peak" for p in peak_phases] + [f"static {k}" for k in static]
    lines += _table(head, rows)
    notes = [f"*Peak*: {mem_def}."]
    if peak_phases:
        notes.append("*<phase> peak*: the highest CUDA allocation while that phase ran.")
    if static:
        notes.append(
            "*static*: parameter, gradient and optimizer-state sizes of each model after step 1."
        )
    lines += ["", " ".join(notes)]

    lines += ["", "## Throughput", ""]
    rate_keys = [
        k
        for k in ("gen_tokens_per_s", "train_tokens_per_s", "samples_per_s", "mfu")
        if any(g.metrics.get(k) for g in groups)
    ]
    if rate_keys:
        rows = [
            [g.group, *(_fmt_est(g.metrics[k]) + _fmt_ratio(g.ratios[k]) for k in rate_keys)]
            for g in groups
        ]
        lines += _table(["objective", *rate_keys], rows)
        meaning = {
            "gen_tokens_per_s": "generated tokens per rollout second",
            "train_tokens_per_s": "trained tokens per update second",
            "samples_per_s": "sequences per step second",
            "mfu": "model FLOPs utilisation",
        }
        lines += [
            "",
            "; ".join(f"*{k}*: {meaning[k]}" for k in rate_keys)
            + ". Mean over steps, then over seeds.",
        ]
    else:
        lines.append("No throughput was logged.")

    lines += ["", "## Plots", ""]
    captions = {
        "reward_vs_step.png": "Training accuracy (or reward) against optimizer step",
        "reward_vs_wallclock.png": "The same against wall-clock (mean cumulative step time at each step)",
        "memory_per_phase.png": "Peak memory",
        "step_time.png": "Step time by phase",
        "tokens_per_s.png": "Throughput",
    }
    for p in s.plots:
        lines += [f"![{captions.get(p.name, p.stem)}]({p.name})", ""]
    if plot_note:
        lines += [plot_note, ""]
    if not s.plots and not plot_note:
        lines += ["Nothing to plot.", ""]

    lines += ["## Runs", ""]
    rows = []
    for r in s.runs:
        rows.append(
            [
                f"`{r.group}/seed{r.seed}`",
                r.status,
                str(r.steps),
                _fmt(r.total_s),
                _fmt(r.median_step_s),
                _fmt(r.final_acc) + (f" ({r.final_acc_source})" if r.final_acc_source else ""),
                "–" if r.target is None else str(r.target.step),
            ]
        )
    lines += _table(
        [
            "run",
            "status",
            "steps",
            "total step time (s)",
            "median step (s)",
            "final accuracy",
            "step at target",
        ],
        rows,
    )
    lines += [
        "",
        f"Only *finished* runs enter the tables above; a failed run's output is in its `{LOG}`.",
    ]

    lines += ["", "## How it was run", ""]
    if s.manifest:
        m = s.manifest
        extra = m["spec"].get("extra_overrides") or []
        lines += [
            f"From `{m['cwd']}`: `grpo-lab sweep {m['sweep_file']}"
            f"{' ' + shlex.join(extra) if extra else ''}`. The sweep file:",
            "",
            "```yaml",
            m["sweep_text"].rstrip(),
            "```",
            "",
            "Each run's command:",
            "",
            "```bash",
            *(shlex.join(r["command"]) for r in m["runs"]),
            "```",
        ]
        lines += [
            "",
            "A rerun of a started run adds `resume=auto`. Each run's resolved config is "
            "its `config.yaml`.",
        ]
    else:
        lines += [
            "No manifest.json (the runs were not started by `grpo-lab sweep`); each run's "
            "resolved config is its `config.yaml`:",
            "",
        ]
        lines += [f"- `{r.dir / 'config.yaml'}`" for r in s.runs]
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return out
