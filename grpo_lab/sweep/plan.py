"""The sweep file and its plan: which runs a sweep makes, with which overrides, in which folder.

:func:`load_sweep` reads and validates a sweep file (see :mod:`grpo_lab.sweep` for its keys);
:func:`plan_runs` expands it into one :class:`RunPlan` per variant x grid point x seed, each with
its folder ``<output_dir>/<variant>[__<dotted.key>=<value>...]/seed<k>/`` and its command;
:func:`check_runs` loads every run's config before anything starts. The marker files a run
folder may hold (``DONE``, ``FAILED``, ``train.log``) and :func:`is_finished` live here too, as
part of the folder layout every other module reads.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grpo_lab.errors import UserError

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
VARIANT_KEYS = ("objective", "recipe", "overrides")
# Recipe keys the sweep sets itself for every run.
RUN_OWNED_KEYS = ("seed", "output_dir", "resume")

MANIFEST = "manifest.json"
DONE = "DONE"
FAILED = "FAILED"
LOG = "train.log"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.=+-]")


class SweepError(UserError, ValueError):
    """A sweep file, its overrides or a sweep folder is wrong; the message names the file and key.
    The command line prints it as ``grpo-lab: sweep error: <message>``, exit code 2."""

    kind = "sweep error"


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
            "base": display_path(self.base),
            "launch": None if self.launch is None else display_path(self.launch),
            "seeds": list(self.seeds),
            "overrides": dict(self.overrides),
            "variants": {
                v.name: {"recipe": display_path(v.recipe), "overrides": dict(v.overrides)}
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
        recipe, overrides = body.get("recipe"), {}
        if body.get("objective") is not None:
            recipe, overrides = _objective(
                path, f"{where}.objective", body["objective"], base, recipe
            )
        recipe = base if recipe is None else _resolve_file(path, f"{where}.recipe", recipe)
        overrides.update(_validate_overrides(path, f"{where}.overrides", body.get("overrides")))
        variants[vname] = Variant(vname, recipe, overrides)

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


def _objective(
    path: Path, where: str, name: Any, base: Path, recipe: Any
) -> tuple[str | None, dict[str, Any]]:
    """(recipe, overrides) of a variant's ``objective`` (:mod:`grpo_lab.objectives`).

    The recipe is the objective's recipe for the base recipe's task unless the variant names
    its own; the objective's overrides come first, the variant's own on top.
    """
    from grpo_lab import objectives

    if not isinstance(name, str) or name not in objectives.OBJECTIVES:
        raise SweepError(
            f"{path}: {where}: unknown objective {name!r}; expected one of "
            + ", ".join(objectives.OBJECTIVES)
        )
    _, overrides = objectives.objective(name)
    if recipe is None:
        try:
            recipe = str(objectives.recipe_for(name, base))
        except ValueError as e:
            raise SweepError(f"{path}: {where}: {e}; or give the variant a recipe") from e
    return recipe, overrides


def _check_keys(path: Path, prefix: str, mapping: dict, allowed: Sequence[str]) -> None:
    from grpo_lab.config import did_you_mean

    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(str(key), allowed)
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


def display_path(p: Path) -> str:
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
        args = [display_path(self.recipe), *self.overrides, *(["resume=auto"] if resume else [])]
        if self.launch is None:
            return [sys.executable, "-m", "grpo_lab.train", *args]
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            display_path(self.launch),
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
