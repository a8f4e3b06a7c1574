"""Shared test settings: deterministic, quiet, single-threaded-friendly CPU runs."""

import os

# Tiny test models run fastest on one thread, and OpenMP threads spinning against other work on a
# small machine can slow every op down many times. Subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
