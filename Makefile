# Two-command quick start: `make demo` and `make test` work on a fresh clone (they create .venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
PIP := $(BIN)/pip install --disable-pip-version-check -q -c $(CONSTRAINTS)
# The CLIP BPE vocabulary (MIT, OpenAI) ships inside the open_clip_torch wheel; installed without
# its dependencies it is just a data file that addinov3_jax.tokenizer finds (open_clip is never imported).
VOCAB_PKG := open_clip_torch==3.3.0
# ONNX export: its metadata pins orbax-checkpoint<0.11.37 (for its examples); it runs on the
# `export` extra's onnx / onnx-ir / onnxruntime, so it goes in without its dependencies too.
ONNX_PKG := jax2onnx==0.17.1

.PHONY: demo test lint bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) -e '.[plots]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(VOCAB_PKG)
	touch $@

# The vocabulary wheel's undeclared dependencies would make pip's resolver print an ERROR on any
# later install: take it out while the extras go in, then put it back (without dependencies).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip uninstall --disable-pip-version-check -q -y open_clip_torch jax2onnx
	$(PIP) -e '.[test,dev]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(VOCAB_PKG) $(ONNX_PKG)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/addinov3 demo

# Two workers (one per core here), whole files per worker so module fixtures are built once, in
# the order of FILE_ORDER in tests/conftest.py.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
