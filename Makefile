# lipstream — `make serve` and `make test` work on a fresh machine.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
# PyTorch's own index of CPU-only wheels; where it cannot be reached within TORCH_CPU_TIMEOUT
# seconds, setup falls back to the package registry.
TORCH_CPU_INDEX   ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_TIMEOUT ?= 10
TORCH_CPU         ?= torch==2.13.0

.PHONY: setup serve test test-gpu check bench clean

setup: $(STAMP)

# A CPU-only machine gets the CPU build of torch from PyTorch's CPU index (a plain
# `pip install torch` on Linux pulls a multi-GB CUDA build); where that index is out of reach
# (a short timeout, no retries) it comes from the package registry as any other package.
# A machine with an NVIDIA GPU gets the normal CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "setup: NVIDIA GPU found, installing the CUDA build of torch"; \
		$(PY) -m pip install -q "torch>=2.6"; \
	else \
		echo "setup: no GPU, installing the CPU build of torch from $(TORCH_CPU_INDEX)"; \
		$(PY) -m pip install -q --timeout $(TORCH_CPU_TIMEOUT) --retries 0 \
			--index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)" \
		|| { echo "setup: $(TORCH_CPU_INDEX) not reachable, installing torch from the package registry"; \
			$(PY) -m pip install -q "$(TORCH_CPU)" || $(PY) -m pip install -q "torch>=2.6"; }; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/lipstream serve --host $(HOST) --port $(PORT) --demo-avatar

# `isolated` tests measure this process's RSS: they run in a pytest process of their own (in the
# full suite's, RSS moves by tens of MB with what earlier tests left behind)
# Both runs always run; the target fails if either failed.
test: setup
	@status=0; \
	$(PY) -m pytest -q -m "not gpu and not isolated" tests || status=1; \
	$(PY) -m pytest -q -m "isolated and not gpu" tests || status=1; \
	[ $$status -eq 0 ] || echo "make test: a pytest run failed (see above)" >&2; \
	exit $$status

test-gpu: setup
	$(PY) -m pytest -q -m gpu tests

check: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy lipstream server engines avatars bench
	$(VENV)/bin/lint-imports  # the layers and no-cycle contracts in pyproject.toml
	$(VENV)/bin/pip-audit --skip-editable --progress-spinner off
	$(PY) .ci/audit.py  # the same from the registry alone, where pip-audit cannot query (see the file)

bench: setup
	$(VENV)/bin/lipstream bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
