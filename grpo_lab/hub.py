"""Where models and datasets come from: a local folder, the Hugging Face hub, or its local cache.

The hub libraries retry a connection that cannot succeed for the better part of a minute and then
report it with a traceback. Before anything asks the hub, :func:`hub_unreachable_reason` answers
in at most ``PROBE_TIMEOUT_S`` (the offline switches, else one TCP connection to the hub or the
HTTPS proxy, remembered for the process), and :func:`resolve_model_path` turns every model name
into something loadable or a one-line :class:`~grpo_lab.errors.ModelSourceError`:

- ``builtin:tiny-arith`` is the embedded tiny model, built and cached on first use
  (:func:`grpo_lab.tiny.ensure_tiny_model`); any other ``builtin:`` name is an error;
- an existing folder must hold a model (``config.json``), a LoRA ``adapter_config.json`` or a
  tokenizer;
- a name that can only be a path (``/x``, ``./x``, ``~/x``, ``a/b/c``, or not a valid hub id)
  and does not exist is "no such local folder";
- a hub name without a reachable hub loads from the local cache when it is there, else fails
  at once saying how to point ``model.name_or_path`` / ``data.path`` at local files.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from grpo_lab.errors import ModelSourceError

__all__ = [
    "BUILTIN_PREFIX",
    "PROBE_TIMEOUT_S",
    "hub_unreachable_reason",
    "resolve_model_path",
    "resolve_model_source",
]

PROBE_TIMEOUT_S = 3.0
BUILTIN_PREFIX = "builtin:"
# Any of these makes a folder something to load from (a model, a LoRA adapter, a tokenizer).
_MODEL_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json")
_OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _probe(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"cannot be reached from this machine ({host}:{port}: {e.strerror or e})"


def hub_unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now ("is switched off (HF_HUB_OFFLINE=1)", "cannot be
    reached ..."), or None when a connection to it (or to the HTTPS proxy) opens."""
    for name in _OFFLINE_SWITCHES:
        if _truthy(os.environ.get(name)):
            return f"is switched off ({name}=1)"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    return _probe(url.hostname or "huggingface.co", port, timeout_s)


def _is_hub_id(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # HFValidationError: not of the form "name" or "org/name"
        return False
    return True


def resolve_model_path(name_or_path: str) -> str:
    """What ``from_pretrained`` should load for a model name, else a one-line error.

    The one resolver of model names (``model.name_or_path``, ``ppo.critic_model``, ``grpo-lab
    eval --model``): a ``builtin:`` name is the embedded model's cached folder, anything else
    goes through :func:`resolve_model_source`.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        from grpo_lab import tiny

        if name_or_path != tiny.TINY_MODEL_NAME:
            raise ModelSourceError(
                f"model {name_or_path!r}: no such builtin model; the embedded one is "
                f"{tiny.TINY_MODEL_NAME!r}"
            )
        return str(tiny.ensure_tiny_model())
    return resolve_model_source(name_or_path)


def resolve_model_source(name_or_path: str) -> str:
    """A local folder, or a hub name that can be loaded now; else a one-line error (the
    non-builtin half of :func:`resolve_model_path`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if any((path / name).is_file() for name in _MODEL_FILES):
            return str(path)
        if (path / "config.yaml").is_file():
            final = path / "final"
            raise ModelSourceError(
                f"{name_or_path} is a run folder, not a model folder; use its model, {final}"
                + ("" if final.is_dir() else " (not written yet: has the run finished?)")
            )
        raise ModelSourceError(
            f"{name_or_path} is a folder but not a model folder (no config.json) nor a run "
            "folder (no config.yaml); point model.name_or_path at a folder written by "
            "save_pretrained or at a run's final/"
        )
    if path.exists():
        raise ModelSourceError(f"{name_or_path} is a file; a model is a folder with config.json")
    if not _is_hub_id(name_or_path):
        raise ModelSourceError(
            f"model {name_or_path!r}: no such local folder (and not a hub name); check the "
            "path given to model.name_or_path (or ppo.critic_model)"
        )
    offline = hub_unreachable_reason()
    if offline is None:
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        raise ModelSourceError(
            f"model {name_or_path!r}: no such local folder, and as a hub name it cannot be "
            f"loaded: the hub {offline} and the model is not in the local cache; set model.name_or_path to a local model folder (one written by "
            "save_pretrained), and data.path / data.eval_path to local JSONL files"
        ) from None
