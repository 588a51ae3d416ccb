# Two commands do all the set-up on a fresh machine:
#   make demo   - the furthest real step on real data (see README)
#   make test   - the test suite
# Both create .venv if missing and install what they need. torch is installed first,
# pinned, so that the resolver never pulls a different (CUDA) build.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
SCLCM_DATA ?= $(abspath ../shared/data)
export SCLCM_DATA

BIN   := $(VENV)/bin
STAMP := $(VENV)/.sclcm-installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/sclcm demo --data "$(SCLCM_DATA)" --out demo_output

test: $(STAMP)
	$(BIN)/ruff check sclcm tests scripts benchmarks
	SCLCM_PROGRESS=0 $(BIN)/python -m pytest --cov --cov-report=term:skip-covered

lint: $(STAMP)
	$(BIN)/ruff check sclcm tests scripts benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache .coverage
