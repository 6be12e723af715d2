# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv if it
# is absent, installs torch first (override TORCH_SPEC for a CUDA build), then ct-factory.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out
BIN := $(VENV)/bin
STAMP := $(VENV)/.ct-factory-installed

.PHONY: demo test lint format install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	@touch $@

demo: $(STAMP)
	$(BIN)/ctfactory phantom --n 8 --size 64 --seed 0 --out $(DEMO_OUT)/phantom --preview --overwrite
	$(BIN)/ctfactory plan cohorts/demo.yaml --out $(DEMO_OUT)/demo-plan.parquet --plot $(DEMO_OUT)/demo-plan.png
	@echo "demo: phantom dataset and previews in $(DEMO_OUT)/phantom (docs/phantom.md);"
	@echo "      the demo cohort's plan in $(DEMO_OUT)/demo-plan.parquet and .png (docs/cohort-spec.md)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .hypothesis
