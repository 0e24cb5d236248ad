# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= auto

.PHONY: install demo test unit integration e2e soak mutate lint bench clean browser compat promtool

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# setuptools warns about every editable install whose folders are mapped (core/ -> imgq): expected here
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## Caption sample images end to end on embedded services: the real models where they can be loaded,
## else (offline) tiny random ones, saying so (MODEL=default refuses instead, MODEL=tiny asks for
## them); KEEP=1 leaves the services running for a look afterwards: `imgq dev down` stops them.
demo: install
	$(BIN)/imgq demo --model $(MODEL) $(if $(KEEP),--keep)

## Lint, then every test except the soak tier. Two pytest processes (JOBS=1 for one): most e2e
## time is spent waiting on workers and timeouts, which overlaps. Work stealing, because a few e2e
## tests take a minute: with xdist's default scheduling one process was often left with a queue of
## them while the other idled (here: serial 762 s; default 472-786 s; work stealing 500-512 s).
## Since workers and commands fork from a warm interpreter (tests/fixtures/warm_start.py): 382 s
## with two, 386 s with three (docs/testing.md).
JOBS ?= 2
test: install lint browser promtool
	$(BIN)/python -m pytest $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist worksteal)
	$(MAKE) --no-print-directory compat

## The model tests again on the oldest transformers imgq supports, 5.17: the release in the GPU
## image, whose BLIP text attention takes its cache under another name (docs/performance.md, GPU
## run 4). Installed beside the venv (with the huggingface-hub 1.x it needs), not into it.
COMPAT_TRANSFORMERS ?= 5.17.0
COMPAT_DIR := .imgq/compat/transformers-$(COMPAT_TRANSFORMERS)
COMPAT_TESTS ?= tests/unit/test_model.py tests/unit/test_explain_model.py tests/unit/test_retrieval.py \
	tests/integration/test_translate_model.py tests/integration/test_adapters.py tests/unit/test_gpu_bench_smoke.py \
	tests/unit/test_decode_loop.py
compat: install
	@test -f $(COMPAT_DIR)/.installed || { $(BIN)/python -m pip install -q --no-deps --target $(COMPAT_DIR) \
	  transformers==$(COMPAT_TRANSFORMERS) 'huggingface-hub>=1.5,<2' && touch $(COMPAT_DIR)/.installed; }
	PYTHONPATH=$(COMPAT_DIR) $(BIN)/python -c 'import transformers as t; v = t.__version__; \
	  assert v == "$(COMPAT_TRANSFORMERS)", f"compat run got transformers {v}"; print("compat: transformers", v)'
	PYTHONPATH=$(COMPAT_DIR) $(BIN)/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install
	$(BIN)/python -m pytest tests/integration

e2e: install
	$(BIN)/python -m pytest tests/e2e

## Slow fault and soak tests (not part of `make test`).
soak: install
	$(BIN)/python -m pytest -m soak --timeout 1800

## Mutation testing of the guarantee-holding modules, unit + integration tiers (docs/testing.md).
## Not part of `make test`; the whole scope (~4,100 mutants) takes about an hour on 2 shared cores.
## PATTERNS='imgq.retry.*' narrows it; MUTATE_OPTS='--budget 0' or '--pytest-addopts=...' (tests/mutate.py).
mutate: install
	$(BIN)/python -m tests.mutate $(MUTATE_OPTS) $(PATTERNS)

## Headless Chromium (Debian's package) for the browser tests of Flower's pages and the jobs page.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## promtool (Debian's prometheus package, unpacked: nothing starts) for the alert rules' tests. Where
## apt cannot fetch it (no mirror, not Debian) it says so and the tests run without it (skipped).
promtool: install
	@command -v promtool >/dev/null || test -x $(BIN)/promtool || { d=$$(mktemp -d) && chmod 1777 $$d && \
	  (cd $$d && { apt-get download -qq prometheus >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq prometheus >/dev/null 2>&1; }; } && \
	    dpkg -x prometheus_*.deb x) && cp $$d/x/usr/bin/promtool $(BIN)/promtool || \
	  echo "warning: promtool could not be fetched (apt); the alert rules are checked without it" >&2; \
	  rm -rf $$d; }

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench.pipeline

clean:
	rm -rf .imgq .pytest_cache .ruff_cache
