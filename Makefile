# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VSC := $(VENV)/bin/vsc

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Main job: build the example model offline, parse a spec to IR, optimize it with the
# spec's own pipeline while showing every change, and verify the result.
demo: install
	$(VSC) models make-tiny models/tiny-llama --arch llama
	mkdir -p build
	$(VSC) parse examples/chat.vs > build/chat.vsir
	$(VSC) opt examples/chat.vs --print-ir-after-change --dump-dir build/dumps --time-passes -o build/chat.opt.vsir
	$(VSC) verify build/chat.opt.vsir

test: install
	$(PY) -m pytest

clean:
	rm -rf build dumps .pytest_cache .hypothesis
