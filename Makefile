# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= default
export XDG_RUNTIME_DIR ?= /tmp

.PHONY: install demo test unit integration e2e soak lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## Caption sample images end to end on embedded services (MODEL=tiny works offline).
demo: install
	$(BIN)/imgq demo --model $(MODEL)

## Lint, then every test except the soak tier.
test: install lint
	$(BIN)/python -m pytest

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install
	$(BIN)/python -m pytest tests/integration

e2e: install
	$(BIN)/python -m pytest tests/e2e

## Slow fault and soak tests (not part of `make test`).
soak: install
	$(BIN)/python -m pytest -m soak --timeout 1800

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.pipeline

clean:
	rm -rf .imgq .pytest_cache .ruff_cache
