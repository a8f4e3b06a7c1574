# grpo_lab developer commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint format demo answer sweep bench bench-reward clean

install: $(STAMP)

# torch==2.13.0 goes in first: with it in place the package's `torch>=...` bound is already
# satisfied, so pip never reaches for a multi-GB CUDA build on a CPU machine.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check grpo_lab tests benchmarks
	$(PY) -m ruff format --check grpo_lab tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format grpo_lab tests benchmarks
	$(PY) -m ruff check --fix grpo_lab tests benchmarks

demo: $(STAMP)
	$(VENV)/bin/grpo-lab demo

# docs/answer.md from measurements (~20-30 min on 2 CPU cores; resumable, finished runs are
# skipped). ANSWER_ARGS passes options, e.g. ANSWER_ARGS='--machine "2-core CPU VM"'.
answer: $(STAMP)
	$(PY) -m grpo_lab.answer $(ANSWER_ARGS)

sweep: $(STAMP)
	$(VENV)/bin/grpo-lab sweep recipes/sweeps/grpo_vs_ppo_tiny.yaml

bench: $(STAMP)
	$(PY) benchmarks/reward_bench.py
	$(PY) benchmarks/step_bench.py --preset tiny

bench-reward: $(STAMP)
	$(PY) benchmarks/reward_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
