# tune-alr: `make demo` and `make test` each set up what they need from a clean clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SHARED_DATA := $(abspath ../shared/data)

# Tests and the demo never reach the Hugging Face hub, and keep Ray's files local.
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-all browser-deps lint typecheck check bench constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,anchors,browser]'
	touch $@

## demo: the main job on the embedded digits task; results in results/demo, MLflow in ./mlflow.db
demo: $(STAMP)
	$(BIN)/tune-alr demo

## test: the fast suite a developer runs often: unit tests and the Ray tests that need no
## root (uses ../shared/data when it is there); `make test-all` adds the heavy ones
test: $(STAMP)
	@if [ -d "$(SHARED_DATA)" ]; then export TUNE_ALR_DATA_DIR="$(SHARED_DATA)"; fi; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 -m "not heavy" tests

## browser-deps: Debian's chromium and chromium-driver for the browser tests, where missing
## (as root); where they cannot be installed the browser tests skip and say why
browser-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" != 0 ]; then \
	    echo "browser-deps: not root, chromium not installed: the browser tests will skip" >&2; \
	  else \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver >/dev/null) \
	    || echo "browser-deps: apt-get failed: the browser tests will skip" >&2; \
	  fi; \
	fi

## test-all: everything, the heavy tests too (cluster end to end, process kills, outages,
## the MLflow UI in headless Chromium); what CI runs. The `side` tests (heavy ones that
## mostly wait on processes of their own: a cluster, servers, a browser) run in a second
## pytest, with its own session Ray, beside the rest; its output follows the rest's.
## Each pytest has its own temporary folder, removed when both pass.
test-all: $(STAMP) browser-deps
	@if [ -d "$(SHARED_DATA)" ]; then export TUNE_ALR_DATA_DIR="$(SHARED_DATA)"; fi; \
	base=$$(mktemp -d /tmp/tune-alr-tests.XXXXXX); \
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=10 \
	  --basetemp="$$base/side" -m side tests > "$$base/side.log" 2>&1 & side=$$!; \
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 \
	  --basetemp="$$base/rest" -m "not side" tests; rest=$$?; \
	wait $$side; sidecode=$$?; \
	echo; echo "== the side tests (run beside the rest): exit $$sidecode"; \
	cat "$$base/side.log"; \
	if [ $$rest -eq 0 ] && [ $$sidecode -eq 0 ]; then rm -rf "$$base"; \
	else echo "test-all: failed (rest: exit $$rest, side: exit $$sidecode); temporary files in $$base" >&2; exit 1; fi

lint: $(STAMP)
	$(BIN)/ruff check tune_alr trainables tests benchmarks
	$(BIN)/ruff format --check tune_alr trainables tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## bench: every benchmark with its defaults (the MNIST ones read ../shared/data)
bench: $(STAMP)
	@if [ -d "$(SHARED_DATA)" ]; then export TUNE_ALR_DATA_DIR="$(SHARED_DATA)"; fi; \
	for b in benchmarks/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

## constraints: re-pin every package from the current venv
constraints: $(STAMP)
	{ echo "# The tested pins: every package the dev install resolved to (Python 3.11, Linux x86_64)."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' | sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf results mlflow.db mlartifacts .pytest_cache .mypy_cache .ruff_cache
