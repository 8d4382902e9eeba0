# psg-gateway: each target installs what it needs into .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.psg-installed
DEMO_DIR ?= demo-out
DEMO_HOURS ?= 1
PYTEST_ARGS ?=

.PHONY: install demo run peers test test-fast test-integration test-e2e bench bench-receiver bench-hl7 bench-batch bench-differences lint clean

# torch first, pinned: a bare or open-ended torch requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The tests also cover the optional Ray backend (psg-gateway[ray]) on a local Ray instance.
TEST_EXTRAS := $(VENV)/.psg-test-extras
$(TEST_EXTRAS): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $(TEST_EXTRAS)

# The daemon on the embedded defaults (deploy/demo.yaml: SQLite and folders under ./var, DICOM on
# 127.0.0.1:11112): one EDF dropped into the folder, one DICOM study sent to the port, results shown.
demo: $(STAMP)
	$(BIN)/psg-gateway demo --config deploy/demo.yaml --hours $(DEMO_HOURS)

# The same daemon, left running until Ctrl-C.
run: $(STAMP)
	$(BIN)/psg-gateway run --config deploy/demo.yaml

# The tests' real peers, from Debian's packages: DCMTK (storescu, echoscu, storescp: the DICOM peer),
# poppler-utils (pdftoppm, pdftotext: the study report's PDF read back), chromium (the web console's browser).
# $(call apt_tool,COMMAND,PACKAGE,WHAT): install Debian's PACKAGE when COMMAND is missing and we may (root or
# sudo); otherwise WHAT is reported as skipped (and .ci/run, which requires it, fails).
define apt_tool
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "$(2) not installed and no root: $(3) will be skipped"; exit 0; fi; \
	  $$SUDO apt-get install -y -q $(2) >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q $(2) >/dev/null; } || \
	  echo "could not install $(2): $(3) will be skipped"; }
endef

peers:
	$(call apt_tool,storescu,dcmtk,the DICOM peer tests)
	$(call apt_tool,pdftoppm,poppler-utils,the study report's PDF tests)
	$(call apt_tool,dciodvfy,dicom3tools,the DICOM conformance tests)
	$(call apt_tool,chromium,chromium,the web console's browser tests)

# Every test, every layer (what CI runs through .ci/run).
test: $(STAMP) $(TEST_EXTRAS) peers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The test layers (tests/README.md). make test-fast is the edit-and-rerun loop, well under a minute: the
# unit layer (no DCMTK, PostgreSQL, Ray, listener, daemon or pipeline on a night) without the slow tests.
# make test-integration: the real peers; make test-e2e: the whole product. Neither replaces make test.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "unit and not slow" $(PYTEST_ARGS)

test-integration: $(STAMP) $(TEST_EXTRAS) peers
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

test-e2e: $(STAMP) $(TEST_EXTRAS) peers
	$(BIN)/python -m pytest -m e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_night.py

bench-receiver: $(STAMP) peers
	$(BIN)/python bench/bench_receiver.py

bench-hl7: $(STAMP)
	$(BIN)/python bench/bench_hl7.py

# 12 synthetic 8-hour nights through psg-gateway batch, against the single-night rate (same process).
bench-batch: $(STAMP)
	$(BIN)/python bench/bench_batch.py

# Each deliberate difference from the SleepFM release, measured on its fixture (needs ../shared/reference).
bench-differences: $(STAMP)
	$(BIN)/python bench/release_differences.py

lint: $(STAMP)
	$(BIN)/ruff check gateway inference tests bench

clean:
	rm -rf $(VENV) $(DEMO_DIR) var build *.egg-info
