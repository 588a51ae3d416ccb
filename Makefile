# Two commands do all the set-up on a fresh machine:
#   make demo   - the furthest real step on real data (see README)
#   make test   - ruff, the test suite, every tutorial executed and the site built
#   make docs   - the site, tutorials executed, into docs/_build/html
# Both create .venv if missing and install what they need. torch is installed first,
# pinned, so that the resolver never pulls a different (CUDA) build.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
SCLCM_DATA ?= $(abspath ../shared/data)
export SCLCM_DATA

BIN   := $(VENV)/bin
STAMP := $(VENV)/.sclcm-installed

.PHONY: demo test lint docs docs-fast venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,docs]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/sclcm demo --data "$(SCLCM_DATA)" --out demo_output

test: $(STAMP)
	$(BIN)/ruff check sclcm tests scripts benchmarks
	SCLCM_PROGRESS=0 $(BIN)/python -m pytest --cov --cov-report=term:skip-covered

# -n: every cross-reference must resolve; -W: any warning (a docstring that does not
# render, a tutorial cell that fails) fails the build. docs-fast: without running tutorials.
SPHINX := SCLCM_PROGRESS=0 $(BIN)/sphinx-build -b html -n -W --keep-going -j 2

docs: $(STAMP)
	$(SPHINX) docs docs/_build/html

docs-fast: $(STAMP)
	SCLCM_DOCS_EXECUTE=off $(SPHINX) docs docs/_build/html

lint: $(STAMP)
	$(BIN)/ruff check sclcm tests scripts benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache .coverage docs/_build docs/generated
