# lipstream — `make serve` and `make test` work on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: setup serve test test-gpu check bench clean

setup: $(STAMP)

# A CPU-only machine gets the CPU build of torch (a plain `pip install torch` pulls a
# multi-GB CUDA build); a machine with an NVIDIA GPU gets the normal CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: NVIDIA GPU found, installing the CUDA build of torch"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		echo "setup: no GPU, installing the CPU build of torch"; \
		$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.6"; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/lipstream serve --host $(HOST) --port $(PORT) --demo-avatar

# `isolated` tests measure this process's RSS: they run in a pytest process of their own (in the
# full suite's, RSS moves by tens of MB with what earlier tests left behind)
test: setup
	$(PY) -m pytest -q -m "not gpu and not isolated" tests
	$(PY) -m pytest -q -m "isolated and not gpu" tests

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

check: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy lipstream server engines avatars
	$(VENV)/bin/pip-audit --skip-editable --progress-spinner off
	$(PY) .ci/audit.py  # the same from the registry alone, where pip-audit cannot query (see the file)

bench: setup
	$(VENV)/bin/lipstream bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
