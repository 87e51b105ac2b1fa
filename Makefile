# Two commands are all a user needs:  make test   and   make book
# Both create .venv (Python 3.11) themselves on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export GEMMA2_LITE_PROFILE ?= ci
# Keep JAX from grabbing a TPU/GPU's whole memory when notebooks run side by side.
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false

.PHONY: test book venv bench clean help

help:
	@echo "make test   - set up .venv, run every test (unit, parity, notebooks, the built book)"
	@echo "make book   - set up .venv, execute every notebook and build the HTML book in _build/html"
	@echo "make bench  - run the speed/memory benchmarks (prints ratios)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[book,test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --nitpick --keep-going

bench: $(STAMP)
	$(BIN)/python benchmarks/forward.py

clean:
	rm -rf _build .pytest_cache
