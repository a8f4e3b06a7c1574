"""Shared test settings (deterministic, quiet, single-threaded-friendly CPU runs) and fixtures."""

import os

import pytest

# Tiny test models run fastest on one thread, and OpenMP threads spinning against other work on a
# small machine can slow every op down many times. Subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init model with the embedded tokenizer (64 positions): fast to build, real
    enough to train."""
    import torch

    from grpo_lab.tiny import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
