# psg-gateway: each target installs what it needs into .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.psg-installed
DEMO_DIR ?= demo-out
DEMO_HOURS ?= 8
PYTEST_ARGS ?=

.PHONY: install demo test bench lint clean

# torch first, pinned: a bare or open-ended torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/psg-gateway example-night $(DEMO_DIR)/example_night.edf --hours $(DEMO_HOURS)
	$(BIN)/psg-gateway infer $(DEMO_DIR)/example_night.edf --out $(DEMO_DIR)/result

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_night.py

lint: $(STAMP)
	$(BIN)/ruff check gateway inference tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info
