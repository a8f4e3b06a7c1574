"""Recipes: a YAML file and dotted overrides merged onto a pydantic model, one-line errors, key docs.

:mod:`grpo_lab.config` declares a run's settings as pydantic models; this module reads them for
any such model. Layers, later ones winning::

    the model's defaults  <-  recipe YAML  <-  overrides "a.b.c=value"

- Merging: a mapping given for a section (a field whose type is a model) merges into it key by
  key; every other value (scalars, lists) replaces the one before. A section left empty in YAML
  (``trainer:`` with nothing under it) reads as ``null`` and merges nothing.
- Override values are parsed with ``yaml.safe_load``, so ``true``, ``null``, ``4`` and
  ``[q_proj, v_proj]`` mean what they mean in a recipe; a string field takes the raw text when
  YAML would read something else (``output_dir=123`` gives ``"123"``).
- The merged mapping is validated once by pydantic; its first error becomes one
  :class:`ConfigError` line naming the dotted key, the file or override that set it, and for an
  unknown key or choice the closest match.
"""

from __future__ import annotations

import difflib
import importlib
import math
import types
from collections.abc import Mapping, Sequence
from functools import reduce
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo

from grpo_lab.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key(s) and, when known, where it came from.

    ``keys`` holds the dotted keys involved (empty for file-level problems).
    """

    kind = "config error"

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


def did_you_mean(word: str, candidates: Sequence[str] | set[str] | Mapping[str, Any]) -> str:
    """' (did you mean X?)' with the closest of ``candidates``, or '' when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --- field types -----------------------------------------------------------------------------


class Registry:
    """Checks a choice against a registry defined elsewhere: the keys of ``module.name``.

    The module is imported on the first check, so reading the schema imports no torch, and names
    registered at run time are valid choices.
    """

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(getattr(importlib.import_module(self.module), self.name))

    def __call__(self, value: str | None) -> str | None:
        names = self.names()
        if value is not None and value not in names:
            raise ValueError(f"must be one of {names!r}, got {value!r}{did_you_mean(value, names)}")
        return value


def registered(module: str, name: str) -> Any:
    """A string field whose values are the keys of the registry ``module.name``."""
    return Annotated[str, AfterValidator(Registry(module, name))]


def _number(value: Any) -> Any:
    """A numeric string as the int or float it spells (YAML 1.1 reads ``1e-6`` as a string)."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return value


def _integral(value: Any) -> Any:
    value = _number(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


#: Numbers for strict models: numeric strings parse, an int field takes integral floats (1e4).
Int = Annotated[int, BeforeValidator(_integral)]
Float = Annotated[float, BeforeValidator(_number)]
NonEmpty = Annotated[str, Field(min_length=1)]


# --- the schema, walked ----------------------------------------------------------------------


def _inner(tp: Any) -> Any:
    """``tp`` without ``Annotated`` metadata and without ``| None``."""
    if get_origin(tp) is Annotated:
        return _inner(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return _inner(next(a for a in get_args(tp) if a is not type(None)))
    return tp


def section(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a section field, or None for a value field."""
    tp = _inner(field.annotation)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def walk(model: type[BaseModel], prefix: str = ""):
    """Yield ``(dotted_key, field)`` for every section and value of ``model``, in order."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if (sub := section(field)) is not None:
            yield from walk(sub, f"{prefix}{name}.")


def choices(field: FieldInfo) -> list[Any] | None:
    """The values of a choice field (its ``Literal`` or its :class:`Registry`), else None."""
    tp = _inner(field.annotation)
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    annotations = (field.annotation, *get_args(field.annotation))
    for meta in [
        *field.metadata,
        *(m for a in annotations for m in getattr(a, "__metadata__", ())),
    ]:
        if isinstance(meta, AfterValidator) and isinstance(meta.func, Registry):
            return meta.func.names()
    return None


def type_str(field: FieldInfo) -> str:
    """Readable type: ``int``, ``float | None``, ``list[str]``, ``{grpo,ppo}`` for a choice."""
    tp, names = _inner(field.annotation), choices(field)
    if names is not None:
        text = "{" + ",".join(map(str, names)) + "}"
    elif get_origin(tp) is list:
        text = f"list[{_inner(get_args(tp)[0]).__name__}]"
    else:
        text = tp.__name__
    return f"{text} | None" if type(None) in get_args(field.annotation) else text


_OPS = {
    "gt": ">",
    "ge": ">=",
    "lt": "<",
    "le": "<=",
    "min_length": "len >=",
    "max_length": "len <=",
}


def bounds_str(field: FieldInfo) -> str:
    """The field's constraints as text (``> 0, <= 1``, ``non-empty``), or ''."""
    parts = [f"{_OPS[n]} {getattr(m, n)}" for m in field.metadata for n in _OPS if hasattr(m, n)]
    return ", ".join(parts).replace("len >= 1", "non-empty")


# --- merging layers --------------------------------------------------------------------------


def merge(
    raw: dict[str, Any],
    mapping: Any,
    model: type[BaseModel],
    origins: dict[str, str],
    source: str,
    prefix: str = "",
) -> None:
    """Merge ``mapping`` into the nested dict ``raw`` in place, recording ``source`` per key set
    in ``origins``. Values are checked later, all at once, by pydantic."""
    if mapping is None:
        return
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"expected a mapping at the top level, got {mapping!r}")
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        field = model.model_fields.get(name)
        sub = section(field) if field is not None else None
        if sub is not None and (value is None or isinstance(value, Mapping)):
            if not isinstance(raw.get(name), dict):
                raw[name] = {}
            merge(raw[name], value, sub, origins, source, f"{key}.")
        else:
            raw[name] = value
            origins[key] = source


def parse_override(model: type[BaseModel], text: str) -> dict[str, Any]:
    """``"a.b.c=value"`` as the nested mapping ``{"a": {"b": {"c": value}}}``, value parsed."""
    key, _, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    current: type[BaseModel] | None = model
    field: FieldInfo | None = None
    for i, part in enumerate(parts):
        if current is None:
            where = ".".join(parts[:i])
            raise ConfigError(
                f"unknown key {key!r}: {where!r} is a value of type {type_str(field)}, "
                "not a section",
                [key],
            )
        if part not in current.model_fields:
            raise unknown_key(model, key)
        field = current.model_fields[part]
        current = section(field)
    takes_str = _inner(field.annotation) is str
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if not takes_str:
            raise ConfigError(f"{key}: cannot parse {raw!r} as YAML ({exc})", [key]) from None
        value = raw
    if takes_str and value is not None and not isinstance(value, str):
        value = raw
    for part in reversed(parts):
        value = {part: value}
    return value


def layered(model: type[M], path: str | Path | None = None, overrides: Sequence[str] = ()) -> M:
    """The model's defaults, the YAML file at ``path``, then the ``key=value`` overrides, merged
    and validated."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        layer(raw, model, data, origins, str(path))
    for text in overrides:
        if "=" not in text or not text.partition("=")[0].strip():
            raise ConfigError(
                f"malformed override {text!r}: expected key=value, e.g. trainer.lr=1e-6"
            )
        layer(raw, model, text, origins, f"override {text!r}")
    return build(model, raw, origins)


def layer(raw: dict, model: type[BaseModel], data: Any, origins: dict, source: str) -> None:
    """Merge one layer (a mapping, or an override's text) into ``raw``; errors name ``source``."""
    try:
        mapping = parse_override(model, data) if isinstance(data, str) else data
        merge(raw, mapping, model, origins, source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}", exc.keys) from None


# --- errors ----------------------------------------------------------------------------------


def unknown_key(model: type[BaseModel], key: str) -> ConfigError:
    """Error for an unknown dotted key, suggesting the closest known key.

    A right name in the wrong section (``lr``, ``trainer.group_size``) is suggested in its
    section; otherwise the whole dotted key, then its last part, is matched with difflib.
    """
    known = [k for k, _ in walk(model)]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
    hint = f" (did you mean {by_leaf[leaf]!r}?)" if leaf in by_leaf else did_you_mean(key, known)
    if not hint:
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1)
        hint = f" (did you mean {by_leaf[near[0]]!r}?)" if near else ""
    return ConfigError(f"unknown key {key!r}{hint}", [key])


def to_config_error(
    model: type[BaseModel], error: Mapping[str, Any], origins: Mapping[str, str]
) -> ConfigError:
    """A pydantic error as one line: the source that set the key, the key, what is wrong."""
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    cause, value = (error.get("ctx") or {}).get("error"), error["input"]
    if isinstance(cause, ConfigError) and not key:  # a rule relating several keys
        sources = [origins[k] for k in cause.keys if k in origins]
        where = f" (set in {', '.join(dict.fromkeys(sources))})" if sources else ""
        return ConfigError(f"{cause}{where}", cause.keys)
    if error["type"] == "extra_forbidden":
        message = str(unknown_key(model, key))
    elif cause is not None:
        message = f"{key}: {cause}"
    else:
        text = error["msg"].replace("Input should", "should")
        text = text[0].lower() + text[1:]
        names = choices(dict(walk(model))[key]) if error["type"] == "literal_error" else []
        message = f"{key}: {text} (got {value!r}){did_you_mean(str(value), names)}"
    key = key.split("[", 1)[0]
    source = next((origins[k] for k in _prefixes(key) if k in origins), None)
    return ConfigError(f"{source}: {message}" if source else message, [key])


def _prefixes(key: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, a.b, a]``: where to look for the layer that set a key."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def build(model: type[M], raw: Mapping[str, Any], origins: Mapping[str, str]) -> M:
    """``model`` validated from ``raw``; its first error raised as one :class:`ConfigError`."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise to_config_error(model, exc.errors()[0], origins) from None


# --- documentation ---------------------------------------------------------------------------


def explain(config: BaseModel) -> str:
    """Every key with its type, value, bounds and documentation, as text; sections as headers."""
    lines: list[str] = []
    for key, field in walk(type(config)):
        indent, doc = "  " * key.count("."), field.description or ""
        if section(field) is not None:
            lines += ["", f"{indent}{key}:  {doc}"]
            continue
        value = yaml.safe_dump(
            reduce(getattr, key.split("."), config), default_flow_style=True, width=math.inf
        )
        value = value.removesuffix("\n...\n").strip()
        bounds = f"  ({bounds_str(field)})" if bounds_str(field) else ""
        lines.append(f"{indent}{key}: {type_str(field)} = {value}{bounds}")
        lines += [f"{indent}    {line}" for line in doc.splitlines()]
    return "\n".join(lines).lstrip("\n") + "\n"


def save(config: BaseModel, path: str | Path) -> None:
    """Write ``config`` as YAML, aside and renamed, so a full disk never leaves half a file."""
    text = yaml.safe_dump(config.model_dump(), sort_keys=False, allow_unicode=True)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
