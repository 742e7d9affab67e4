# Two commands on a fresh machine:  make demo  and  make test.
# A user with a GPU installs their own torch into .venv first (or sets TORCH_SPEC);
# otherwise the CPU build named by TORCH_SPEC is installed, never a CUDA one.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint format bench clean browser system

# Debian packages: the report's page test drives a real browser (chromium, headless);
# the embedded spoken digits and noisy speech are made by the flite synthesiser.
SYSTEM_PACKAGES := chromium flite
SYSTEM_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES)

$(BIN)/python:
	$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "aigc needs Python 3.11 or newer (set PY=python3.11)")'
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e .
	touch $@

# The FID references the tests compare with. Without their dependencies: both ask for
# torchvision, which would replace the CPU torch with a CUDA build.
FID_REFERENCES := torch-fidelity==0.4.0 pytorch-fid==0.3.0

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,export]'
	$(BIN)/python -m pip install -q --no-deps $(FID_REFERENCES)
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/aigc quickstart

system:
	@command -v chromium >/dev/null 2>&1 && command -v flite >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then $(SYSTEM_INSTALL); else sudo sh -c '$(SYSTEM_INSTALL)'; fi; }

browser: system

# One worker per core (pytest-xdist), a test file per worker so that its module fixtures
# are built once, one torch thread each so that workers do not oversubscribe the cores.
test: $(VENV)/.test-installed system
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

lint: $(VENV)/.test-installed
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/gpt_train.py
	$(BIN)/python benchmarks/gpt_sample.py
	$(BIN)/python benchmarks/train_memory.py
	$(BIN)/python benchmarks/gan_train.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/downstream.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/diffusion_train.py
	$(BIN)/python benchmarks/diffusion_sample.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
