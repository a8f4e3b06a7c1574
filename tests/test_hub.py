"""Tests for grpo_lab.hub.resolve_model_path, the one resolver of model names: builtin names,
local folders, path-like names that do not exist."""

import pathlib

import pytest

from grpo_lab import hub, tiny
from grpo_lab.errors import ModelSourceError


def test_builtin_name_is_the_embedded_models_folder(monkeypatch):
    monkeypatch.setattr(tiny, "ensure_tiny_model", lambda: pathlib.Path("/cache/tiny"))
    assert hub.resolve_model_path(tiny.TINY_MODEL_NAME) == "/cache/tiny"


def test_unknown_builtin_name_is_one_line(monkeypatch):
    monkeypatch.setattr(tiny, "ensure_tiny_model", lambda: pytest.fail("must not build"))
    with pytest.raises(ModelSourceError, match="no such builtin model.*builtin:tiny-arith"):
        hub.resolve_model_path("builtin:tiny-other")


def test_local_model_folder_is_returned(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_missing_path_is_one_line(tmp_path):
    with pytest.raises(ModelSourceError, match="no such local folder"):
        hub.resolve_model_path(str(tmp_path / "nowhere"))
