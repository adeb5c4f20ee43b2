# The two commands: `make demo` runs the embedded default, `make test` runs the tests.
# Both create their own virtualenv (.venv) and install what they need.
# `make test-sglang` runs tests/engine against real SGLang on the CPU (docs/real-engine.md);
# its engine is installed once into ~/.cache/trio-router/sglang by scripts/sglang/setup.sh.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-sglang lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/trio-router demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# setup.sh first, in the open, so a first install shows its progress and a failure its reason
# (TRIO_ROUTER_SGLANG_OPTIONAL=1: the suite then skips instead of failing)
test-sglang: $(STAMP)
	@scripts/sglang/setup.sh || { code=$$?; [ "$$TRIO_ROUTER_SGLANG_OPTIONAL" = 1 ] || exit $$code; }
	TRIO_ROUTER_SGLANG_TESTS=1 $(BIN)/python -m pytest -q tests/engine

lint: $(STAMP)
	$(BIN)/ruff check trio_router tests bench
	$(BIN)/ruff format --check trio_router tests bench
	$(BIN)/mypy
	$(BIN)/mypy bench

bench: $(STAMP)
	$(BIN)/python bench/proxy_overhead.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
