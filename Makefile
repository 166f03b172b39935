# gemma4-mlx developer entry points.  `make run` and `make test` are the README's two commands.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= google/gemma-4-E2B-it
PROMPT ?= Why is the sky blue? Answer in two sentences.

.PHONY: install install-test run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

run: install
	$(BIN)/gemma4-mlx generate --model "$(MODEL)" --prompt "$(PROMPT)"

# pytest exits 5 when it collects no test (e.g. everything deselected): say so, don't fail.
test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

bench: install-test
	$(BIN)/python bench/bench_text.py

clean:
	rm -rf $(VENV) build *.egg-info bench/_work
